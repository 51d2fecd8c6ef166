"""DPO math: response log-probabilities, the loss variants and the per-batch metrics.

This module imports only torch. Every function takes tensors and returns tensors, so it is tested
without Ray or transformers.

Notation (Rafailov et al., 2023, arXiv 2305.18290):
    log-ratio        h_w = log pi_theta(y_w|x) - log pi_ref(y_w|x), h_l likewise for y_l
    implicit reward  r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))              (Eq. 5)
    DPO loss         L = -log sigmoid(r(x, y_w) - r(x, y_l))                             (Eq. 7)
    gradient         dL/dtheta = -beta * sigmoid(r_l - r_w) * (grad log pi(y_w) - grad log pi(y_l))
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- log-probabilities


def compute_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the masked (response) tokens of each sequence.

    Args:
        logits: [B, T, V] next-token logits; ``logits[:, t]`` predicts ``labels[:, t + 1]``.
        labels: [B, T] token ids of the full sequence (prompt + response + padding).
        loss_mask: [B, T] 1 where ``labels`` is a response token, 0 for prompt and padding,
            whichever side the padding is on.

    Returns:
        [B] sum over response tokens of log p(token | everything before it), in fp32.
    """
    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = loss_mask[:, 1:].bool()
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    token_logps = torch.log_softmax(shifted_logits, dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    # where, not a product: a non-finite logit at a masked position must not leak into the sum
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)


def compute_token_logps_chunked(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-prob of each target token from the hidden state that predicts it, chunk by chunk.

    Only the given positions go through the output head, ``chunk_size`` rows at a time, so full
    ``[tokens x vocab]`` fp32 logits are never materialized for prompt positions (or at all).

    Args:
        hidden: [N, H] hidden states at the positions that predict each response token.
        targets: [N] the response token ids.
        head: maps [n, H] hidden states to [n, V] logits (the model's lm_head).
        chunk_size: rows per chunk.

    Returns:
        [N] fp32 log p(target | prefix).
    """
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()
        tgt = targets[start : start + chunk_size]
        out.append(logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def sum_by_segment(token_logps: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum token log-probs into their sequences.

    Args:
        token_logps: [N] per-token log-probs.
        segment: [N] int64 index of the sequence each token belongs to, in [0, num_segments).
        num_segments: S.

    Returns:
        [S] summed log-probs (0 for a sequence without tokens).
    """
    sums = token_logps.new_zeros(num_segments)
    return sums.index_add(0, segment, token_logps)


# ---------------------------------------------------------------------------- losses


def _sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # DPO, Eq. 7; with label_smoothing eps it is conservative DPO (cDPO): the label is flipped
    # with probability eps, so the target is the expected loss under that noise.
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _robust_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Robust DPO (Chowdhury et al., 2024, Eq. 8): an unbiased estimate of the clean loss under
    # label-flip rate eps; it reduces to DPO at eps = 0.
    eps = label_smoothing
    return (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)


def _ipo_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # IPO (Azar et al., 2023, Eq. 17): squared distance of the log-ratio gap from 1 / (2 tau), tau = beta.
    return (logits - 1 / (2 * beta)) ** 2


def _hinge_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # SLiC hinge (Zhao et al., 2023): max(0, 1 - beta * h); beta is the inverse margin.
    return torch.relu(1 - beta * logits)


class LossType(enum.Enum):
    """A loss variant; ``LossType("ipo").per_pair_loss(...)`` computes it."""

    SIGMOID = ("sigmoid", _sigmoid_loss)
    IPO = ("ipo", _ipo_loss)
    HINGE = ("hinge", _hinge_loss)
    ROBUST = ("robust", _robust_loss)

    def __new__(cls, name: str, fn: Callable[[torch.Tensor, float, float], torch.Tensor]):
        obj = object.__new__(cls)
        obj._value_ = name
        obj.fn = fn
        return obj

    def per_pair_loss(self, logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
        """[B] loss of each pair from ``logits`` = h_w - h_l, the gap of log-ratios (not yet times beta)."""
        return self.fn(logits, beta, label_smoothing)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # [] mean over pairs (plus the RPO term)
    losses: torch.Tensor  # [B] per-pair preference loss
    chosen_rewards: torch.Tensor  # [B] beta * (log pi(y_w) - log pi_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # [B] likewise for y_l, detached


def compute_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: LossType | str = LossType.SIGMOID,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
) -> DPOOutput:
    """DPO loss of a batch of pairs (Eq. 7) or one of its variants.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed response log-probs under pi_theta.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen pi_ref.
        beta: KL strength (for IPO it is tau).
        loss_type: a :class:`LossType` or its name.
        label_smoothing: label-flip rate for ``sigmoid`` (cDPO) and ``robust`` (rDPO).
        rpo_alpha: weight of the NLL term on chosen responses (RPO, Pang et al., 2024); the term is
            the mean token NLL, ``-policy_chosen_logps / chosen_token_counts``, averaged over pairs.
        chosen_token_counts: [B] response tokens in each chosen response; needed when rpo_alpha > 0.

    Returns:
        :class:`DPOOutput` with the scalar loss, per-pair losses and detached rewards.
    """
    loss_type = LossType(loss_type) if not isinstance(loss_type, LossType) else loss_type
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = loss_type.per_pair_loss(chosen_logratios - rejected_logratios, beta, label_smoothing)
    loss = losses.mean()
    if rpo_alpha > 0:
        if chosen_token_counts is None:
            raise ValueError("rpo_alpha > 0 needs chosen_token_counts for the per-token NLL")
        nll = -(policy_chosen_logps / chosen_token_counts.clamp(min=1).to(policy_chosen_logps.dtype)).mean()
        loss = loss + rpo_alpha * nll
    return DPOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


# ---------------------------------------------------------------------------- metrics


def compute_pair_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """[B] per-pair preference accuracy: 1 if the reward margin is > 0, 0.5 on a tie, 0 otherwise."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def compute_pair_accuracy_strict(margins: torch.Tensor) -> torch.Tensor:
    """[B] accuracy with ties counted as wrong, as TRL logs ``rewards/accuracies``."""
    return (margins > 0).float()


def compute_preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-batch means, keyed as TRL logs them (rewards are ``beta * log-ratio``, logps are sums)."""
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": margins.mean(),
        "rewards/accuracy": compute_pair_accuracy(margins).mean(),
        "rewards/accuracy_strict": compute_pair_accuracy_strict(margins).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
