"""The SFT objective: maximum likelihood on the preferred responses (the DPO paper's reference policy and
Preferred-FT baseline). The loss is the token-mean NLL of the response tokens; prompt and padding are masked.

No Ray here: the training loop (:mod:`dpo_ray.train_loop`) hands in the dataset shard and the wrapped model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from dpo_ray.batching import build_sft_batch
from dpo_ray.config import Config
from dpo_ray.distributed import all_reduce_max, all_reduce_sum
from dpo_ray.epochs import split_micro_batches
from dpo_ray.modeling import ResponseNLL, reads_head_weight
from dpo_ray.precision import in_eval_mode, resolve_config_precision
from dpo_ray.shard_columns import ShardColumns, read_shard_columns

SFT_EVAL_KEYS = ("nll_sum", "tokens", "count")
SFT_TOKEN_FIELDS = {"prompt": "prompt_ids", "response": "response_ids"}  # SFTExample attribute -> shard column


@dataclass
class SFTExample:
    """One tokenized example: the prompt (with BOS) and the target response (with EOS)."""

    row_id: str
    prompt: list[int]
    response: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.response)

    def as_example(self) -> tuple[list[int], list[int]]:
        return self.prompt, self.response


def collect_sft_examples(shard) -> ShardColumns:
    """All rows of this worker's shard, in shard order, held as int32 columns; indexing makes an
    :class:`SFTExample` (see :mod:`dpo_ray.shard_columns`)."""
    return read_shard_columns(shard, SFT_TOKEN_FIELDS, SFTExample)


@torch.no_grad()
def evaluate_sft(scorer: torch.nn.Module, examples: Sequence[SFTExample], pad_id: int, micro_batch_size: int,
                 device: torch.device, autocast=None) -> dict[str, float]:
    """Held-out mean response-token NLL over all workers' eval shards (each example counts once).

    ``scorer``: a :class:`~dpo_ray.modeling.ResponseNLL` (or its FSDP wrapping). Every worker runs the same
    number of forward passes (a shorter shard repeats its last chunk without counting it), so FSDP's
    collectives stay matched. ``autocast``: a context factory (the precision recipe's).
    """
    chunks = split_micro_batches(list(range(len(examples))), micro_batch_size)  # row indices
    n_chunks = int(all_reduce_max(float(len(chunks)), device))
    sums = dict.fromkeys(SFT_EVAL_KEYS, 0.0)
    with in_eval_mode(scorer):
        for c in range(n_chunks):
            chunk = chunks[c] if c < len(chunks) else (chunks[-1] if chunks else [])
            if not chunk:
                continue
            batch = build_sft_batch([examples[i].as_example() for i in chunk], pad_id, device)
            with autocast() if autocast else contextlib.nullcontext():
                nll, tokens = scorer(batch)
            if c < len(chunks):
                sums["nll_sum"] += nll.item()
                sums["tokens"] += tokens.item()
                sums["count"] += len(chunk)
    total = dict(zip(SFT_EVAL_KEYS, all_reduce_sum([sums[k] for k in SFT_EVAL_KEYS], device)))
    if total["count"] == 0:
        return {}
    return {"eval_loss": total["nll_sum"] / max(total["tokens"], 1.0), "eval_examples": int(total["count"])}


class SFTObjective:
    """SFT for the shared worker loop: a :class:`~dpo_ray.modeling.ResponseNLL` around the causal LM (the fused
    head, as DPO's scorer) is wrapped; each step minimizes the token-mean NLL of its examples' responses."""

    checkpoint_score = None  # the newest checkpoints are kept
    window_keys = ("nll", "tokens")
    log_at_reports = True  # a progress line at every evaluation, so the reported train_loss is fresh

    def __init__(self, cfg: Config, lm: torch.nn.Module, pad_id: int, device: torch.device):
        self.cfg, self.lm, self.pad_id, self.device = cfg, lm, pad_id, device
        self.recipe = resolve_config_precision(cfg, device)
        self.scorer = ResponseNLL(lm, cfg.train.logits_chunk_size, cfg.train.response_only_logits,
                                  fused_linear_head=reads_head_weight(cfg))
        self.model: torch.nn.Module = self.scorer

    read_rows = staticmethod(collect_sft_examples)

    def trainable_module(self) -> torch.nn.Module:
        return self.scorer

    def attach(self, model: torch.nn.Module, model_path: str) -> None:
        self.model = model

    def compute_micro(self, rows: Sequence[SFTExample], step_rows: Sequence[SFTExample]):
        """(loss to backward: the micro-batch's NLL over the step's response tokens, [] NLL, window sums)."""
        step_tokens = float(sum(len(r.response) for r in step_rows))
        with self.recipe.autocast():
            nll, tokens = self.model(build_sft_batch([r.as_example() for r in rows], self.pad_id, self.device))
        return nll / step_tokens, nll, {"nll": nll.item(), "tokens": tokens.item()}

    def summarize_window(self, total: dict[str, float]) -> dict[str, float]:
        return {"loss": total["nll"] / max(total["tokens"], 1.0)}

    def evaluate(self, rows: Sequence[SFTExample], model: torch.nn.Module) -> dict[str, float]:
        return evaluate_sft(model, rows, self.pad_id, self.cfg.train.micro_batch_size, self.device,
                            autocast=self.recipe.autocast)

    def format_progress(self, step: int, total: int, train: dict[str, float], rows_per_s: float, eta_s: float,
                        lr: float) -> str:
        return f"sft step {step}/{total} | loss {train['loss']:.4f} | lr {lr:.2e}"

    def train_scalars(self, train: dict[str, float]) -> dict[str, float]:
        return {"train/loss": train["loss"]}

    def format_eval(self, step: int, metrics: dict) -> str | None:
        return f"sft eval at step {step}: loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else None
