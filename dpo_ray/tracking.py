"""What a training worker tells people: console lines, TensorBoard/MLflow scalars, the run's metrics file (what
``training.png`` is drawn from), peak memory."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

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


METRICS_DIR = "metrics"


def metrics_file_path(cfg: Config) -> Path:
    """``<output_dir>/metrics/<run_name>.jsonl``: one run's scalars, beside ``tensorboard/<run_name>``."""
    return Path(cfg.resolved_output_dir()) / METRICS_DIR / f"{cfg.run_name}.jsonl"


def read_metric_rows(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a metrics file, in file order, and the numbers of the lines that are not a JSON object
    with an integer ``step`` (a line cut short when a worker was killed mid-write); no file: no rows."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    if not path.exists():
        return rows, bad
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


class MetricsFile:
    """Rank 0's scalars as JSON lines, ``{"step": s, "<name>": value, ...}`` per logging call, names as in
    TensorBoard (non-finite values as null). Plain files survive a resume, and the driver reads them back.

    A resumed run continues from its checkpoint's step, so rows that an earlier attempt wrote after that
    step are stale: the first row this writer writes drops every earlier row at or after its own step. The
    rows before it are the history the picture keeps.
    """

    def __init__(self, path: Path):
        self.path = path
        self.pruned = False

    def write(self, metrics: dict[str, Any], step: int) -> None:
        if not self.pruned:
            self.drop_rows_from(step)
            self.pruned = True
        values = {k: (v if math.isfinite(v) else None) for k, v in metrics.items() if is_scalar(v)}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def drop_rows_from(self, step: int) -> None:
        """Rewrite the file (atomically) without the rows at ``step`` or later, nor unreadable lines."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows, bad = read_metric_rows(self.path)
        if bad:
            logger.warning("%s: %d unreadable line(s) dropped (line %s)", self.path, len(bad), bad[:5])
        kept = [r for r in rows if r["step"] < step]
        if len(kept) < len(rows):
            logger.info("%s: %d row(s) after step %d dropped (an earlier attempt's)", self.path,
                        len(rows) - len(kept), step - 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def open_metric_writers(cfg: Config, rank: int):
    """On rank 0: the run's metrics file, TensorBoard (when installed), MLflow (when installed and
    MLFLOW_TRACKING_URI is set)."""
    if rank != 0:
        return []
    writers: list[Any] = [MetricsFile(metrics_file_path(cfg))]
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
        if isinstance(w, MetricsFile):
            w.write(metrics, step)
        elif hasattr(w, "add_scalar"):
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
