"""Optimizer, learning-rate schedule and the training state they resume with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from dpo_ray.checkpointing import TrainState, load_training_state
from dpo_ray.config import Config


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(
        params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, fused=cfg.train.fused_optimizer or None
    )


def build_scheduler(cfg: Config, optimizer, total_steps: int):
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.lr_schedule]
    return get_scheduler(
        name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=max(total_steps, 1)
    )


def build_optimization(
    cfg: Config, params: list, total_steps: int, ckpt_dir: Path | None
) -> tuple[torch.optim.Optimizer, Any, TrainState]:
    """Optimizer, LR scheduler and training state, restored from ``ckpt_dir`` when resuming."""
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    state = load_training_state(ckpt_dir, optimizer, scheduler) if ckpt_dir is not None else TrainState()
    return optimizer, scheduler, state
