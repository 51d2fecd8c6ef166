"""What a training objective gives the shared worker loop (:mod:`dpo_ray.train_loop`), and the registry
that names them, so ``train_loop_config`` stays serialisable (``{"objective": "dpo"}``)."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from dpo_ray.config import Config
from dpo_ray.dpo import DPOObjective
from dpo_ray.sft_objective import SFTObjective


class Objective(Protocol):
    """One training objective. ``read_rows`` gives the worker's shard as a sequence of rows (a
    :class:`~dpo_ray.shard_columns.ShardColumns`, which makes a row object only when it is indexed); rows have
    ``row_id`` and ``num_tokens``.

    ``compute_micro`` returns (the tensor to backward, already weighted as the micro-batch's share of the
    step; the [] unweighted loss, checked for NaN/inf; float sums over the micro-batch, keyed by
    ``window_keys``). The loop adds the sums over a logging window and all workers, then
    ``summarize_window`` turns them into train metrics (``loss`` at least).
    """

    checkpoint_score: str | None  # report metric that ranks kept checkpoints (None: keep the newest)
    window_keys: tuple[str, ...]
    log_at_reports: bool  # also write a progress line at every evaluation

    def __init__(self, cfg: Config, lm: torch.nn.Module, pad_id: int, device: torch.device): ...

    @staticmethod
    def read_rows(shard) -> Sequence: ...

    def trainable_module(self) -> torch.nn.Module: ...

    def attach(self, model: torch.nn.Module, model_path: str) -> None: ...

    def compute_micro(
        self, rows: Sequence, step_rows: Sequence
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]: ...

    def summarize_window(self, total: dict[str, float]) -> dict[str, float]: ...

    def evaluate(self, rows: Sequence, model: torch.nn.Module) -> dict[str, float]: ...

    def format_progress(
        self, step: int, total: int, train: dict[str, float], rows_per_s: float, eta_s: float, lr: float
    ) -> str: ...

    def train_scalars(self, train: dict[str, float]) -> dict[str, float]: ...

    def format_eval(self, step: int, metrics: dict[str, Any]) -> str | None: ...


OBJECTIVES: dict[str, type] = {"dpo": DPOObjective, "sft": SFTObjective}


def resolve_objective(name: str) -> type:
    """The objective class registered as ``name``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]
