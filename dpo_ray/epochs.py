"""Which rows each optimizer step takes: seeded epoch plans, micro-batches and the run's step count."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dpo_ray.batching import order_by_length_buckets
from dpo_ray.checkpointing import TrainState
from dpo_ray.config import AUTO, Config
from dpo_ray.shard_columns import count_row_tokens

# train.micro_batch_tokens=auto on CPU. Activations share the machine's RAM with everything else, and CPU matmuls run
# about as fast at 512 tokens per forward as at 4k: benchmarks/step_memory.py (the CPU benchmark's 20M-parameter
# model, 20 steps of 8 HH pairs, 2 threads, 2-core VM) measured budgets none / 1024 / 512 at 1.29 / 1.19 / 1.28 s per
# step and peak RSS 2,338 / 1,208 / 1,029 MB. GPUs want long forwards, so auto sets no budget there.
CPU_MICRO_BATCH_TOKENS = 512


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


def resolve_micro_batch_tokens(value: int | str, device: torch.device) -> int:
    """``train.micro_batch_tokens`` as a number: auto is :data:`CPU_MICRO_BATCH_TOKENS` on CPU, 0 (no budget) else."""
    if value == AUTO:
        return CPU_MICRO_BATCH_TOKENS if device.type == "cpu" else 0
    return int(value)


def plan_micro_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """The forward passes of one optimizer step: indices into its rows (``lengths[i]``: row i's tokens).

    Each micro-batch holds at most ``max_rows`` rows and, when ``max_tokens`` > 0, at most ``max_tokens`` padded
    tokens (rows x its longest row; a longer row goes alone), so a step's activation memory is bounded by the
    budget whatever the rows' lengths. With a budget, rows are taken shortest first, so each micro-batch pads
    little; each micro-batch lists its rows in their step order. Which rows share a forward does not change the
    step's loss or gradient (each micro-batch's loss is weighted by its share of the step's rows).
    """
    if max_tokens <= 0:
        return split_micro_batches(list(range(len(lengths))), max_rows)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda j: (lengths[j], j)):
        grown = max(longest, lengths[i])
        if current and (len(current) >= max_rows or (len(current) + 1) * grown > max_tokens):
            batches.append(sorted(current))
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(sorted(current))
    return batches


def split_to_count(batches: list[list[int]], count: int, lengths: Sequence[int]) -> list[list[int]]:
    """``batches`` (from :func:`plan_micro_batches`) cut further until there are ``count``: the one with the most
    padded tokens is halved first. Workers whose rows need fewer forwards than another's run as many as it does,
    because FSDP's collectives must match (``count`` <= rows, as each worker has the same number of rows)."""
    batches = [list(b) for b in batches]
    while len(batches) < count:
        k = max(range(len(batches)), key=lambda j: len(batches[j]) * max(lengths[i] for i in batches[j]))
        if len(batches[k]) < 2:
            raise ValueError(f"cannot split {sum(map(len, batches))} rows into {count} micro-batches")
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


def count_steps(cfg: Config, num_rows: int, world: int) -> tuple[int, int]:
    """(rows per worker per optimizer step, total optimizer steps): ``train.max_steps``, else
    ``train.epochs`` passes over this worker's ``num_rows``."""
    per_step = max(1, cfg.train.batch_size // max(world, 1))
    return per_step, cfg.train.max_steps or cfg.train.epochs * math.ceil(num_rows / per_step)
