"""The command line: every dpo-ray entry point, and the only module that parses arguments.

    dpo-ray train [--config FILE] [--set section.key=value ...]    # = python workflows/train.py
    dpo-ray sweep --config configs/sweep.yaml                        # = python workflows/sweep.py
    dpo-ray sft --set data.train=pairs.jsonl                         # = python workflows/sft.py
    dpo-ray demo [--demo key=value ...] [--seeds N]                  # = python workflows/demo.py
    dpo-ray iterate [--iterate key=value ...] [--seeds N]            # = python workflows/iterate.py
    dpo-ray make-pairs --model DIR --output DIR                      # = python workflows/make_pairs.py
    dpo-ray make-tiny-model --output DIR                             # = python workflows/make_tiny_model.py

``python -m dpo_ray.cli <command>`` is the same as ``dpo-ray <command>``; ``dpo-ray`` with only options (or
none) trains. Each ``main_*`` parses, builds the config, runs the library function and prints where the
results are. Nothing in the library imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from dpo_ray import demo as demo_chain
from dpo_ray import iterate as iterate_rounds
from dpo_ray.cluster import init_ray
from dpo_ray.config import (
    BUNDLED_HH_DATA,
    REPO_ROOT,
    Config,
    ConfigError,
    TinyModelSettings,
    build_config,
    build_settings,
)
from dpo_ray.data.formats import DataValidationError
from dpo_ray.ray_compat import forward_sigterm_as_sigint
from dpo_ray.seeds import aggregate_seeds, derive_seed_configs, format_seed_table, run_over_seeds, write_seed_report
from dpo_ray.sft import run_sft
from dpo_ray.sweep import SUMMARY_FILE as SWEEP_SUMMARY_FILE
from dpo_ray.sweep import run_sweep
from dpo_ray.sweep.preflight import needs_state_api as sweep_needs_state_api
from dpo_ray.tiny_model import count_saved_parameters, make_tiny_model, read_tokenizer_texts
from dpo_ray.trainer import SUMMARY_FILE, find_training_plot, run_dpo
from dpo_ray.verifier import VerifierError, build_verifier

# ------------------------------------------------------------------------------------ shared plumbing


def build_parser(description: str) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` and repeatable ``--set section.key=value``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML preset (see configs/); defaults apply without one")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key, e.g. --set dpo.beta=0.2 (repeatable)",
    )
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                 build: Callable[[str | None, list[str]], Config] = build_config) -> tuple[argparse.Namespace, Config]:
    """Parse arguments and build the validated config; a bad key or value exits with one line."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[dpo-ray] %(message)s")
    with exit_on_input_error():
        cfg = build(args.config, args.overrides)
    return args, cfg


@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """A bad config value or unusable input data ends a command with one ``error:`` line and exit status 2."""
    try:
        yield
    except (ConfigError, DataValidationError, VerifierError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def print_config(cfg: Config) -> None:
    print("[dpo-ray] resolved config:\n" + "\n".join("  " + line for line in cfg.to_yaml().splitlines()), flush=True)


def format_fields(summary: dict[str, Any], keys: tuple[str, ...]) -> str:
    return "\n".join(f"  {k:22s} {summary.get(k)}" for k in keys)


# ------------------------------------------------------------------------------------ train


TRAIN_SUMMARY_KEYS = ("eval_accuracy", "eval_accuracy_strict", "eval_loss", "eval_reward_margin", "train_pairs",
                      "eval_pairs", "steps", "pairs_per_second", "wall_seconds", "reference_passes")


def main_train(argv: list[str] | None = None) -> dict[str, Any]:
    """``dpo-ray train``: DPO on Ray Train. Exit 2 on bad input; 130 (or the signal's code) when interrupted."""
    _, cfg = parse_config(build_parser("Train a policy with DPO on Ray Train."), argv)
    print_config(cfg)
    with exit_on_input_error():
        start_ray(cfg, needs_state_api=False, runs_stages=False)
        summary = run_dpo(cfg)
    if summary["interrupted"]:
        print(f"[dpo-ray] interrupted at step {summary['steps']}; checkpoint at {summary['checkpoint_path']}. "
              "Run the same command again to resume.", file=sys.stderr)
        raise SystemExit(summary["exit_code"] or 130)
    print("[dpo-ray] done:\n" + format_fields(summary, TRAIN_SUMMARY_KEYS))
    print(f"[dpo-ray] summary: {cfg.resolved_output_dir() / SUMMARY_FILE}")
    if summary.get("training_plot"):
        print(f"[dpo-ray] training curves: {summary['training_plot']}")
    print(f"[dpo-ray] final model: {summary['final_model_dir']}")
    return summary


# ------------------------------------------------------------------------------------ sft


def main_sft(argv: list[str] | None = None) -> dict[str, Any]:
    """``dpo-ray sft``: maximum likelihood on the chosen responses of data.train (the reference when none exists)."""
    _, cfg = parse_config(build_parser("Supervised fine-tuning on the chosen responses of data.train (Ray Train)."),
                          argv)
    print_config(cfg)
    with exit_on_input_error():
        start_ray(cfg, needs_state_api=False, runs_stages=False)
        summary = run_sft(cfg)
    print(format_fields(summary, ("train_examples", "eval_examples", "steps", "train_loss", "eval_loss",
                                  "wall_seconds")))
    plot = find_training_plot(cfg)
    if plot:
        print(f"[dpo-ray] training curves: {plot}")
    print(f"[dpo-ray] final model: {summary['final_model_dir']}", flush=True)
    return summary


# ------------------------------------------------------------------------------------ sweep


def format_resume_hint(argv: list[str]) -> str:
    command = " ".join(["python", "workflows/sweep.py", *(shlex.quote(a) for a in argv)])
    return f"[dpo-ray] the sweep's state is saved; run the same command again to resume it:\n  {command}"


def format_best_trial(summary: dict[str, Any]) -> list[str]:
    best = summary.get("best")
    if not best:
        return []
    sampled = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["sampled"].items())
    metrics = best["metrics"]
    return [
        f"  best trial             {best['trial_id']}: {sampled}",
        f"  best eval_accuracy     {metrics['eval_accuracy']:.4f} (loss {metrics['eval_loss']:.4f}, "
        f"margin {metrics['eval_reward_margin']:.4f}, {metrics['steps']} steps)",
        f"  best model             {best['best_model_dir']}",
        f"  best.json              {summary['best_json']}",
    ]


