"""Driver side of a training run, for any objective (:mod:`dpo_ray.objective`): model, data, the Ray Train
TorchTrainer running :func:`~dpo_ray.train_loop.train_loop_per_worker`, the exported model and the summary.
:func:`run_dpo` is DPO's entry point; :func:`dpo_ray.sft.run_sft` prepares SFT data and runs the same way."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dpo_ray.checkpointing import build_checkpoint_config, copy_model_dir
from dpo_ray.cluster import check_cluster_resources, wait_for_idle_workers_to_exit
from dpo_ray.config import Config, resolve_data_path
from dpo_ray.interrupt import GracefulStop
from dpo_ray.modeling import load_tokenizer
from dpo_ray.objective import resolve_objective
from dpo_ray.ray_compat import release_leaked_placement_groups
from dpo_ray.tracking import metrics_file_path, read_metric_rows
from dpo_ray.train_loop import train_loop_per_worker
from dpo_ray.training_plot import PLOT_FILE, plot_training_curves

logger = logging.getLogger("dpo_ray")

SUMMARY_FILE = "summary.json"


def split_for_workers(datasets: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """Cut each dataset into one materialized shard per worker, on the driver, before training starts.

    Ray's default ``streaming_split`` hands blocks to whichever worker asks first, so the rows a worker
    sees change from run to run; that breaks exact resume and seeded determinism. ``split_at_indices``
    cuts by row position, whatever the blocks are (a cached dataset is read back in other blocks than it
    was computed in): train into equal shards (every worker takes the same number of steps; the at most
    ``num_workers - 1`` rows left over are logged), eval into contiguous shards that together hold every
    row once. So the same rows meet in the same worker, in the same order, and per-worker sums add up the
    same way. Splitting here, while no worker holds a CPU, also keeps the split tasks from waiting on CPUs
    that the training workers have reserved. Worker ``r`` reads ``<name>_<r>``.
    """
    shards: dict[str, Any] = {}
    n = max(num_workers, 1)
    for name, ds in datasets.items():
        rows = ds.count()
        if n == 1:
            parts = [ds]
        elif name == "train":
            per_worker = rows // n
            if rows - per_worker * n:
                logger.info("train: %d pair(s) left over by the equal split over %d workers", rows - per_worker * n, n)
            parts = ds.split_at_indices([per_worker * r for r in range(1, n + 1)])[:n]
        else:
            parts = ds.split_at_indices([rows * r // n for r in range(1, n)])
        for rank, part in enumerate(parts):
            shards[f"{name}_{rank}"] = part
    return shards


def prepare_model_path(cfg: Config) -> str:
    """``model.name_or_path`` (hub id or local directory), or a tiny model built from the train data."""
    if cfg.model.name_or_path:
        return resolve_data_path(cfg.model.name_or_path)
    from dpo_ray.data.reading import read_preference_texts
    from dpo_ray.tiny_model import make_cached_tiny_model

    texts = read_preference_texts(resolve_data_path(cfg.data.train), cfg.model.tiny.tokenizer_texts)
    path = make_cached_tiny_model(cfg.resolved_cache_dir() / "models", texts, cfg.model.tiny, seed=cfg.train.seed)
    logger.info("built tiny model at %s", path)
    return path


def write_resolved_config(cfg: Config) -> Path:
    out = cfg.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path


def build_loop_config(cfg: Config, objective: str, model_path: str, pad_id: int, has_eval: bool) -> dict[str, Any]:
    """What :class:`~dpo_ray.train_loop.WorkerLoop` reads (``train_loop_config``): the config as a dict, the
    objective's name, model and tokenizer paths, the pad id and whether there is an eval shard."""
    return {"cfg": cfg.to_dict(), "objective": objective, "model_path": model_path, "tokenizer_path": model_path,
            "pad_id": pad_id, "has_eval": has_eval}


def build_trainer(cfg: Config, datasets: dict[str, Any], model_path: str, pad_id: int, callbacks=None,
                  objective: str = "dpo"):
    """A TorchTrainer training ``objective`` (a name in :data:`dpo_ray.objective.OBJECTIVES`) for ``cfg``;
    the same run name and storage path resume from the latest checkpoint. ``datasets``: train (and eval)."""
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=build_loop_config(cfg, objective, model_path, pad_id, has_eval="eval" in datasets),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.resolved_storage_path(),
            checkpoint_config=build_checkpoint_config(
                cfg, score_attribute=resolve_objective(objective).checkpoint_score
            ),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
        datasets=split_for_workers(datasets, cfg.scaling.num_workers),
        # Each worker reads its own pre-cut shard ("train_<rank>"), so nothing is split again here.
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def start_run(cfg: Config) -> None:
    """Before any data or model: the resolved config on disk, leaked placement groups freed, resources checked."""
    write_resolved_config(cfg)
    release_leaked_placement_groups()
    check_cluster_resources(cfg)


def fit_trainer(cfg: Config, trainer):
    """Run ``trainer`` with SIGINT/SIGTERM asking for a checkpointed stop, then draw its curves
    (:func:`write_training_plot`, for every objective): (result, interrupted, exit code)."""
    if cfg.scaling.num_workers == 0:
        waited = wait_for_idle_workers_to_exit()
        if waited >= 0.5:
            logger.info("waited %.1f s for the data stage's idle Ray workers to exit before training here", waited)
    with GracefulStop([cfg.run_name]) as stopper:
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    interrupted = bool((result.metrics or {}).get("interrupted")) or stopper.signum is not None
    write_training_plot(cfg)
    return result, interrupted, stopper.exit_code


