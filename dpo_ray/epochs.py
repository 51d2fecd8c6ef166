"""Which rows each optimizer step takes: seeded epoch plans, micro-batches and the run's step count."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dpo_ray.batching import order_by_length_buckets
from dpo_ray.checkpointing import TrainState
from dpo_ray.config import Config
from dpo_ray.shard_columns import count_row_tokens


def plan_epoch(rows: Sequence, pairs_per_step: int, seed: int, epoch: int, bucketing: bool,
               shuffle: bool = True) -> list[list[int]]:
    """Batches (lists of row indices) of one epoch; the same on every run for the same seed and epoch.

    ``rows``: a :class:`~dpo_ray.shard_columns.ShardColumns` or rows with a ``num_tokens`` (for bucketing).
    ``shuffle=False`` keeps the rows' own order (consecutive ``pairs_per_step`` rows per step, no bucketing).
    """
    if not shuffle:
        return [list(range(i, min(i + pairs_per_step, len(rows)))) for i in range(0, len(rows), pairs_per_step)]
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    if bucketing:
        return order_by_length_buckets(count_row_tokens(rows), pairs_per_step, gen)
    perm = torch.randperm(len(rows), generator=gen).tolist()
    return [perm[i : i + pairs_per_step] for i in range(0, len(perm), pairs_per_step)]


class EpochPlanner:
    """The rows of each optimizer step, epoch after epoch: the seeded :func:`plan_epoch` of ``state.epoch``,
    batch ``state.batch_in_epoch``. It moves ``state`` on to the next epoch when one is used up; the
    training loop counts ``batch_in_epoch`` up, so every objective resumes alike."""

    def __init__(self, rows: Sequence, rows_per_step: int, cfg: Config):
        self.rows, self.rows_per_step, self.cfg = rows, rows_per_step, cfg
        self.plan: list[list[int]] = []
        self.planned_epoch = -1

    def take_step_rows(self, state: TrainState) -> list:
        """Rows of the next step (``rows_per_step`` of them, fewer at an epoch's end)."""
        while True:
            if self.planned_epoch != state.epoch:
                self.plan = plan_epoch(self.rows, self.rows_per_step, self.cfg.train.seed, state.epoch,
                                       self.cfg.train.length_bucketing, self.cfg.train.shuffle)
                self.planned_epoch = state.epoch
                if not self.plan:
                    raise ValueError("no training rows in this worker's shard")
            if state.batch_in_epoch < len(self.plan):
                return [self.rows[i] for i in self.plan[state.batch_in_epoch]]  # made here, only the step's rows
            state.epoch += 1
            state.batch_in_epoch = 0


def split_micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """``indices`` cut into consecutive chunks of ``micro_batch_size`` (the last may be shorter)."""
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


def count_steps(cfg: Config, num_rows: int, world: int) -> tuple[int, int]:
    """(rows per worker per optimizer step, total optimizer steps): ``train.max_steps``, else
    ``train.epochs`` passes over this worker's ``num_rows``."""
    per_step = max(1, cfg.train.batch_size // max(world, 1))
    return per_step, cfg.train.max_steps or cfg.train.epochs * math.ceil(num_rows / per_step)