def format_sweep_summary(summary: dict[str, Any]) -> str:
    """The lines the sweep prints at the end: cost, reference passes, best trial, where the files are."""
    statuses = ", ".join(f"{k} {v}" for k, v in summary["statuses"].items())
    lines = [
        f"  trials                 {summary['num_trials']} ({statuses})",
        f"  reference passes       {summary['reference_passes']} "
        f"(all invocations: {summary['reference_passes_total']})",
        f"  wall seconds           {summary['wall_seconds']} (all invocations: {summary['wall_seconds_total']})",
        f"  trial train seconds    {summary['trial_train_seconds_sum']} (sum over trials)",
        f"  trial seconds          {summary['trial_seconds_sum']} (sum over trials, incl. start-up)",
        *format_best_trial(summary),
        f"  results.csv            {summary['results_csv']}",
    ]
    if summary.get("plot"):
        lines.append(f"  accuracy plot          {summary['plot']}")
    lines.append(f"  sweep_summary.json     {Path(summary['results_csv']).parent / SWEEP_SUMMARY_FILE}")
    lines.append(f"  Tune experiment        {summary['experiment_path']}")
    return "\n".join(lines)


def main_sweep(argv: list[str] | None = None) -> dict[str, Any]:
    """``dpo-ray sweep``: run (or resume) the sweep, print where the results are.

    Exit codes: 2 for a bad config or bad data, 130 when interrupted (state saved, the same command resumes),
    1 when no trial finished.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _, cfg = parse_config(build_parser("Sweep DPO's beta and learning rate with Ray Tune."), argv)
    print_config(cfg)
    with exit_on_input_error():  # trials with Ray Train worker groups stopped by ASHA are freed through the State API
        start_ray(cfg, needs_state_api=sweep_needs_state_api(cfg))
    try:
        with exit_on_input_error(), forward_sigterm_as_sigint():
            summary = run_sweep(cfg)
    except KeyboardInterrupt:
        summary = {"interrupted": True, "statuses": "stopped by a signal"}
    if summary["interrupted"]:
        print(f"[dpo-ray] sweep interrupted: {summary['statuses']}", file=sys.stderr)
        print(format_resume_hint(argv), file=sys.stderr)
        raise SystemExit(130)
    print("[dpo-ray] sweep done:\n" + format_sweep_summary(summary), flush=True)
    if summary["best"] is None:
        print("error: no trial finished training; see the error column of results.csv", file=sys.stderr)
        raise SystemExit(1)
    return summary


# ------------------------------------------------------------------------------------ demo and pairs


def add_demo_settings_argument(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(f.name for f in fields(demo_chain.DemoSettings))
    parser.add_argument("--demo", dest="demo", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a demo setting ({names})")


def start_ray(cfg: Config, needs_state_api: bool, runs_stages: bool = True) -> None:
    """:func:`~dpo_ray.cluster.init_ray` for a command's run: its output directory marks the job, and the ``ray``
    section shapes a local instance it starts (``needs_state_api`` and ``runs_stages`` as there)."""
    init_ray(run_dir=cfg.resolved_output_dir(), include_dashboard=cfg.ray.include_dashboard,
             needs_state_api=needs_state_api, idle_workers=cfg.ray.idle_workers, runs_stages=runs_stages)


def add_seeds_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="run with train.seed, train.seed+1, ... (each in <output_dir>/seed_<seed>) and report the "
                             "mean and spread; parallel Ray tasks where the cores allow")


def report_seeds(cfg: Config, cfgs: list[Config], summaries: list[dict], labels: dict[str, str], tag: str) -> dict:
    """Print and write (``seeds.json``) the mean and spread of ``labels``' keys over the seeds."""
    stats = aggregate_seeds(summaries, list(labels))
    path = write_seed_report(cfg.resolved_output_dir(), cfgs, summaries, stats)
    print(f"\n[{tag}] {len(cfgs)} seeds ({', '.join(str(c.train.seed) for c in cfgs)}):\n"
          + format_seed_table(stats, labels) + f"\n[{tag}] seeds report: {path}", flush=True)
    return {"seeds": [c.train.seed for c in cfgs], "metrics": stats, "summaries": summaries}


DEMO_SEED_LABELS = {
    "task_accuracy_reference": "task acc, reference (SFT)",
    "task_accuracy_policy": "task acc, DPO",
    "task_accuracy_preferred_ft": "task acc, Preferred-FT",
    "task_accuracy_preferred_ft_matched": "task acc, Preferred-FT small lr",
    "kl_policy_reference": "KL(.||ref), DPO",
    "kl_preferred_ft_reference": "KL(.||ref), Preferred-FT",
    "eval_accuracy": "pref acc, DPO",
}


def main_demo(argv: list[str] | None = None) -> dict[str, Any]:
    """``dpo-ray demo``: SFT reference, self-generated pairs, DPO, Preferred-FT and evaluation on 2-digit addition."""
    parser = build_parser("DPO demo: SFT reference, self-generated pairs, DPO, Preferred-FT, evaluation on a "
                          "small arithmetic task.")
    parser.description += f" Without --config: {demo_chain.DEMO_CONFIG_FILE.relative_to(REPO_ROOT)}."
    add_demo_settings_argument(parser)
    add_seeds_argument(parser)
    args, cfg = parse_config(parser, argv, build=demo_chain.build_demo_config)
    with exit_on_input_error():
        demo = demo_chain.parse_demo_settings(args.demo)
        build_verifier(cfg.task)
    print_config(cfg)
    print("[demo] demo settings: " + json.dumps(asdict(demo)), flush=True)
    with exit_on_input_error():
        start_ray(cfg, needs_state_api=False)
        if args.seeds <= 1:
            return demo_chain.run_demo(cfg, demo)
        cfgs = derive_seed_configs(cfg, args.seeds)
        summaries = run_over_seeds(cfgs, functools.partial(demo_chain.run_demo, demo=demo),
                                   demo_chain.count_chain_cpus(cfg, demo))
    return report_seeds(cfg, cfgs, summaries, DEMO_SEED_LABELS, "demo")


def iterate_seed_labels(it: iterate_rounds.IterateSettings) -> dict[str, str]:
    methods = [iterate_rounds.SFT, iterate_rounds.ITERATIVE, iterate_rounds.PREFERRED_FT, iterate_rounds.ONE_ROUND,
               iterate_rounds.ONE_ROUND_NO_NLL]
    labels = {}
    for key, what in (("task_accuracy", "task acc"), ("kl_sft", "KL(.||SFT)"), ("reward", "reward")):
        for m in methods:
            labels[f"{key}_{m}"] = f"{what}, {iterate_rounds.METHOD_LABELS[m]}"
    return labels


