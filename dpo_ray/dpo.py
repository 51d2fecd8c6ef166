"""The DPO objective: preference pairs, their reference log-probs, the DPO loss and held-out pair metrics.

No Ray here: the training loop (:mod:`dpo_ray.train_loop`) hands in the dataset shard and the wrapped model,
so GPU checks can drive the objective's math directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dpo_ray.config import Config
from dpo_ray.distributed import all_reduce_max, all_reduce_sum
from dpo_ray.epochs import split_micro_batches
from dpo_ray.losses import LossType, compute_dpo_loss, compute_pair_accuracy, compute_pair_accuracy_strict
from dpo_ray.modeling import PairLogProbs, build_reference, disabled_adapter, reads_head_weight
from dpo_ray.precision import PrecisionRecipe, in_eval_mode, resolve_config_precision
from dpo_ray.shard_columns import ShardColumns, count_row_tokens, list_row_ids, read_shard_columns
from dpo_ray.tracking import format_eta

EVAL_KEYS = (
    "acc",
    "acc_strict",
    "loss",
    "margin",
    "chosen_reward",
    "rejected_reward",
    "logps_chosen",
    "logps_rejected",
    "count",
)


# PairRow attribute -> shard column
PAIR_TOKEN_FIELDS = {"prompt": "prompt_ids", "chosen": "chosen_ids", "rejected": "rejected_ids"}
PAIR_FLOAT_FIELDS = {"ref_chosen": "ref_chosen_logps", "ref_rejected": "ref_rejected_logps"}  # precomputed only


@dataclass
class PairRow:
    """One pair, made from the shard's columns when a micro-batch needs it."""

    row_id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    def as_pair(self):
        return self.prompt, self.chosen, self.rejected


def collect_shard_rows(shard) -> ShardColumns:
    """All rows of this worker's shard, in shard order (the shard is deterministic, see DataConfig), held as
    int32 columns; indexing makes a :class:`PairRow` (see :mod:`dpo_ray.shard_columns`)."""
    return read_shard_columns(shard, PAIR_TOKEN_FIELDS, PairRow, PAIR_FLOAT_FIELDS)


class DPOStepper:
    """Computes the DPO loss of a micro-batch: policy forward, reference log-probs, loss.

    Policy and reference passes run under the same precision recipe (weights dtype and autocast), which
    the precomputed reference pass (:class:`dpo_ray.data.reference.ReferenceScorer`) uses too.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, scorer: PairLogProbs, ref_lm, pad_id: int, device):
        self.cfg = cfg
        self.model = model  # wrapped (DDP/FSDP) scorer used for training forward passes
        self.scorer = scorer  # unwrapped, for eval and adapter-off reference passes
        self.ref_lm = ref_lm
        # built once: a PairLogProbs checks its model's output head when it is made
        self.ref_scorer = (
            PairLogProbs(
                ref_lm, cfg.train.prefix_sharing, cfg.train.logits_chunk_size, cfg.train.response_only_logits
            ).eval()
            if ref_lm is not None
            else None
        )
        self.pad_id = pad_id
        self.device = device
        self.recipe: PrecisionRecipe = resolve_config_precision(cfg, device)
        self.loss_type = LossType(cfg.dpo.loss_type)

    def reference_logps(self, rows: Sequence[PairRow], batch) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] chosen, [B] rejected) reference log-probs, fp32: precomputed, adapter-off or the frozen model."""
        mode = self.cfg.dpo.reference
        if mode == "precomputed":
            chosen = torch.tensor([r.ref_chosen for r in rows], dtype=torch.float32, device=self.device)
            rejected = torch.tensor([r.ref_rejected for r in rows], dtype=torch.float32, device=self.device)
            return chosen, rejected
        with torch.no_grad(), self.recipe.autocast():
            if mode == "adapter":
                with disabled_adapter(self.scorer.lm):
                    chosen, rejected = self.scorer(batch)
            else:
                chosen, rejected = self.ref_scorer(batch)
        return chosen.float(), rejected.float()

    def compute(self, rows: Sequence[PairRow], model: torch.nn.Module | None = None):
        """Loss output and the ([B] chosen, [B] rejected) policy log-probs of ``rows`` (one micro-batch)."""
        # the scorer's resolved layout, padded as the precomputed reference pass pads it
        batch = self.scorer.build_batch([r.as_pair() for r in rows], self.pad_id, self.device)
        ref_chosen, ref_rejected = self.reference_logps(rows, batch)
        with self.recipe.autocast():
            chosen, rejected = (model or self.model)(batch)
        out = compute_dpo_loss(
            chosen.float(),
            rejected.float(),
            ref_chosen,
            ref_rejected,
            beta=self.cfg.dpo.beta,
            loss_type=self.loss_type,
            label_smoothing=self.cfg.dpo.label_smoothing,
            rpo_alpha=self.cfg.dpo.rpo_alpha,
            chosen_token_counts=batch["chosen_lengths"],
            rejected_token_counts=batch["rejected_lengths"],
        )
        return out, chosen.detach().float(), rejected.detach().float()


