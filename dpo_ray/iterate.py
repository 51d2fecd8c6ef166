"""Iterative DPO on a verifiable task: rounds of generate -> verify -> pair -> train, with any checker.

Iterative Reasoning Preference Optimization (Pang et al. 2024, arXiv 2404.19733) repeats the demo's offline
step in rounds. Round ``r`` (1-based):

1. **pairs**: the policy of round ``r-1`` (round 0: the SFT model) answers every train and held-out prompt
   ``K`` times (Ray Data, :func:`dpo_ray.generation.sample_answers`); ``task.verifier`` checks each answer; its
   wrong answers become ``rejected``, a verified one ``chosen`` (else the teacher's: the known solution, or a
   teacher model's verified answer; :mod:`dpo_ray.pairing`);
2. **dpo**: :func:`dpo_ray.trainer.run_dpo` from the policy of round ``r-1``, ``steps_per_round`` steps, with
   the NLL term on chosen (``dpo.rpo_alpha``, on in ``configs/iterate.yaml``: the paper calls it crucial). Its
   reference is the policy it starts from (``reference=previous``, as Iterative RPO) or the SFT model
   (``reference=sft``, through ``dpo.ref_model``);
3. **preferred_ft** (baseline): SFT on the same round's verified chosen answers, from the Preferred-FT policy of
   round ``r-1``, with the same steps, batch and schedule;
4. **evaluate**: held-out greedy task accuracy, sampled reward and KL to the SFT model of both policies
   (:func:`dpo_ray.evaluation.evaluate_policies`), and their preference accuracy on the round's held-out pairs.

After the rounds, **one_round_dpo** (baseline) trains DPO from the SFT model on round 1's pairs for the whole
budget (``rounds * steps_per_round`` steps): do the rounds pay, against the same steps on one round's pairs?
``one_round_no_nll`` adds the same run without the NLL term.

Every step is a stage (:func:`dpo_ray.demo.run_stage`): a finished one is never redone, and one that was
stopped runs again in its directory, so its Ray Train run resumes at the step it reached. Outputs in
``output_dir``: ``rounds.csv`` (a row per round and method), ``rounds.png``, ``summary.json``; the final policy is
the last round's ``round_<R>/dpo/final_model``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from dpo_ray.config import REPO_ROOT, Config, ConfigError, build_config, build_settings, derive_config
from dpo_ray.demo import (
    DemoSettings,
    build_dpo_config,
    build_pft_config,
    fingerprint,
    pick,
    run_dpo_stage,
    run_reference_stages,
    run_sft_stage,
    run_stage,
    sft_run_key,
)
from dpo_ray.evaluation import EvalSettings, compute_preference_accuracy, evaluate_policies, read_pairs
from dpo_ray.generation import GenerationSettings
from dpo_ray.pairing import TEACHER_NONE, TEACHER_SOLUTION, make_preference_pairs
from dpo_ray.task import split_problems, to_task_prompts
from dpo_ray.trainer import SUMMARY_FILE
from dpo_ray.verifier import CHOSEN_SOURCES, TaskPrompt, Verifier, build_verifier, read_task_prompts

ITERATE_CONFIG_FILE = REPO_ROOT / "configs" / "iterate.yaml"
ROUNDS_FILE = "rounds.csv"
PLOT_FILE = "rounds.png"

ITERATIVE = "iterative_dpo"
PREFERRED_FT = "preferred_ft"
ONE_ROUND = "one_round_dpo"
ONE_ROUND_NO_NLL = "one_round_dpo_no_nll"
SFT = "sft"
METHOD_LABELS = {
    SFT: "SFT (reference)",
    ITERATIVE: "iterative DPO+NLL",
    PREFERRED_FT: "Preferred-FT",
    ONE_ROUND: "one-round DPO+NLL",
    ONE_ROUND_NO_NLL: "one-round DPO",
}
# What a round's stages depend on among the settings (not rounds: a longer run reuses the rounds it has)
ROUND_FIELDS = ("steps_per_round", "reference", "teacher", "max_new_tokens")
ROUND_COLUMNS = ("round", "method", "steps", "pairs", *(f"chosen_{s}" for s in CHOSEN_SOURCES), "task_accuracy",
                 "reward", "kl_sft", "preference_accuracy", "dpo_eval_accuracy", "model")


@dataclass
class IterateSettings:
    """The rounds' own knobs (task size, SFT and sampling come from :class:`~dpo_ray.demo.DemoSettings`)."""

    rounds: int = 3
    steps_per_round: int = 300  # DPO and Preferred-FT optimizer steps in each round
    # pi_ref of round r: the policy the round starts from (Iterative RPO) or the fixed SFT model
    reference: Literal["previous", "sft"] = "previous"
    # chosen when no sample of the student is verified: the task's known solution, none (no pair, counted), or a
    # model directory / hub id whose verified answers are taken
    teacher: str = TEACHER_SOLUTION
    preferred_ft: bool = True  # the Preferred-FT baseline, every round, same steps
    one_round_dpo: bool = True  # DPO+NLL from the SFT model on round 1's pairs, for the rounds' whole budget
    one_round_no_nll: bool = False  # the same without the NLL term (dpo.rpo_alpha=0)
    max_new_tokens: int = 0  # answer length cap; 0: the arithmetic task's longest answer + 4