def write_training_plot(cfg: Config) -> Path | None:
    """``<output_dir>/training.png`` from the run's metrics file, which holds the steps before any resume too;
    None, and no picture of an earlier run left behind, when the run logged nothing to draw."""
    source = metrics_file_path(cfg)
    rows, bad = read_metric_rows(source)
    if bad:
        logger.warning("%s: %d unreadable line(s) left out of the picture (line %s)", source, len(bad), bad[:5])
    path = cfg.resolved_output_dir() / PLOT_FILE
    last_step = max((r["step"] for r in rows), default=0)
    try:
        drawn = plot_training_curves(rows, path, title=f"run {cfg.run_name!r}: training curves to step {last_step}")
        reason = f"nothing to draw in {len(rows)} row(s)"
    except ValueError as exc:  # a row that cannot be drawn must not cost the trained model its export
        drawn, reason = None, str(exc)
    if drawn is None or drawn.path is None:
        path.unlink(missing_ok=True)  # no picture of an earlier run left beside this run's summary
        logger.warning("%s: %s; %s not written", source, reason, PLOT_FILE)
        return None
    return drawn.path


def find_training_plot(cfg: Config) -> str | None:
    """The picture :func:`fit_trainer` drew for this run, if it drew one."""
    path = cfg.resolved_output_dir() / PLOT_FILE
    return str(path) if path.exists() else None


def export_final_model(cfg: Config, result) -> str:
    """Copy the result checkpoint's model (and LoRA adapter when kept) under ``output_dir``; the model's path."""
    out = cfg.resolved_output_dir()
    with result.checkpoint.as_directory() as ckpt:
        final_dir = str(copy_model_dir(Path(ckpt) / "model", out / "final_model"))
        if cfg.model.lora.enabled and cfg.model.lora.save_adapter and (Path(ckpt) / "adapter").exists():
            copy_model_dir(Path(ckpt) / "adapter", out / "final_adapter")
    return final_dir


def pad_token_id(model_path: str, cfg: Config) -> int:
    return int(load_tokenizer(model_path, cfg.model.trust_remote_code).pad_token_id)


SUMMARY_METRICS = (
    "eval_accuracy",
    "eval_accuracy_strict",
    "eval_loss",
    "eval_reward_margin",
    "eval_rewards_chosen",
    "eval_rewards_rejected",
    "eval_logps_chosen",
    "eval_logps_rejected",
    "train_loss",
    "train_accuracy",
    "pairs_per_second",
    "tokens_per_second",
    "train_seconds",
    "nonfinite_skips",
    "skipped_row_ids",
    "peak_memory_mb",
)


def build_summary(
    cfg: Config,
    metrics: dict[str, Any],
    prepared,
    final_model_dir: str,
    wall_seconds: float,
    checkpoint_path: str | None,
) -> dict[str, Any]:
    summary = {k: metrics.get(k) for k in SUMMARY_METRICS}
    summary.update(
        {
            "train_pairs": prepared.train_pairs,
            "eval_pairs": metrics.get("eval_pairs", prepared.eval_pairs),
            "steps": metrics.get("step"),
            "wall_seconds": round(wall_seconds, 2),
            "reference_passes": prepared.reference_passes,
            "final_model_dir": final_model_dir,
            "checkpoint_path": checkpoint_path,
            "data_report": str(cfg.resolved_output_dir() / "data_report.json"),
            "training_plot": find_training_plot(cfg),
            "config": cfg.to_dict(),
        }
    )
    return summary


def run_dpo(cfg: Config, callbacks=None, prepared=None, model_path: str | None = None) -> dict[str, Any]:
    """Prepare model and data, train, export the final policy and write ``summary.json``.

    ``prepared`` and ``model_path`` let a sweep hand in data prepared once for all its trials.
    """
    from dpo_ray.data.pipeline import prepare_data  # the data layer is heavy; a sweep hands in its data

    start = time.perf_counter()
    start_run(cfg)
    if model_path is None:
        model_path = prepare_model_path(cfg)
    if prepared is None:
        ref_path = cfg.resolve_reference_path(model_path) if cfg.dpo.reference == "precomputed" else None
        prepared = prepare_data(cfg, tokenizer_path=model_path, reference_model_path=ref_path)
    trainer = build_trainer(
        cfg, {"train": prepared.train, "eval": prepared.eval}, model_path, pad_token_id(model_path, cfg), callbacks
    )
    result, interrupted, exit_code = fit_trainer(cfg, trainer)
    return finish_run(cfg, result, prepared, time.perf_counter() - start, interrupted, exit_code)


def finish_run(cfg: Config, result, prepared, wall_seconds: float, interrupted: bool = False,
               exit_code: int = 0) -> dict[str, Any]:
    """Export the final policy from ``result`` (a Ray ``Result``, or anything with its ``metrics`` and
    ``checkpoint``) unless the run was interrupted, and write ``summary.json``; returns the summary."""
    final_dir = export_final_model(cfg, result) if result.checkpoint is not None and not interrupted else ""
    summary = build_summary(
        cfg,
        result.metrics or {},
        prepared,
        final_dir,
        wall_seconds,
        result.checkpoint.path if result.checkpoint else None,
    )
    summary["interrupted"] = interrupted
    summary["exit_code"] = exit_code
    (cfg.resolved_output_dir() / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary
