"""The demo chain: does DPO change what a model does, and by how much?

On a small verifiable task (2-digit addition, :mod:`dpo_ray.task`), starting from nothing:

1. **model**: a tiny random-init Llama with a tokenizer trained on the task's texts;
2. **sft**: the reference policy, by maximum likelihood on correct answers (:mod:`dpo_ray.sft`), left
   imperfect on purpose;
3. **pairs**: the SFT model answers train and held-out prompts several times (Ray Data,
   :mod:`dpo_ray.generation`); its wrong answers become ``rejected``, verified ones ``chosen``;
4. **dpo**: :func:`dpo_ray.trainer.run_dpo` on those pairs, as on any user's explicit-format data;
5. **preferred_ft**: the Preferred-FT baseline: SFT from the reference on the chosen answers only, with
   DPO's budget (same steps, batch size, schedule and learning rate); **preferred_ft_matched**: the same
   with a small learning rate, so that it ends near DPO's KL and the two compare at a similar distance
   from the reference;
6. **evaluate**: held-out task accuracy, reward and KL to the reference of every policy and of checkpoints
   along the trainings (:mod:`dpo_ray.evaluation`), a table, ``summary.json`` and a reward/KL plot.

The reference is SFT with a constant learning rate after warmup (``sft_lr_schedule``), stopped while the
tiny model gets about half of the held-out sums right. Fine-tuning it at a 10x smaller, decaying rate
(DPO and Preferred-FT alike) also removes some of its learning-rate noise; the Preferred-FT rows show how
much of a gain any fine-tuning on the verified answers gives. With a decayed SFT schedule instead, neither
method moves the reference by more than a few points in this budget.

Each stage records what it was run with in ``<output_dir>/<stage>/stage.json``; a re-run skips a stage
whose record matches (and re-runs it, and what follows, when settings changed).

Settings: the usual :class:`~dpo_ray.config.Config` (``configs/demo.yaml``; DPO hyperparameters, the tiny
model's shape, workers, ``output_dir``) plus :class:`DemoSettings` (task size and the SFT, sampling and
Preferred-FT knobs) from ``--demo key=value`` flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from dpo_ray.checkpointing import list_checkpoint_models
from dpo_ray.config import REPO_ROOT, Config, build_config, build_settings, derive_config
from dpo_ray.evaluation import (
    EvalSettings,
    compute_preference_accuracy,
    evaluate_policies,
    read_pairs,
)
from dpo_ray.generation import GenerationSettings
from dpo_ray.pairing import make_preference_pairs, write_jsonl
from dpo_ray.sft import run_sft
from dpo_ray.task import build_sft_rows, parse_prompt, split_problems, to_task_prompts
from dpo_ray.tiny_model import make_tiny_model
from dpo_ray.trainer import SUMMARY_FILE, run_dpo
from dpo_ray.verifier import Verifier, build_verifier

STAGE_FILE = "stage.json"
STAGE_START_FILE = "stage.start.json"  # the key of a stage that started; a stopped stage with the same key resumes
PLOT_FILE = "demo.png"

# The demo's Config when no --config is given; the file explains each value.
DEMO_CONFIG_FILE = REPO_ROOT / "configs" / "demo.yaml"


@dataclass
class DemoSettings:
    """Knobs of the demo that are not DPO settings (DPO's live in the Config)."""

    # task: 2-digit addition; the three prompt sets are disjoint
    min_digits: int = 2
    max_digits: int = 2
    task_seed: int = 0
    sft_prompts: int = 3000  # problems with their solutions, the SFT data
    pair_prompts: int = 4000  # prompts the SFT model answers to make DPO's train pairs
    heldout_prompts: int = 500  # evaluation prompts (and held-out pairs)
    # seed of the tiny model's initialisation and of the SFT run; -1: train.seed. Set it (e.g. 0) with --seeds N to
    # keep one reference and vary only what follows it: at 550 SFT steps the reference's accuracy depends on the seed
    reference_seed: int = -1
    # SFT (the reference): short on purpose, so that the reference is imperfect (about half right)
    sft_steps: int = 550
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    sft_warmup_steps: int = 50
    sft_lr_schedule: str = "constant"  # after warmup (see the module docstring)
    # self-generated pairs
    samples_per_prompt: int = 8
    temperature: float = 1.0
    max_pairs_per_prompt: int = 2
    # Preferred-FT: DPO's steps, batch size and schedule; 0 = DPO's learning rate too
    pft_learning_rate: float = 0.0
    # a second Preferred-FT run with a learning rate small enough to end near DPO's KL (0 = skip it),
    # so that the two methods are also compared at a similar distance from the reference
    pft_matched_learning_rate: float = 2e-5
    # evaluation
    eval_samples: int = 4  # temperature-1 samples per held-out prompt, for reward and KL
    # Ray Data actors for sampling and evaluation
    cpus_per_actor: float = 0.5
    num_actors: int = 2


# ------------------------------------------------------------------------------------ settings


def build_demo_config(yaml_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The demo's Config: ``yaml_path``, else :data:`DEMO_CONFIG_FILE`, then ``--set`` ``overrides``."""
    return build_config(yaml_path or DEMO_CONFIG_FILE, overrides)


def parse_demo_settings(items: list[str]) -> DemoSettings:
    """``--demo key=value`` strings over the defaults, parsed and type-checked as Config overrides are."""
    return build_settings(DemoSettings, items)


TASK_FIELDS = ("min_digits", "max_digits", "task_seed", "sft_prompts", "pair_prompts", "heldout_prompts")
SFT_TASK_FIELDS = ("min_digits", "max_digits", "task_seed", "sft_prompts", "heldout_prompts")
PAIR_FIELDS = ("samples_per_prompt", "temperature", "max_pairs_per_prompt", "cpus_per_actor", "num_actors")


def pick(demo: DemoSettings, names: tuple[str, ...]) -> dict[str, Any]:
    """The named demo settings, for a stage's key."""
    return {name: getattr(demo, name) for name in names}


def count_chain_cpus(cfg: Config, demo: DemoSettings) -> float:
    """CPUs one demo or iterate chain holds at its widest (its Ray Train workers, or its sampling actors), plus half
    a CPU for Ray Data's own read and map tasks: chains whose actor pools took every CPU would starve those and hang
    (what :func:`dpo_ray.seeds.run_over_seeds` sizes parallel seeds by)."""
    return max(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, demo.num_actors * demo.cpus_per_actor, 1.0) + 0.5


def sft_run_key(cfg: Config) -> dict[str, Any]:
    """What an SFT run depends on: its Config without the DPO and sweep sections, which it does not read."""
    return {k: v for k, v in cfg.to_result_dict().items() if k not in ("dpo", "sweep")}


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ stages


class StageInterrupted(SystemExit):
    """A training stage stopped by Ctrl-C or SIGTERM after saving a checkpoint: the same command resumes it."""


def run_stage(name: str, directory: Path, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` unless ``directory/stage.json`` records the same ``key``; returns (and records) its result.

    A stage that started with the same key but did not finish (stopped, crashed) runs again in its directory, so
    a Ray Train run inside it resumes from its latest checkpoint; a stage whose key changed starts from an empty
    directory (a resumed run would continue training made with other settings).
    """
    record_path, start_path = directory / STAGE_FILE, directory / STAGE_START_FILE
    key = json.loads(json.dumps(key, default=str))
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            print(f"[stage] {name}: done before, reusing {directory}", flush=True)
            return record["result"]
    if start_path.exists() and json.loads(start_path.read_text()).get("key") == key:
        record_path.unlink(missing_ok=True)
        print(f"[stage] {name}: resuming in {directory}", flush=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        start_path.write_text(json.dumps({"key": key}, indent=2))
        print(f"[stage] {name}: running -> {directory}", flush=True)
    start = time.perf_counter()
    result = fn()
    result["stage_seconds"] = round(time.perf_counter() - start, 1)
    record_path.write_text(json.dumps({"key": key, "result": result}, indent=2, default=str))
    print(f"[stage] {name}: {result['stage_seconds']} s", flush=True)
    return result


def finish_training(summary: dict[str, Any]) -> dict[str, Any]:
    """A training stage's result; a run stopped by a signal (checkpoint saved) ends the whole chain instead, so
    that it is not recorded as done and the same command resumes it."""
    if summary.get("interrupted"):
        raise StageInterrupted(summary.get("exit_code") or 130)
    return {"summary": summary}


def make_base_model(cfg: Config, demo: DemoSettings, out: Path) -> dict[str, Any]:
    """The tiny random-init model, its tokenizer trained on the task's texts (digits are single tokens)."""

    splits = split_problems(demo.sft_prompts, demo.pair_prompts, demo.heldout_prompts, demo.task_seed,
                            demo.min_digits, demo.max_digits)
    texts = [p.prompt + p.answer for p in splits.sft]
    return {"model_path": make_tiny_model(out / "model", texts, cfg.model.tiny, seed=cfg.train.seed)}


def write_task_files(demo: DemoSettings, out: Path) -> dict[str, Any]:
    """SFT data (train problems with their solutions) and held-out SFT rows (for the SFT's eval loss)."""

    splits = split_problems(demo.sft_prompts, demo.pair_prompts, demo.heldout_prompts, demo.task_seed,
                            demo.min_digits, demo.max_digits)
    return {
        "sft_train": str(write_jsonl(build_sft_rows(splits.sft), out / "sft_train.jsonl")),
        "sft_eval": str(write_jsonl(build_sft_rows(splits.heldout), out / "sft_heldout.jsonl")),
    }


def build_sft_config(cfg: Config, demo: DemoSettings, out: Path, model_path: str, task_files: dict) -> Config:
    """The reference's SFT run: the demo's SFT knobs, DPO's workers and model settings."""
    return derive_config(cfg, {
        "model.name_or_path": model_path,
        "data.train": task_files["sft_train"],
        "data.eval": task_files["sft_eval"],
        "train.learning_rate": demo.sft_learning_rate,
        "train.batch_size": demo.sft_batch_size,
        "train.micro_batch_size": demo.sft_batch_size,
        "train.max_steps": demo.sft_steps,
        "train.warmup_steps": demo.sft_warmup_steps,
        "train.lr_schedule": demo.sft_lr_schedule,
        "train.checkpoint_every": 0,
        "train.eval_every": 0,
        "train.keep_checkpoints": 1,
        "train.log_every": max(1, demo.sft_steps // 6),
        "output_dir": str(out),
        "run_name": "sft",
        "storage_path": "",
    })


def build_dpo_config(cfg: Config, out: Path, sft_model: str, pairs: dict) -> Config:
    """DPO on the self-generated pairs, through the data pipeline like any user's explicit-format data."""
    return derive_config(cfg, {
        "model.name_or_path": sft_model,
        "data.train": pairs["train"]["file"],
        "data.eval": pairs["heldout"]["file"],
        "data.format": "explicit",
        "dpo.reference": "precomputed",
        "output_dir": str(out),
        "storage_path": "",
    })


def build_pft_config(dpo_cfg: Config, learning_rate: float, out: Path) -> Config:
    """Preferred-FT: SFT from the reference on the chosen answers of DPO's pairs, with DPO's budget (steps,
    batch size, schedule, checkpoints); ``learning_rate`` 0 takes DPO's too."""
    return derive_config(dpo_cfg, {
        "train.learning_rate": learning_rate or dpo_cfg.train.learning_rate,
        "train.checkpoint_every": dpo_cfg.train.checkpoint_every or dpo_cfg.train.eval_every,
        "output_dir": str(out),
        "run_name": out.name,
    })


def make_pairs(demo: DemoSettings, sft_model: str, out: Path, verifier: Verifier | None = None) -> dict[str, Any]:
    """Self-generated pairs for the pair prompts (DPO's train data) and the held-out prompts (its eval data)."""

    splits = split_problems(demo.sft_prompts, demo.pair_prompts, demo.heldout_prompts, demo.task_seed,
                            demo.min_digits, demo.max_digits)
    settings = GenerationSettings(
        num_samples=demo.samples_per_prompt, temperature=demo.temperature,
        max_new_tokens=demo.max_digits + 4, seed=demo.task_seed, num_actors=demo.num_actors,
        cpus_per_actor=demo.cpus_per_actor,
    )
    return {
        "train": make_preference_pairs(to_task_prompts(splits.pairs), sft_model, settings, out / "train.jsonl",
                                       demo.max_pairs_per_prompt, verifier),
        "heldout": make_preference_pairs(to_task_prompts(splits.heldout), sft_model,
                                         dataclasses.replace(settings, seed=settings.seed + 1),
                                         out / "heldout.jsonl", demo.max_pairs_per_prompt, verifier),
    }


def run_dpo_stage(dpo_cfg: Config) -> dict[str, Any]:
    """DPO through :func:`~dpo_ray.trainer.run_dpo`: its summary."""

    return finish_training(run_dpo(dpo_cfg))


def run_sft_stage(sft_cfg: Config) -> dict[str, Any]:
    """SFT (the reference, or Preferred-FT): the run's summary."""

    return finish_training(run_sft(sft_cfg))


def collect_policies(runs: dict[str, tuple[Config, dict]]) -> dict[str, str]:
    """Policies to evaluate: each run's final model (``<name>``) and its earlier checkpoints (``<name>@<step>``).

    ``runs`` maps a name to (the run's Config, its summary).
    """

    policies = {}
    for name, (run_cfg, summary) in runs.items():
        policies[name] = summary["final_model_dir"]
        for step, path in list_checkpoint_models(run_cfg.resolved_storage_path(), run_cfg.run_name):
            if step != summary["steps"]:  # the last checkpoint is the final model
                policies[f"{name}@{step}"] = path
    return policies


# Final policies: (name in the evaluation, label in the table and plot, plot colour).
POLICY_LABELS = {
    "preferred_ft": ("Preferred-FT", "tab:orange"),
    "preferred_ft_matched": ("Preferred-FT, small lr", "tab:green"),
    "dpo": ("DPO", "tab:blue"),
}


def evaluate_stage(demo: DemoSettings, sft_model: str, policies: dict[str, str], final_steps: dict[str, int],
                   pairs: dict, dpo_summary: dict, verifier: Verifier) -> dict[str, Any]:
    """Held-out task accuracy / reward / KL of every policy, and preference accuracy of the final ones.

    ``final_steps`` maps each run (``dpo``, ``preferred_ft``, ...) to its last step, for the plot.
    """

    splits = split_problems(demo.sft_prompts, demo.pair_prompts, demo.heldout_prompts, demo.task_seed,
                            demo.min_digits, demo.max_digits)
    settings = EvalSettings(num_samples=demo.eval_samples, max_new_tokens=demo.max_digits + 4, seed=demo.task_seed + 7,
                            num_actors=demo.num_actors, cpus_per_actor=demo.cpus_per_actor)
    scores, rows = evaluate_policies([p.prompt for p in splits.heldout], policies, sft_model, settings, verifier)
    heldout_pairs = read_pairs(pairs["heldout"]["file"])
    preference = {"reference": 0.5}  # pi == pi_ref: every implicit-reward margin is 0, a tie
    for name in final_steps:
        preference[name] = (dpo_summary.get("eval_accuracy") if name == "dpo"
                            else compute_preference_accuracy(policies[name], sft_model, heldout_pairs))
    examples = [
        {"prompt": r["prompt"], "answer": check_answer_text(r["prompt"]),
         **{name: r[f"{name}.answer"] for name in ("reference", *final_steps)}}
        for r in rows if r["reference.correct"] != r["dpo.correct"]
    ][:8]
    return {"scores": {k: asdict(v) for k, v in scores.items()}, "preference_accuracy": preference,
            "final_steps": final_steps, "examples": examples}


def check_answer_text(prompt: str) -> str:
    """The known solution of a task prompt."""

    return parse_prompt(prompt).answer


# ------------------------------------------------------------------------------------ reporting


def format_table(evaluation: dict) -> str:
    """The policies' held-out numbers as a small text table."""
    scores, pref = evaluation["scores"], evaluation["preference_accuracy"]
    lines = [f"{'policy':24s} {'task acc':>9s} {'reward':>8s} {'KL(.||ref)':>11s} {'pref acc':>9s}"]
    for name in ("reference", *(n for n in POLICY_LABELS if n in evaluation["final_steps"])):
        label = "reference (SFT)" if name == "reference" else POLICY_LABELS[name][0]
        s, p = scores[name], pref.get(name)
        lines.append(f"{label:24s} {s['task_accuracy']:9.3f} {s['reward']:8.3f} {s['kl']:11.3f} "
                     f"{'' if p is None else f'{p:9.3f}'}")
    return "\n".join(lines)


def trajectory(scores: dict[str, dict], name: str, final_step: int) -> list[tuple[int, dict]]:
    """(step, scores) along one run: the reference at step 0, the evaluated checkpoints, the final model."""
    points = [(0, scores["reference"])]
    points += sorted((int(k.split("@")[1]), v) for k, v in scores.items() if k.startswith(f"{name}@"))
    return points + [(final_step, scores[name])]


def plot_frontier(evaluation: dict, path: Path) -> Path:
    """Task accuracy and reward against KL to the reference, along the DPO and Preferred-FT trainings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = evaluation["scores"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "task_accuracy", "greedy task accuracy"),
                              (axes[1], "reward", "reward (mean correctness of T=1 samples)")):
        for name, final_step in evaluation["final_steps"].items():
            title, color = POLICY_LABELS[name]
            points = trajectory(scores, name, final_step)
            ax.plot([p[1]["kl"] for p in points], [p[1][metric] for p in points], "o-", color=color, label=title)
            for step, s in points[1:]:
                ax.annotate(str(step), (s["kl"], s[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.scatter([0], [scores["reference"][metric]], color="black", zorder=5, label="reference (SFT)")
        ax.set_xlabel("KL(policy || reference) per held-out prompt (nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Held-out prompts; points are checkpoints (labels: training step)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_demo_summary(dpo_summary: dict, evaluation: dict, stages: dict, plot: Path, wall: float) -> dict:
    """run_dpo's summary keys plus the demo's measurements."""
    s, pref = evaluation["scores"], evaluation["preference_accuracy"]
    summary = dict(dpo_summary)
    summary.update({
        "task_accuracy_policy": s["dpo"]["task_accuracy"],
        "task_accuracy_reference": s["reference"]["task_accuracy"],
        "task_accuracy_preferred_ft": s["preferred_ft"]["task_accuracy"],
        "kl_policy_reference": s["dpo"]["kl"],
        "kl_preferred_ft_reference": s["preferred_ft"]["kl"],
        "reward_policy": s["dpo"]["reward"],
        "reward_reference": s["reference"]["reward"],
        "reward_preferred_ft": s["preferred_ft"]["reward"],
        "preference_accuracy_preferred_ft": pref["preferred_ft"],
        "heldout_prompts": s["dpo"]["prompts"],
    })
    if "preferred_ft_matched" in s:
        summary.update({
            "task_accuracy_preferred_ft_matched": s["preferred_ft_matched"]["task_accuracy"],
            "kl_preferred_ft_matched_reference": s["preferred_ft_matched"]["kl"],
            "reward_preferred_ft_matched": s["preferred_ft_matched"]["reward"],
            "preference_accuracy_preferred_ft_matched": pref["preferred_ft_matched"],
        })
    summary.update({
        "examples": evaluation["examples"],
        "trajectory": {k: v for k, v in s.items() if "@" in k},
        "pairs": stages["pairs"],
        "sft_summary": stages["sft"]["summary"],
        "stage_seconds": {k: v.get("stage_seconds") for k, v in stages.items()},
        "plot": str(plot),
        "demo_wall_seconds": round(wall, 1),
    })
    return summary


# ------------------------------------------------------------------------------------ the chain


def run_reference_stages(cfg: Config, demo: DemoSettings, out: Path, stages: dict[str, dict]) -> str:
    """The ``model``, ``task`` and ``sft`` stages (recorded in ``stages``): the SFT reference's model directory.

    They run with ``demo.reference_seed`` as ``train.seed`` when it is set."""
    if demo.reference_seed >= 0:
        cfg = derive_config(cfg, {"train.seed": demo.reference_seed})
    base_key = {"tiny": asdict(cfg.model.tiny), "seed": cfg.train.seed, "task": pick(demo, SFT_TASK_FIELDS)}
    stages["model"] = run_stage("model", out / "model_stage", base_key,
                                lambda: make_base_model(cfg, demo, out / "model_stage"))
    stages["task"] = run_stage("task", out / "task", pick(demo, SFT_TASK_FIELDS),
                               lambda: write_task_files(demo, out / "task"))
    sft_cfg = build_sft_config(cfg, demo, out / "sft", stages["model"]["model_path"], stages["task"])
    stages["sft"] = run_stage("sft", out / "sft", {"base": fingerprint(base_key), "cfg": sft_run_key(sft_cfg)},
                              lambda: run_sft_stage(sft_cfg))
    return stages["sft"]["summary"]["final_model_dir"]


def run_demo(cfg: Config, demo: DemoSettings) -> dict[str, Any]:
    """Run (or reuse) every stage, print the table, write ``summary.json`` and the plot; returns the summary."""

    start = time.perf_counter()
    out = cfg.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    verifier = build_verifier(cfg.task)
    stages: dict[str, dict] = {}
    sft_model = run_reference_stages(cfg, demo, out, stages)
    pairs_key = {"sft": fingerprint(stages["sft"]), "task": pick(demo, TASK_FIELDS), "pairs": pick(demo, PAIR_FIELDS),
                 "verifier": asdict(verifier)}
    stages["pairs"] = run_stage("pairs", out / "pairs", pairs_key,
                                lambda: make_pairs(demo, sft_model, out / "pairs", verifier))
    pairs_id = fingerprint(stages["pairs"])

    runs: dict[str, tuple[Config, dict]] = {}
    dpo_cfg = build_dpo_config(cfg, out / "dpo", sft_model, stages["pairs"])
    stages["dpo"] = run_stage("dpo", out / "dpo", {"pairs": pairs_id, "cfg": dpo_cfg.to_result_dict()},
                              lambda: run_dpo_stage(dpo_cfg))
    runs["dpo"] = (dpo_cfg, stages["dpo"]["summary"])
    pft_runs = {"preferred_ft": demo.pft_learning_rate, "preferred_ft_matched": demo.pft_matched_learning_rate}
    for name, lr in pft_runs.items():
        if name != "preferred_ft" and lr <= 0:
            continue
        pft_cfg = build_pft_config(dpo_cfg, lr, out / name)
        stages[name] = run_stage(name, out / name, {"pairs": pairs_id, "cfg": sft_run_key(pft_cfg)},
                                 lambda c=pft_cfg: run_sft_stage(c))
        runs[name] = (pft_cfg, stages[name]["summary"])

    policies = collect_policies(runs)
    final_steps = {name: summary["steps"] for name, (_, summary) in runs.items()}
    eval_key = {name: fingerprint(stages[name]) for name in runs}
    eval_key.update(task=pick(demo, TASK_FIELDS), eval_samples=demo.eval_samples, verifier=asdict(verifier))
    stages["evaluate"] = run_stage("evaluate", out / "evaluate", eval_key,
                                   lambda: evaluate_stage(demo, sft_model, policies, final_steps, stages["pairs"],
                                                          stages["dpo"]["summary"], verifier))
    evaluation = stages["evaluate"]
    plot = plot_frontier(evaluation, out / PLOT_FILE)
    summary = build_demo_summary(stages["dpo"]["summary"], evaluation, stages, plot, time.perf_counter() - start)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    print_report(summary, evaluation, out)
    return summary


def describe_change(evaluation: dict, name: str) -> str:
    """``+12.4 points of greedy accuracy at KL 0.20`` for one final policy."""
    s, ref = evaluation["scores"][name], evaluation["scores"]["reference"]
    return (f"{100 * (s['task_accuracy'] - ref['task_accuracy']):+.1f} points of greedy accuracy, "
            f"{100 * (s['reward'] - ref['reward']):+.1f} of sampled reward, at KL {s['kl']:.2f}")


def print_report(summary: dict, evaluation: dict, out: Path) -> None:
    """The table, what changed, a few answers that changed, and where the files are."""
    pairs = summary["pairs"]["train"]
    print(f"\n[demo] {summary['heldout_prompts']} held-out prompts; DPO trained on {pairs['pairs']} self-generated "
          f"pairs from {pairs['prompts_with_pairs']} prompts ({pairs['chosen_from_solution']} with the known "
          f"solution as chosen)\n")
    print(format_table(evaluation))
    print()
    for name in evaluation["final_steps"]:
        print(f"{POLICY_LABELS[name][0]:24s} {describe_change(evaluation, name)}")
    if evaluation["examples"]:
        print("\nheld-out prompts where DPO and the reference disagree (greedy answers):")
        for e in evaluation["examples"][:5]:
            print(f"  {e['prompt']:8s} = {e['answer']:4s} reference {e['reference']!r:7s} DPO {e['dpo']!r:7s} "
                  f"Preferred-FT {e['preferred_ft']!r}")
    print(f"\n[demo] summary: {out / 'summary.json'}\n[demo] plot: {summary['plot']}\n"
          f"[demo] stage seconds: {summary['stage_seconds']}", flush=True)
