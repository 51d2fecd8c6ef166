"""The sweep's results, read from Tune's ``ResultGrid``: one row per trial, results.csv, best.json, the summary.

Rows name the sampled values by the config's own dotted keys (``dpo.beta``, ``train.learning_rate``, any
``sweep.extra`` key); metrics, sampled config and error come from each trial's ``Result``, the status from Tune's
experiment state (see :func:`read_trial_statuses`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml
from ray.tune import ExperimentAnalysis, ResultGrid

from dpo_ray.checkpointing import copy_model_dir
from dpo_ray.config import Config
from dpo_ray.sweep.plot import is_finite_number, plot_accuracy_map
from dpo_ray.sweep.space import TRIALS_DIR, list_sampled_keys, read_dotted
from dpo_ray.sweep.tuner import resolve_experiment_path

RESULTS_FILE = "results.csv"
BEST_FILE = "best.json"
SUMMARY_FILE = "sweep_summary.json"
PLOT_FILE = "sweep_accuracy.png"
BEST_MODEL_DIR = "best_model"
METRIC_KEYS = ("eval_accuracy", "eval_loss", "eval_reward_margin")


def read_trial_statuses(cfg: Config) -> dict[str, str]:
    """{trial id: Tune's status} (TERMINATED, ERROR, or PENDING/RUNNING/PAUSED for trials an interrupt left).

    A ``Result`` carries no status, and its last metrics' ``done`` flag is not reliable after a restore (Tune
    marks a finished trial's last result in place, after the experiment state may have been written), so the
    status comes from Tune's experiment state, which records each trial's.
    """
    analysis = ExperimentAnalysis(resolve_experiment_path(cfg))
    return {trial.trial_id: trial.status for trial in analysis.trials}


def read_error_line(result) -> str:
    """The last line of a trial's error (the exception itself), or ''."""
    lines = [ln.strip() for ln in str(result.error or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def build_trial_row(result, status: str, cfg: Config) -> dict[str, Any]:
    """One results.csv row: sampled values, last reported metrics, status and where the outputs are."""
    trial_id = Path(result.path).name  # Tune's trial directory is named by trial id (tuner.name_trial_dir)
    last = result.metrics or {}
    out_dir = cfg.resolved_output_dir() / TRIALS_DIR / trial_id
    completed = status == "TERMINATED" and (out_dir / "summary.json").exists()
    row: dict[str, Any] = {"trial_id": trial_id}
    row.update({key: read_dotted(result.config or {}, key) for key in list_sampled_keys(cfg)})
    row.update({key: last.get(key) for key in METRIC_KEYS})
    row.update({
        "steps": last.get("step"),
        "evaluations": last.get("training_iteration"),
        "status": status,
        "early_stopped": status == "TERMINATED" and not completed,
        "train_seconds": last.get("train_seconds"),
        "trial_seconds": last.get("time_total_s"),
        "final_model_dir": str(out_dir / "final_model") if completed else "",
        "checkpoint_path": last.get("checkpoint_path", ""),
        "error": read_error_line(result) if status == "ERROR" else "",
    })
    return row


def build_rows(grid: ResultGrid, cfg: Config) -> list[dict[str, Any]]:
    """The rows of every trial in the ``ResultGrid`` that ``Tuner.fit()`` returned, by trial id."""
    statuses = read_trial_statuses(cfg)
    rows = [build_trial_row(result, statuses.get(Path(result.path).name, "UNKNOWN"), cfg) for result in grid]
    return sorted(rows, key=lambda row: row["trial_id"])


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(rows[0]) if rows else ["trial_id"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def select_best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest final eval accuracy among those that finished training (lower loss breaks ties).

    Trials ASHA stopped early are left out: their last accuracy comes from an earlier evaluation and
    they have no final model.
    """
    done = [r for r in rows if r["final_model_dir"] and is_finite_number(r["eval_accuracy"])]
    if not done:
        return None
    return max(done, key=lambda r: (r["eval_accuracy"],
                                    -(r["eval_loss"] if is_finite_number(r["eval_loss"]) else math.inf)))


def summarize_statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        key = "EARLY_STOPPED" if r["early_stopped"] else r["status"]
        counts[key] = counts.get(key, 0) + 1
    return counts


def build_best_record(cfg: Config, best: dict[str, Any], best_model_dir: Path, timing: dict[str, Any],
                      reference_passes: int) -> dict[str, Any]:
    """best.json: the winning trial's full config, metrics, checkpoint and the sweep's cost."""
    trial_config = cfg.resolved_output_dir() / TRIALS_DIR / best["trial_id"] / "config.yaml"  # written by run_dpo
    return {
        "trial_id": best["trial_id"],
        "sampled": {key: best[key] for key in list_sampled_keys(cfg)},
        "metrics": {k: best[k] for k in (*METRIC_KEYS, "steps", "evaluations")},
        "checkpoint_path": best["checkpoint_path"],
        "best_model_dir": str(best_model_dir),
        "reference_passes": reference_passes,
        **timing,
        "config": yaml.safe_load(trial_config.read_text()),
    }


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def read_previous_totals(out_dir: Path, resumed: bool) -> dict[str, Any]:
    """Totals over the earlier invocations of a resumed sweep (from its last sweep_summary.json)."""
    path = out_dir / SUMMARY_FILE
    if not resumed or not path.exists():
        return {"invocations": 0, "reference_passes_total": 0, "wall_seconds_total": 0.0}
    previous = json.loads(path.read_text())
    return {
        "invocations": previous.get("invocations", 1),
        "reference_passes_total": previous.get("reference_passes_total", previous.get("reference_passes", 0)),
        "wall_seconds_total": previous.get("wall_seconds_total", previous.get("wall_seconds", 0.0)),
    }


def build_timing(rows: list[dict[str, Any]], wall_seconds: float, reference_passes: int, out_dir: Path,
                 resumed: bool) -> dict[str, Any]:
    """This invocation's cost, and (``*_total``) every invocation's of a resumed sweep."""
    before = read_previous_totals(out_dir, resumed)
    def total(key: str) -> float:
        return round(sum(r[key] for r in rows if is_finite_number(r[key])), 2)

    return {
        "wall_seconds": round(wall_seconds, 2),
        "trial_train_seconds_sum": total("train_seconds"),
        "trial_seconds_sum": total("trial_seconds"),
        "invocations": before["invocations"] + 1,
        "reference_passes_total": before["reference_passes_total"] + reference_passes,
        "wall_seconds_total": round(before["wall_seconds_total"] + wall_seconds, 2),
    }


def write_best(cfg: Config, rows: list[dict[str, Any]], timing: dict[str, Any], reference_passes: int,
               summary: dict[str, Any]) -> None:
    """The plot, and for the best finished trial best_model/ and best.json (recorded in ``summary``)."""
    out = cfg.resolved_output_dir()
    best = select_best_row(rows)
    summary["plot"] = str(plot_accuracy_map(rows, out / PLOT_FILE, best["trial_id"] if best else None))
    if best is None:
        return
    best_dir = copy_model_dir(Path(best["final_model_dir"]), out / BEST_MODEL_DIR)
    record = build_best_record(cfg, best, best_dir, timing, reference_passes)
    summary["best"] = {k: record[k] for k in ("trial_id", "sampled", "metrics", "best_model_dir")}
    summary["best_json"] = str(write_json(record, out / BEST_FILE))


def write_sweep_outputs(cfg: Config, rows: list[dict[str, Any]], reference_passes: int, wall_seconds: float,
                        resumed: bool) -> dict[str, Any]:
    """results.csv always; best.json, best_model/ and the plot once every trial has ended."""
    out = cfg.resolved_output_dir()
    timing = build_timing(rows, wall_seconds, reference_passes, out, resumed)
    interrupted = any(r["status"] not in ("TERMINATED", "ERROR") for r in rows)
    summary: dict[str, Any] = {
        "experiment_path": resolve_experiment_path(cfg),
        "num_trials": len(rows),
        "max_concurrent_trials": cfg.sweep.max_concurrent_trials,  # as sized from the cluster when auto
        "workers_per_trial": cfg.sweep.workers_per_trial,
        "statuses": summarize_statuses(rows),
        "reference_passes": reference_passes,
        **timing,
        "resumed": resumed,
        "interrupted": interrupted,
        "results_csv": str(write_results_csv(rows, out / RESULTS_FILE)),
        "best": None,
    }
    if not interrupted:
        write_best(cfg, rows, timing, reference_passes, summary)
    write_json(summary, out / SUMMARY_FILE)
    return summary