def add_eval_sums(sums: dict[str, float], out, chosen: torch.Tensor, rejected: torch.Tensor, count: int) -> None:
    """Add one eval micro-batch's sums (accuracies, loss, rewards, [B] log-probs) to ``sums``."""
    margins = out.chosen_rewards - out.rejected_rewards
    sums["acc"] += compute_pair_accuracy(margins).sum().item()
    sums["acc_strict"] += compute_pair_accuracy_strict(margins).sum().item()
    sums["loss"] += out.losses.sum().item()
    sums["margin"] += margins.sum().item()
    sums["chosen_reward"] += out.chosen_rewards.sum().item()
    sums["rejected_reward"] += out.rejected_rewards.sum().item()
    sums["logps_chosen"] += chosen.sum().item()
    sums["logps_rejected"] += rejected.sum().item()
    sums["count"] += count


def summarize_eval_sums(total: dict[str, float]) -> dict[str, float]:
    """Eval metrics from the sums of all workers (each held-out pair counted once)."""
    n = max(total["count"], 1.0)
    return {
        "eval_accuracy": total["acc"] / n,
        "eval_accuracy_strict": total["acc_strict"] / n,
        "eval_loss": total["loss"] / n,
        "eval_reward_margin": total["margin"] / n,
        "eval_rewards_chosen": total["chosen_reward"] / n,
        "eval_rewards_rejected": total["rejected_reward"] / n,
        "eval_logps_chosen": total["logps_chosen"] / n,
        "eval_logps_rejected": total["logps_rejected"] / n,
        "eval_pairs": int(total["count"]),
    }


def evaluate(
    stepper: DPOStepper, rows: Sequence[PairRow], micro_batch_size: int, model: torch.nn.Module | None = None
) -> dict[str, float]:
    """Held-out metrics over all workers' eval shards; each pair counts exactly once.

    Every worker runs the same number of forward passes (shorter shards repeat their last batch with
    weight 0), so FSDP's collectives stay matched. ``model``: what to score with (default: the FSDP-wrapped
    model under FSDP, else the unwrapped scorer).
    """
    lengths, ids = count_row_tokens(rows), list_row_ids(rows)
    order = sorted(range(len(rows)), key=lambda i: (lengths[i], ids[i]))  # whatever the shard order
    batches = split_micro_batches(order, micro_batch_size)
    n_batches = int(all_reduce_max(float(len(batches)), stepper.device))
    sums = dict.fromkeys(EVAL_KEYS, 0.0)
    if model is None:
        model = stepper.model if stepper.cfg.train.strategy == "fsdp" else stepper.scorer
    with torch.no_grad(), in_eval_mode(model):  # every submodule gets its own mode back, dropout included
        for b in range(n_batches):
            idx = batches[b] if b < len(batches) else (batches[-1] if batches else [])
            if not idx:
                continue  # this worker has no eval rows at all (only possible without FSDP)
            out, chosen, rejected = stepper.compute([rows[i] for i in idx], model=model)
            if b < len(batches):
                add_eval_sums(sums, out, chosen, rejected, len(idx))
    total = dict(zip(EVAL_KEYS, all_reduce_sum([sums[k] for k in EVAL_KEYS], stepper.device)))
    return summarize_eval_sums(total)


class DPOObjective:
    """DPO for the shared worker loop (:mod:`dpo_ray.train_loop`): the policy is wrapped in a
    :class:`PairLogProbs`, so one forward scores chosen and rejected together."""

    checkpoint_score = "eval_accuracy"  # the checkpoints kept are the most accurate on held-out pairs
    window_keys = ("loss", "acc", "margin", "count")
    log_at_reports = False  # progress lines every train.log_every steps only

    def __init__(self, cfg: Config, lm: torch.nn.Module, pad_id: int, device: torch.device):
        self.cfg, self.pad_id, self.device = cfg, pad_id, device
        self.scorer = PairLogProbs(
            lm, cfg.train.prefix_sharing, cfg.train.logits_chunk_size, cfg.train.response_only_logits,
            fused_linear_head=reads_head_weight(cfg),
        )
        self.stepper: DPOStepper | None = None

    read_rows = staticmethod(collect_shard_rows)

    def trainable_module(self) -> torch.nn.Module:
        """The module the loop wraps in DDP/FSDP."""
        return self.scorer

    def attach(self, model: torch.nn.Module, model_path: str) -> None:
        """Take the wrapped module; load the frozen reference model (``dpo.ref_model``, else the starting policy)
        when ``dpo.reference=model``."""
        ref_lm = (build_reference(self.cfg, self.cfg.resolve_reference_path(model_path), self.device)
                  if self.cfg.dpo.reference == "model" else None)
        self.stepper = DPOStepper(self.cfg, model, self.scorer, ref_lm, self.pad_id, self.device)

    def compute_micro(self, rows: Sequence[PairRow], step_rows: Sequence[PairRow]):
        """(loss to backward: the micro-batch's share of the step's mean, [] raw loss, window sums)."""
        out, _, _ = self.stepper.compute(rows)
        margins = out.chosen_rewards - out.rejected_rewards
        sums = {
            "loss": out.loss.item() * len(rows),
            "acc": compute_pair_accuracy(margins).sum().item(),
            "margin": margins.sum().item(),
            "count": float(len(rows)),
        }
        return out.loss * (len(rows) / len(step_rows)), out.loss, sums

    def summarize_window(self, total: dict[str, float]) -> dict[str, float]:
        n = max(total["count"], 1.0)
        return {"loss": total["loss"] / n, "acc": total["acc"] / n, "margin": total["margin"] / n}

    def evaluate(self, rows: Sequence[PairRow], model: torch.nn.Module) -> dict[str, float]:
        return evaluate(self.stepper, rows, self.cfg.train.micro_batch_size, model=model)

    def format_progress(
        self, step: int, total: int, train: dict[str, float], rows_per_s: float, eta_s: float, lr: float
    ) -> str:
        return (
            f"step {step}/{total} | loss {train['loss']:.4f} | acc {train['acc']:.3f} | "
            f"margin {train['margin']:.4f} | {rows_per_s:.1f} pairs/s | ETA {format_eta(eta_s)}"
        )

    def train_scalars(self, train: dict[str, float]) -> dict[str, float]:
        return {"train/loss": train["loss"], "train/accuracy": train["acc"], "train/margin": train["margin"]}

    def format_eval(self, step: int, metrics: dict) -> str | None:
        return (
            f"eval at step {step}: accuracy {metrics['eval_accuracy']:.4f} "
            f"(strict {metrics['eval_accuracy_strict']:.4f}), loss {metrics['eval_loss']:.4f}, "
            f"margin {metrics['eval_reward_margin']:.4f}"
        )