def build_iterate_config(yaml_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The workflow's Config: ``yaml_path``, else :data:`ITERATE_CONFIG_FILE`, then ``--set`` ``overrides``."""
    return build_config(yaml_path or ITERATE_CONFIG_FILE, overrides)


def parse_iterate_settings(items: list[str]) -> IterateSettings:
    """``--iterate key=value`` strings over the defaults, parsed and checked as Config overrides are."""
    it = build_settings(IterateSettings, items)
    if it.rounds < 1:
        raise ConfigError(f"iterate setting 'rounds' must be >= 1; got {it.rounds}")
    if it.steps_per_round < 1:
        raise ConfigError(f"iterate setting 'steps_per_round' must be >= 1; got {it.steps_per_round}")
    return it


# ------------------------------------------------------------------------------------ the task


def load_task_prompts(cfg: Config, demo: DemoSettings) -> tuple[list[TaskPrompt], list[TaskPrompt]]:
    """(train prompts, held-out prompts): ``task.prompts`` / ``task.heldout_prompts``, else the arithmetic
    task's pair and held-out splits (each with its known solution)."""
    if cfg.task.prompts or cfg.task.heldout_prompts:
        if not (cfg.task.prompts and cfg.task.heldout_prompts):
            raise ConfigError("task.prompts and task.heldout_prompts go together: set both")
        if not cfg.model.name_or_path:
            raise ConfigError("task.prompts needs model.name_or_path: the SFT model that answers them in round 1")
        return read_task_prompts(cfg.task.prompts), read_task_prompts(cfg.task.heldout_prompts)
    splits = split_problems(demo.sft_prompts, demo.pair_prompts, demo.heldout_prompts, demo.task_seed,
                            demo.min_digits, demo.max_digits)
    return to_task_prompts(splits.pairs), to_task_prompts(splits.heldout)


def prepare_sft_model(cfg: Config, demo: DemoSettings, out: Path, stages: dict[str, dict]) -> str:
    """The round-0 policy: ``model.name_or_path`` when given (an SFT model), else the demo's tiny model and SFT
    stages."""
    if cfg.model.name_or_path:
        stages["sft"] = {"summary": {"final_model_dir": cfg.model.name_or_path}}
        return cfg.model.name_or_path
    return run_reference_stages(cfg, demo, out, stages)


# ------------------------------------------------------------------------------------ one round


def resolve_answer_tokens(demo: DemoSettings, it: IterateSettings) -> int:
    """The answer length cap of sampling and evaluation alike: ``max_new_tokens``, else the arithmetic answer's + 4."""
    return it.max_new_tokens or demo.max_digits + 4


def generation_settings(cfg: Config, demo: DemoSettings, it: IterateSettings, round_index: int) -> GenerationSettings:
    """Sampling for round ``round_index``: fresh draws every round and seed."""
    return GenerationSettings(
        num_samples=demo.samples_per_prompt, temperature=demo.temperature,
        max_new_tokens=resolve_answer_tokens(demo, it),
        seed=cfg.train.seed * 1000 + 10 * round_index, num_actors=demo.num_actors, cpus_per_actor=demo.cpus_per_actor,
    )


def make_round_pairs(prompts: tuple[list[TaskPrompt], list[TaskPrompt]], policy: str, settings: GenerationSettings,
                     demo: DemoSettings, it: IterateSettings, verifier: Verifier, out: Path) -> dict[str, Any]:
    """The round's train and held-out pairs, sampled from ``policy``."""
    train, heldout = prompts
    return {
        "train": make_preference_pairs(train, policy, settings, out / "train.jsonl", demo.max_pairs_per_prompt,
                                       verifier, it.teacher),
        "heldout": make_preference_pairs(heldout, policy, dataclasses.replace(settings, seed=settings.seed + 1),
                                         out / "heldout.jsonl", demo.max_pairs_per_prompt, verifier, it.teacher),
    }


def build_round_dpo_config(cfg: Config, out: Path, policy: str, reference: str, pairs: dict, steps: int,
                           rpo_alpha: float | None = None) -> Config:
    """DPO from ``policy`` on the round's pairs for ``steps`` steps, with ``reference`` as pi_ref."""
    values: dict[str, Any] = {"train.max_steps": steps, "dpo.ref_model": "" if reference == policy else reference,
                              "run_name": "dpo"}
    if rpo_alpha is not None:
        values["dpo.rpo_alpha"] = rpo_alpha
    return derive_config(build_dpo_config(cfg, out, policy, pairs), values)


def evaluate_round(prompts: list[TaskPrompt], policies: dict[str, str], sft_model: str, heldout_pairs_file: str,
                   demo: DemoSettings, max_new_tokens: int, verifier: Verifier, seed: int) -> dict[str, Any]:
    """Held-out task accuracy, reward and KL to the SFT model of ``policies``, and their preference accuracy
    (implicit reward against the SFT model) on the round's held-out pairs."""
    settings = EvalSettings(num_samples=demo.eval_samples, max_new_tokens=max_new_tokens, seed=seed,
                            num_actors=demo.num_actors, cpus_per_actor=demo.cpus_per_actor)
    scores, _ = evaluate_policies([p.prompt for p in prompts], policies, sft_model, settings, verifier)
    pairs = read_pairs(heldout_pairs_file)
    preference = {name: compute_preference_accuracy(path, sft_model, pairs) for name, path in policies.items()}
    return {"scores": {k: asdict(v) for k, v in scores.items()}, "preference_accuracy": preference}


def build_round_row(round_index: int, method: str, steps: int, pairs: dict | None, scores: dict,
                    preference: float | None, dpo_eval_accuracy: float | None, model: str) -> dict[str, Any]:
    """One row of ``rounds.csv``."""
    sources = (pairs or {}).get("chosen_sources", {})
    return {
        "round": round_index, "method": method, "steps": steps, "pairs": (pairs or {}).get("pairs", 0),
        **{f"chosen_{s}": sources.get(s, 0) for s in CHOSEN_SOURCES},
        "task_accuracy": scores["task_accuracy"], "reward": scores["reward"], "kl_sft": scores["kl"],
        "preference_accuracy": preference, "dpo_eval_accuracy": dpo_eval_accuracy, "model": model,
    }


# ------------------------------------------------------------------------------------ the rounds


def run_iterate(cfg: Config, demo: DemoSettings, it: IterateSettings) -> dict[str, Any]:
    """Run (or resume) every round and the baselines; write ``rounds.csv``, ``rounds.png`` and ``summary.json``."""
    start = time.perf_counter()
    out = cfg.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    verifier = build_verifier(cfg.task)
    if it.teacher not in (TEACHER_SOLUTION, TEACHER_NONE) and not Path(it.teacher).expanduser().exists():
        print(f"[iterate] teacher {it.teacher!r} is not a local directory: loading it as a hub id", flush=True)
    prompts = load_task_prompts(cfg, demo)
    stages: dict[str, dict] = {}
    sft_model = prepare_sft_model(cfg, demo, out, stages)
    common = {"task": pick(demo, ("min_digits", "max_digits", "task_seed", "pair_prompts", "heldout_prompts")),
              "task_cfg": asdict(cfg.task), "iterate": pick(it, ROUND_FIELDS)}

    rows: list[dict[str, Any]] = []
    policy, pft_policy, policy_id, pft_id = sft_model, sft_model, fingerprint(stages["sft"]), fingerprint(stages["sft"])
    first_pairs: dict | None = None
    steps = 0
    for r in range(1, it.rounds + 1):
        rd = out / f"round_{r}"
        settings = generation_settings(cfg, demo, it, r)
        pairs = run_stage(f"round {r} pairs", rd / "pairs",
                          {"policy": policy_id, "round": r, "generation": asdict(settings), **common,
                           "pairs": pick(demo, ("max_pairs_per_prompt",))},
                          lambda: make_round_pairs(prompts, policy, settings, demo, it, verifier, rd / "pairs"))
        first_pairs = first_pairs or pairs
        reference = policy if it.reference == "previous" else sft_model
        dpo_cfg = build_round_dpo_config(cfg, rd / "dpo", policy, reference, pairs, it.steps_per_round)
        dpo = run_stage(f"round {r} dpo", rd / "dpo", {"pairs": fingerprint(pairs), "cfg": dpo_cfg.to_result_dict()},
                        lambda: run_dpo_stage(dpo_cfg))
        policy, policy_id = dpo["summary"]["final_model_dir"], fingerprint(dpo)
        steps += it.steps_per_round
        policies = {ITERATIVE: policy}
        if it.preferred_ft:
            pft_cfg = derive_config(build_pft_config(dpo_cfg, demo.pft_learning_rate, rd / PREFERRED_FT),
                                    {"model.name_or_path": pft_policy})
            pft = run_stage(f"round {r} preferred_ft", rd / PREFERRED_FT,
                            {"pairs": fingerprint(pairs), "start": pft_id, "cfg": sft_run_key(pft_cfg)},
                            lambda: run_sft_stage(pft_cfg))
            pft_policy, pft_id = pft["summary"]["final_model_dir"], fingerprint(pft)
            policies[PREFERRED_FT] = pft_policy
        evaluation = run_stage(f"round {r} evaluate", rd / "evaluate",
                               {"policies": {ITERATIVE: policy_id, PREFERRED_FT: pft_id}, "pairs": fingerprint(pairs),
                                "eval_samples": demo.eval_samples, **common},
                               lambda: evaluate_round(prompts[1], policies, sft_model, pairs["heldout"]["file"], demo,
                                                      resolve_answer_tokens(demo, it), verifier, cfg.train.seed + 7))
        if r == 1:
            rows.append(build_round_row(0, SFT, 0, None, evaluation["scores"]["reference"], 0.5, None, sft_model))
        for name, path in policies.items():
            rows.append(build_round_row(r, name, steps, pairs["train"], evaluation["scores"][name],
                                        evaluation["preference_accuracy"][name],
                                        dpo["summary"].get("eval_accuracy") if name == ITERATIVE else None, path))
        write_rounds(rows, out / ROUNDS_FILE)

    baselines = {ONE_ROUND: None} if it.one_round_dpo else {}
    if it.one_round_no_nll:
        baselines[ONE_ROUND_NO_NLL] = 0.0
    for name, rpo_alpha in baselines.items():
        rows.append(run_one_round_baseline(cfg, demo, it, name, rpo_alpha, sft_model, first_pairs, prompts, verifier,
                                           out, common))
        write_rounds(rows, out / ROUNDS_FILE)

    plot = plot_rounds(rows, out / PLOT_FILE)
    summary = build_iterate_summary(rows, it, policy, plot, time.perf_counter() - start)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    print_rounds(rows, out, summary)
    return summary


def run_one_round_baseline(cfg: Config, demo: DemoSettings, it: IterateSettings, name: str, rpo_alpha: float | None,
                           sft_model: str, pairs: dict, prompts, verifier: Verifier, out: Path,
                           common: dict) -> dict[str, Any]:
    """DPO from the SFT model on round 1's pairs for ``rounds * steps_per_round`` steps, evaluated like a round."""
    directory = out / name
    budget = it.rounds * it.steps_per_round
    dpo_cfg = build_round_dpo_config(cfg, directory / "dpo", sft_model, sft_model, pairs, budget, rpo_alpha)
    dpo = run_stage(name, directory / "dpo", {"pairs": fingerprint(pairs), "cfg": dpo_cfg.to_result_dict()},
                    lambda: run_dpo_stage(dpo_cfg))
    path = dpo["summary"]["final_model_dir"]
    evaluation = run_stage(f"{name} evaluate", directory / "evaluate",
                           {"policy": fingerprint(dpo), "pairs": fingerprint(pairs), "eval_samples": demo.eval_samples,
                            **common},
                           lambda: evaluate_round(prompts[1], {name: path}, sft_model, pairs["heldout"]["file"], demo,
                                                  resolve_answer_tokens(demo, it), verifier, cfg.train.seed + 7))
    return build_round_row(it.rounds, name, budget, pairs["train"], evaluation["scores"][name],
                           evaluation["preference_accuracy"][name], dpo["summary"].get("eval_accuracy"), path)


# ------------------------------------------------------------------------------------ reporting


def write_rounds(rows: list[dict[str, Any]], path: Path) -> Path:
    """``rounds.csv``, rewritten whole after every round (a stopped run keeps the rounds it finished)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=ROUND_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def final_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last row of each method (the SFT model's is round 0)."""
    return {row["method"]: row for row in rows}


def build_iterate_summary(rows: list[dict[str, Any]], it: IterateSettings, final_model: str, plot: Path,
                          wall: float) -> dict[str, Any]:
    """Final task accuracy, reward, KL and preference accuracy of each method, and where the outputs are."""
    final = final_rows(rows)
    summary: dict[str, Any] = {"rounds": it.rounds, "steps_per_round": it.steps_per_round,
                               "reference": it.reference, "teacher": it.teacher}
    for method, row in final.items():
        for key in ("task_accuracy", "reward", "kl_sft", "preference_accuracy"):
            summary[f"{key}_{method}"] = row[key]
    summary.update({"final_model_dir": final_model, "rounds_csv": str(plot.with_name(ROUNDS_FILE)),
                    "plot": str(plot), "iterate_wall_seconds": round(wall, 1), "table": rows})
    return summary


def format_rounds_table(rows: list[dict[str, Any]]) -> str:
    """``rounds.csv`` as a text table."""
    lines = [f"{'round':>5s}  {'method':22s} {'steps':>6s} {'pairs':>6s} {'task acc':>9s} {'reward':>8s} "
             f"{'KL(.||SFT)':>11s} {'pref acc':>9s}"]
    for row in rows:
        pref = row["preference_accuracy"]
        lines.append(f"{row['round']:5d}  {METHOD_LABELS[row['method']]:22s} {row['steps']:6d} {row['pairs']:6d} "
                     f"{row['task_accuracy']:9.3f} {row['reward']:8.3f} {row['kl_sft']:11.3f} "
                     f"{'' if pref is None else f'{pref:9.3f}'}")
    return "\n".join(lines)


def print_rounds(rows: list[dict[str, Any]], out: Path, summary: dict[str, Any]) -> None:
    print("\n" + format_rounds_table(rows) + "\n", flush=True)
    print(f"[iterate] rounds: {out / ROUNDS_FILE}\n[iterate] plot: {summary['plot']}\n"
          f"[iterate] final policy: {summary['final_model_dir']}\n[iterate] summary: {out / SUMMARY_FILE}", flush=True)


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> Path:
    """Greedy task accuracy and KL to the SFT model against the round, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = [r for r in rows if r["method"] == SFT]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "task_accuracy", "greedy task accuracy (held out)"),
                           (axes[1], "kl_sft", "KL(policy || SFT) per held-out prompt (nats)")):
        for method in (ITERATIVE, PREFERRED_FT, ONE_ROUND, ONE_ROUND_NO_NLL):
            own = [r for r in rows if r["method"] == method]
            if not own:
                continue
            in_rounds = method in (ITERATIVE, PREFERRED_FT)  # a line from the SFT model; baselines: one point
            points = sft + own if in_rounds else own
            ax.plot([p["round"] for p in points], [p[key] for p in points], "o-" if in_rounds else "s",
                    label=METHOD_LABELS[method])
        ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.set_xlabel("round (one-round baselines: at the same total steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
