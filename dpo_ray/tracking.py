"""What a training worker tells people: console lines, TensorBoard/MLflow scalars, peak memory."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

from dpo_ray.config import Config

logger = logging.getLogger("dpo_ray")


def say(message: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver and the job log.

    Not ``print``: Ray Train patches print into its logger, and the line then shows up twice.
    """
    sys.stdout.write(f"[dpo-ray] {message}\n")
    sys.stdout.flush()


def format_eta(eta_s: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))


def open_metric_writers(cfg: Config, rank: int):
    """TensorBoard on rank 0 (and MLflow when installed and MLFLOW_TRACKING_URI is set)."""
    if rank != 0:
        return []
    writers = []
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may be missing

        writers.append(SummaryWriter(log_dir=str(Path(cfg.resolved_output_dir()) / "tensorboard" / cfg.run_name)))
    except Exception as exc:  # tensorboard missing: the metrics still go to Ray and the log
        logger.warning("TensorBoard logging off: %s", exc)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            import mlflow  # optional

            mlflow.set_experiment(cfg.run_name)
            mlflow.start_run(run_name=cfg.run_name)
            writers.append(mlflow)
        except ImportError:
            logger.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed")
    return writers


def log_metrics(writers, metrics: dict[str, float], step: int) -> None:
    """The numeric entries of ``metrics`` to every writer at ``step``."""
    for w in writers:
        if hasattr(w, "add_scalar"):
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    w.add_scalar(k, v, step)
            w.flush()
        else:
            w.log_metrics(
                {k.replace("/", "_"): v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step
            )


def close_metric_writers(writers) -> None:
    for w in writers:
        if hasattr(w, "close"):
            w.close()


def peak_memory_mb() -> float:
    """Peak resident memory of this worker process (and peak CUDA memory when on GPU)."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if torch.cuda.is_available():
        return max(rss_mb, torch.cuda.max_memory_allocated() / 2**20)
    return rss_mb