def main_iterate(argv: list[str] | None = None) -> dict[str, Any]:
    """``dpo-ray iterate``: rounds of sample -> verify -> pair -> DPO+NLL, with the Preferred-FT and one-round
    baselines, on the embedded task or any prompts and checker."""
    parser = build_parser("Iterative DPO (Iterative RPO): rounds of sampling, checking, pairing and DPO with an NLL "
                          "term on chosen, against Preferred-FT and one-round DPO at the same budget.")
    parser.description += f" Without --config: {iterate_rounds.ITERATE_CONFIG_FILE.relative_to(REPO_ROOT)}."
    add_demo_settings_argument(parser)
    names = ", ".join(f.name for f in fields(iterate_rounds.IterateSettings))
    parser.add_argument("--iterate", dest="iterate", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a rounds setting ({names})")
    add_seeds_argument(parser)
    args, cfg = parse_config(parser, argv, build=iterate_rounds.build_iterate_config)
    with exit_on_input_error():
        demo = demo_chain.parse_demo_settings(args.demo)
        it = iterate_rounds.parse_iterate_settings(args.iterate)
        build_verifier(cfg.task)  # a checker that cannot be imported fails here, before Ray starts
    print_config(cfg)
    print(f"[iterate] settings: {json.dumps(asdict(it))}; task and sampling: {json.dumps(asdict(demo))}", flush=True)
    with exit_on_input_error():
        start_ray(cfg, needs_state_api=False)
        if args.seeds <= 1:
            return iterate_rounds.run_iterate(cfg, demo, it)
        cfgs = derive_seed_configs(cfg, args.seeds)
        summaries = run_over_seeds(cfgs, functools.partial(iterate_rounds.run_iterate, demo=demo, it=it),
                                   demo_chain.count_chain_cpus(cfg, demo))
    return report_seeds(cfg, cfgs, summaries, iterate_seed_labels(it), "iterate")


def main_make_pairs(argv: list[str] | None = None) -> dict[str, Any]:
    """``dpo-ray make-pairs``: self-generated pairs from a model, on the demo's task splits."""
    parser = argparse.ArgumentParser(description="Self-generated preference pairs for the arithmetic task.")
    parser.add_argument("--model", required=True, help="Hugging Face directory of the model that answers")
    parser.add_argument("--output", required=True, help="directory for train.jsonl, heldout.jsonl, report.json")
    add_demo_settings_argument(parser)
    args = parser.parse_args(argv)
    with exit_on_input_error():
        demo = demo_chain.parse_demo_settings(args.demo)
    init_ray(needs_state_api=False)  # Ray Data actors only: no placement groups to free
    out = Path(args.output)
    report = demo_chain.make_pairs(demo, args.model, out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for split, r in report.items():
        print(f"{split}: {r['pairs']} pairs from {r['prompts_with_pairs']}/{r['prompts']} prompts -> {r['file']} "
              f"(sample accuracy {r['sample_accuracy']:.3f}, pass@k {r['pass_at_k']:.3f})")
    return report


# ------------------------------------------------------------------------------------ tiny model


def main_make_tiny_model(argv: list[str] | None = None) -> str:
    """``dpo-ray make-tiny-model``: a random-init Llama or Qwen2 and its BPE tokenizer, offline (a HF directory)."""
    parser = argparse.ArgumentParser(description="Build a tiny random-init causal LM and its tokenizer, offline.")
    parser.add_argument("--output", required=True, help="directory to write the model and tokenizer to")
    parser.add_argument("--texts", default=str(REPO_ROOT / BUNDLED_HH_DATA),
                        help="JSONL(.gz) with 'chosen'/'rejected' strings to train the tokenizer on "
                             "(default: the bundled HH sample)")
    parser.add_argument("--architecture", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model.tiny setting, e.g. --set hidden_size=64 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        settings = build_settings(TinyModelSettings, [f"architecture={args.architecture}", *args.overrides])
        texts = read_texts_or_fail(Path(args.texts), settings.tokenizer_texts)
    out = make_tiny_model(args.output, texts, settings, seed=args.seed)
    print(f"tiny {settings.architecture} model: {out}")
    print(f"parameters: {count_saved_parameters(out):,}")
    return out


def read_texts_or_fail(path: Path, max_rows: int) -> list[str]:
    if not path.exists():
        raise ConfigError(f"texts file not found: {path}")
    texts = read_tokenizer_texts(path, max_rows)
    if not texts:
        raise ConfigError(f"no 'chosen'/'rejected' strings in {path}")
    return texts


# ------------------------------------------------------------------------------------ dispatch


COMMANDS: dict[str, Callable[[list[str] | None], Any]] = {
    "train": main_train,
    "sweep": main_sweep,
    "sft": main_sft,
    "demo": main_demo,
    "iterate": main_iterate,
    "make-pairs": main_make_pairs,
    "make-tiny-model": main_make_tiny_model,
}


def main(argv: list[str] | None = None) -> None:
    """``dpo-ray <command> [options]``; only options (or none) mean ``train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
        return
    if not argv or argv[0].startswith("-"):
        argv = ["train", *argv]
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[command](rest)


if __name__ == "__main__":
    main()
