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


def decay_linear(step: int, warmup: int, total: int) -> float:
    """After warmup: linear down to 0 at ``total``."""
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def decay_cosine(step: int, warmup: int, total: int) -> float:
    """After warmup: half a cosine down to 0 at ``total``."""
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def decay_none(step: int, warmup: int, total: int) -> float:
    """After warmup: the full learning rate."""
    return 1.0


def scale_lr(step: int, *, warmup: int, total: int, decay) -> float:
    """The factor on the learning rate at ``step``: linear warmup over ``warmup`` steps, then ``decay``."""
    return float(step) / float(max(1, warmup)) if step < warmup else decay(step, warmup, total)


class LrSchedule(enum.Enum):
    """``train.lr_schedule``: the factor on the learning rate at each step. The formulas of transformers'
    ``get_scheduler`` (linear, cosine, constant_with_warmup), as Hugging Face (and TRL) users know them; written
    here because importing transformers' schedules imports peft too, 1.4 s (up to 4 s on a busy machine) in every
    Ray worker process, a sweep trial's included."""

    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"

    def build(self, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
        decay = {LrSchedule.LINEAR: decay_linear, LrSchedule.COSINE: decay_cosine,
                 LrSchedule.CONSTANT: decay_none}[self]
        return LambdaLR(optimizer, partial(scale_lr, warmup=warmup, total=total, decay=decay))


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
