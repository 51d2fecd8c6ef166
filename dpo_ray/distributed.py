"""Collectives over the training workers and gradient clipping that knows about FSDP shards.

Every helper also works in a single process (no process group): the sums and maxima are then local.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Elementwise sum of ``values`` over all workers, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max_many(values: list[float], device: torch.device) -> list[float]:
    """Elementwise maximum of ``values`` over all workers, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    return all_reduce_max_many([value], device)[0]


def is_fsdp_module(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an FSDP1 ``FullyShardedDataParallel`` (what Ray Train's ``prepare_model(
    parallel_strategy="fsdp")`` returns), whose parameters on each rank are only shards."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch build without distributed support has no FSDP either
        return False
    return isinstance(model, FullyShardedDataParallel)


def clip_gradients(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total norm ``max_norm``; returns the total norm before clipping.

    Under FSDP each rank holds a shard of every gradient, and ``torch.nn.utils.clip_grad_norm_`` would clip
    each rank by the norm of its own shard; ``FullyShardedDataParallel.clip_grad_norm_`` all-reduces the
    shards' norms into the global one. DDP (gradients already all-reduced, identical on every rank) and
    single-process models clip locally. ``max_norm <= 0`` only measures the norm.
    """
    if is_fsdp_module(model):
        return model.clip_grad_norm_(max_norm if max_norm > 0 else float("inf"))
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
