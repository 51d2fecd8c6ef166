"""Optimizer, learning-rate schedule and the training state they resume with."""

from __future__ import annotations

import enum
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dpo_ray.checkpointing import TrainState, load_training_state
from dpo_ray.config import Config


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(
        params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, fused=cfg.train.fused_optimizer or None
    )


def warm_up(step: int, warmup: int) -> float | None:
    """The warmup factor ``step / warmup`` while ``step < warmup``, else None."""
    return float(step) / float(max(1, warmup)) if step < warmup else None


def scale_linear(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to 0 at ``total``."""
    up = warm_up(step, warmup)
    return up if up is not None else max(0.0, float(total - step) / float(max(1, total - warmup)))


def scale_cosine(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup, then half a cosine down to 0 at ``total``."""
    up = warm_up(step, warmup)
    if up is not None:
        return up
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def scale_constant(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup, then the full learning rate."""
    up = warm_up(step, warmup)
    return up if up is not None else 1.0


class LrSchedule(enum.Enum):
    """``train.lr_schedule``: the factor on the learning rate at each step. The formulas of transformers'
    ``get_scheduler`` (linear, cosine, constant_with_warmup), as Hugging Face (and TRL) users know them; written
    here because importing transformers' schedules imports peft too, 1.4 s (up to 4 s on a busy machine) in every
    Ray worker process, a sweep trial's included."""

    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"

    def build(self, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
        scale = {LrSchedule.LINEAR: scale_linear, LrSchedule.COSINE: scale_cosine,
                 LrSchedule.CONSTANT: scale_constant}[self]
        return LambdaLR(optimizer, partial(scale, warmup=warmup, total=total))


def build_scheduler(cfg: Config, optimizer, total_steps: int) -> LambdaLR:
    return LrSchedule(cfg.train.lr_schedule).build(optimizer, cfg.train.warmup_steps, max(total_steps, 1))


def build_optimization(
    cfg: Config, params: list, total_steps: int, ckpt_dir: Path | None
) -> tuple[torch.optim.Optimizer, Any, TrainState]:
    """Optimizer, LR scheduler and training state, restored from ``ckpt_dir`` when resuming."""
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    state = load_training_state(ckpt_dir, optimizer, scheduler) if ckpt_dir is not None else TrainState()
    return optimizer, scheduler, state
