"""The train workflow's steps, kept here so ``workflows/train.py`` stays a thin script."""

from __future__ import annotations

import sys

from dpo_ray.cli import build_parser, exit_on_input_error, parse_config, print_config


def format_summary(summary: dict) -> str:
    keys = ("eval_accuracy", "eval_accuracy_strict", "eval_loss", "eval_reward_margin", "train_pairs", "eval_pairs",
            "steps", "pairs_per_second", "wall_seconds", "reference_passes")
    lines = [f"  {k:22s} {summary.get(k)}" for k in keys]
    return "\n".join(lines)


def main_train(argv: list[str] | None = None) -> dict:
    """Parse, build, run, print where the results are."""
    from dpo_ray.cluster import init_ray
    from dpo_ray.trainer import SUMMARY_FILE, run_dpo

    _, cfg = parse_config(build_parser("Train a policy with DPO on Ray Train."), argv)
    print_config(cfg)
    init_ray()
    with exit_on_input_error():
        summary = run_dpo(cfg)
    if summary["interrupted"]:
        print(f"[dpo-ray] interrupted at step {summary['steps']}; checkpoint at {summary['checkpoint_path']}. "
              "Run the same command again to resume.", file=sys.stderr)
        raise SystemExit(summary["exit_code"] or 130)
    print("[dpo-ray] done:\n" + format_summary(summary))
    print(f"[dpo-ray] summary: {cfg.resolved_output_dir() / SUMMARY_FILE}")
    print(f"[dpo-ray] final model: {summary['final_model_dir']}")
    return summary
