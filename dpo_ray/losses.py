"""DPO math: response log-probabilities, the loss variants and the per-batch metrics.

This module imports only torch. Every function takes tensors and returns tensors, so it is tested
without Ray or transformers.

Notation (Rafailov et al., 2023, arXiv 2305.18290):
    log-ratio        h_w = log pi_theta(y_w|x) - log pi_ref(y_w|x), h_l likewise for y_l
    implicit reward  r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))              (Eq. 5)
    DPO loss         L = -log sigmoid(r(x, y_w) - r(x, y_l))                             (Eq. 7)
    gradient         dL/dtheta = -beta * sigmoid(r_l - r_w) * (grad log pi(y_w) - grad log pi(y_l))

IPO (Azar et al., 2023, arXiv 2310.12036, Eq. 17) as TRL 1.16's DPOTrainer computes it: each log-ratio is
divided by its response's token count first, h_bar = h_w / n_w - h_l / n_l, then L = (h_bar - 1/(2 tau))^2.
TRL added the per-token average after checking with the IPO authors: with summed log-ratios the squared
loss grows with response length, so no single tau suits short and long responses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


class _TargetLogSoftmax(torch.autograd.Function):
    """[n] ``log_softmax(logits)[i, targets[i]]`` from [n, V] logits, with a backward that allocates one [n, V].

    Autograd's own ``gather - logsumexp`` backward holds about four [n, V] temporaries at once (the
    difference, its exp, their product, gather's zero-filled gradient); this one builds
    ``d/dlogits = g * (onehot(target) - softmax)`` in place in a single buffer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        return _target_logsoftmax_grad(logits - lse.unsqueeze(-1), targets, grad.unsqueeze(-1)), None


def _target_logsoftmax_grad(shifted: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[n, V] d(sum g * log_softmax[target])/dlogits = g * (onehot(target) - softmax), built in place in
    ``shifted`` = logits - logsumexp (a fresh buffer the caller gives up); ``g`` is [n, 1]."""
    return shifted.exp_().mul_(-g).scatter_add_(-1, targets.unsqueeze(-1), g)


def _chunk_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """[n] fp32 log p(target) of one chunk: its [n, V] logits live only inside this call."""
    return _TargetLogSoftmax.apply(head(hidden).float(), targets)


# fp32 logits per chunk of the response-only head when the chunk is "auto": 64 MiB, so the head's peak is the same
# for a 4k and a 152k vocabulary (16,384 rows of a 1k one, 110 of Qwen2.5's 151,936)
LOGITS_CHUNK_ELEMENTS = 1 << 24


def resolve_chunk_rows(chunk_size: int | str, vocab_size: int) -> int:
    """Rows per chunk of :func:`compute_token_logps_chunked`: ``chunk_size`` itself, or for ``"auto"`` as many rows
    as :data:`LOGITS_CHUNK_ELEMENTS` logits hold at this vocabulary (at least one)."""
    if chunk_size == "auto":
        return max(1, LOGITS_CHUNK_ELEMENTS // max(1, vocab_size))
    return int(chunk_size)


def compute_token_logps_chunked(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-prob of each target token from the hidden state that predicts it, one chunk of logits at a time.

    Only the given positions go through the output head, ``chunk_size`` rows at a time, and at most one
    chunk's ``[chunk_size, V]`` logits (with the temporaries of its log-softmax) exists at any moment, in
    the forward and in the backward: with grad enabled each chunk runs under non-reentrant
    ``torch.utils.checkpoint``, which keeps only the chunk's hidden states and recomputes its logits when
    the backward reaches it, one chunk after the other. The cost is one more head matmul per chunk in the
    backward; without grad (the reference pass, evaluation) nothing is recomputed. Peak memory is thus
    independent of the number of tokens; it grows with the vocabulary only through one chunk (measured by
    tests/test_fused_head.py and benchmarks/head_memory.py). The first checkpointed call of a process
    imports ``torch._dynamo`` (torch.utils.checkpoint does; about 70 MiB of RSS, once).

    ``head`` is called as given (the module, not its weight), so a tied embedding, a LoRA-wrapped head or
    an FSDP unit gets its gradient and its hooks as in the model's own forward, recompute included.

    Args:
        hidden: [N, H] hidden states at the positions that predict each response token.
        targets: [N] the response token ids.
        head: maps [n, H] hidden states to [n, V] logits: the model's lm_head with the family's logit
            transform (:func:`dpo_ray.families.output_head`); any dtype, the log-softmax is fp32.
        chunk_size: rows per chunk.

    Returns:
        [N] fp32 log p(target | prefix).
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    recompute = torch.is_grad_enabled()
    out = []
    # split, not slicing: each chunk's backward then hands back a [chunk, H] gradient, not a zero-filled [N, H]
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if recompute:
            # the RNG state is kept (the default) so that a head with dropout (LoRA) recomputes the same mask
            out.append(checkpoint(_chunk_token_logps, hidden_chunk, target_chunk, head, use_reentrant=False))
        else:
            out.append(_chunk_token_logps(hidden_chunk, target_chunk, head))
    return torch.cat(out)


class _LinearHeadTargetLogps(torch.autograd.Function):
    """[N] ``log_softmax(transform(hidden @ W.T + b))[n, targets[n]]`` in chunks of rows, with its own backward.

    Saves only the inputs and the [N] log-sum-exps. The backward recomputes one chunk's logits at a time and
    adds that chunk's head-weight gradient in place (``addmm_``) into one ``[V, H]`` buffer: the weight's
    existing ``.grad`` when there is one (the second and later micro-batches of a step), else a new buffer that
    autograd then takes as the ``.grad``. So one chunk of ``[chunk, V]`` logits and at most one ``[V, H]``
    gradient exist during the backward, where autograd through the module (the generic path of
    :func:`compute_token_logps_chunked`) holds the ``.grad``, the sum of the chunks so far and the current
    chunk's gradient at once: 233 MB each for Qwen2.5's head at H = 384 in fp32.

    When it writes into ``.grad`` directly, the weight's gradient returned to autograd is an empty sparse
    tensor (adding it costs nothing), so that the weight's accumulation hooks (DDP's) still run, after the
    write. A ``torch.autograd.grad`` call asking for the weight would therefore get zeros: the scorers use
    this only for ``.backward()``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size):
        lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        out = torch.empty_like(lse)
        for rows in _chunk_slices(hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[rows], weight, bias, transform)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.transform, ctx.chunk_size = transform, chunk_size
        # the backward recomputes the logits under the forward's autocast, so that they are the ones lse came from
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight, returned_weight_grad = _weight_grad_buffer(weight) if want_weight else (None, None)
        grad_bias = torch.zeros_like(bias) if want_bias else None
        device, autocast, autocast_dtype = ctx.autocast
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            for rows in _chunk_slices(hidden.shape[0], ctx.chunk_size):
                h, g = hidden[rows], grad[rows].unsqueeze(-1)
                grad_raw = _chunk_logits_grad(h, weight, bias, targets[rows], lse[rows], g, ctx.transform)
                if want_hidden:
                    grad_hidden[rows] = torch.mm(grad_raw, weight)  # in autocast's dtype under autocast
                if want_weight and grad_raw.dtype == h.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad_raw.t(), h)
                elif want_weight:  # autocast: the product in its dtype (as autograd's would be), added in fp32
                    grad_weight.add_(torch.mm(grad_raw.t(), h))
                if want_bias:
                    grad_bias.add_(grad_raw.sum(0))
                del grad_raw
        return grad_hidden, returned_weight_grad, grad_bias, None, None, None


def _weight_grad_buffer(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the [V, H] buffer to add the head's gradient into, what the backward returns for the weight)."""
    existing = weight.grad
    if existing is not None and existing.layout == torch.strided and existing.dtype == weight.dtype:
        nothing = torch.sparse_coo_tensor(
            torch.empty(1, 0, dtype=torch.long, device=weight.device),
            weight.new_empty(0, *weight.shape[1:]),
            weight.shape,
            check_invariants=True,  # nothing to check in an empty tensor; saying so silences torch's warning
        )
        return existing, nothing
    buffer = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    return buffer, buffer


def _chunk_logits_grad(h, weight, bias, targets, lse, g, transform) -> torch.Tensor:
    """[n, V] d(sum g * logp[target])/d(head output) of one chunk, in the head output's dtype.

    d/dlogits = g * (onehot(target) - softmax), built in place in one fp32 buffer, then chained through the
    family's transform by its own autograd (soft-capping's derivative is the model's own).
    """
    if transform is None:
        raw = F.linear(h, weight, bias)
        dtype, logits = raw.dtype, raw.float()  # raw itself in fp32: the softmax goes in place either way
        del raw
        return _target_logsoftmax_grad(logits.sub_(lse.unsqueeze(-1)), targets, g).to(dtype)
    with torch.enable_grad():
        raw = F.linear(h, weight, bias).detach().requires_grad_()
        logits = transform(raw).float()
    grad_logits = _target_logsoftmax_grad(logits.detach() - lse.unsqueeze(-1), targets, g)
    return torch.autograd.grad(logits, raw, grad_logits)[0]


def _chunk_slices(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _chunk_logits(hidden, weight, bias, transform) -> torch.Tensor:
    """[n, V] fp32 logits of one chunk: the head in the weight's dtype, then the transform in that dtype."""
    raw = F.linear(hidden, weight, bias)
    return (raw if transform is None else transform(raw)).float()


def compute_token_logps_linear(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-prob of each target token through a linear output head, fused and chunked (the fast path).

    Equal to :func:`compute_token_logps_chunked` with ``head = transform(F.linear(., weight, bias))``, with
    less memory in the backward: one ``[V, H]`` weight gradient accumulated in place across chunks instead
    of one per chunk plus their sum (:class:`_LinearHeadTargetLogps`). The weight is read directly, so use
    it only for a plain ``nn.Linear`` head (no LoRA adapter or hooks on it, not an FSDP-sharded weight).

    Args:
        hidden: [N, H] hidden states at the positions that predict each response token.
        targets: [N] the response token ids.
        weight: [V, H] the output head's weight (tied or not); bias: [V] or None.
        transform: the family's logit post-processing of the head output (soft-capping, scaling), or None.
        chunk_size: rows per chunk.

    Returns:
        [N] fp32 log p(target | prefix).
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _LinearHeadTargetLogps.apply(hidden, weight, bias, targets, transform, chunk_size)


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
    # with probability eps, so the target is the expected loss under that noise. (TRL 0.x did the same;
    # TRL 1.16's "sigmoid" ignores label_smoothing, which it keeps for robust, exo_pair and aot.)
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _robust_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Robust DPO (Chowdhury et al., 2024, Eq. 8): an unbiased estimate of the clean loss under
    # label-flip rate eps; it reduces to DPO at eps = 0.
    eps = label_smoothing
    return (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)


def _ipo_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # IPO (Azar et al., 2023, Eq. 17): squared distance of the log-ratio gap from 1 / (2 tau), tau = beta;
    # compute_dpo_loss hands it the gap of per-token averaged log-ratios (LossType.IPO.averages_per_token).
    return (logits - 1 / (2 * beta)) ** 2


def _hinge_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # SLiC hinge (Zhao et al., 2023): max(0, 1 - beta * h); beta is the inverse margin.
    return torch.relu(1 - beta * logits)


class LossType(enum.Enum):
    """A loss variant; ``LossType("ipo").per_pair_loss(...)`` computes it.

    Each member carries what :func:`compute_dpo_loss` needs to know about it:

    * ``averages_per_token``: the log-ratio gap is formed from per-token averages (each response's summed
      log-ratio divided by its token count) instead of sums; then both token counts are required.
    * ``uses_label_smoothing``: ``label_smoothing`` changes the loss; for the others a non-zero value
      would be silently ignored, so it is refused.
    """

    #          name       per-pair loss  averages_per_token, uses_label_smoothing
    SIGMOID = ("sigmoid", _sigmoid_loss, False, True)  # label smoothing makes it cDPO
    IPO = ("ipo", _ipo_loss, True, False)  # TRL's per-token average (see the module docstring)
    HINGE = ("hinge", _hinge_loss, False, False)
    ROBUST = ("robust", _robust_loss, False, True)  # label smoothing is its assumed flip rate

    def __new__(
        cls,
        name: str,
        fn: Callable[[torch.Tensor, float, float], torch.Tensor],
        averages_per_token: bool,
        uses_label_smoothing: bool,
    ):
        obj = object.__new__(cls)
        obj._value_ = name
        obj.fn = fn
        obj.averages_per_token = averages_per_token
        obj.uses_label_smoothing = uses_label_smoothing
        return obj

    def per_pair_loss(self, logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
        """[B] loss of each pair from ``logits`` = the [B] gap of log-ratios h_w - h_l (not yet times beta).

        The gap is taken as given: for a member with ``averages_per_token`` the caller passes the gap of
        per-token averages (:func:`compute_dpo_loss` does).
        """
        return self.fn(logits, beta, label_smoothing)


def _per_token(summed: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """[B] per-token average: ``summed`` [B] (a log-prob or log-ratio sum) over ``token_counts`` [B] (int)."""
    # clamped at 1 as TRL does: an empty response (the data pipeline drops them) must not divide by zero
    return summed / token_counts.clamp(min=1).to(device=summed.device, dtype=summed.dtype)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # [] mean over pairs (plus the RPO term)
    losses: torch.Tensor  # [B] per-pair preference loss
    # rewards come from the summed log-probs for every loss type (IPO too), as TRL 1.16 logs rewards/*
    chosen_rewards: torch.Tensor  # [B] beta * (log pi(y_w) - log pi_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # [B] likewise for y_l, detached


def _logratio_gaps(loss_type: LossType, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                   chosen_token_counts: torch.Tensor | None,
                   rejected_token_counts: torch.Tensor | None) -> torch.Tensor:
    """[B] h_w - h_l, of summed log-ratios, or of per-token averaged ones where the loss averages (IPO)."""
    if not loss_type.averages_per_token:
        return chosen_logratios - rejected_logratios
    if chosen_token_counts is None or rejected_token_counts is None:
        raise ValueError(
            f"loss_type={loss_type.value!r} averages log-probs per token and needs both "
            "chosen_token_counts and rejected_token_counts"
        )
    return _per_token(chosen_logratios, chosen_token_counts) - _per_token(rejected_logratios, rejected_token_counts)


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
    rejected_token_counts: torch.Tensor | None = None,
) -> DPOOutput:
    """DPO loss of a batch of pairs (Eq. 7) or one of its variants.

    The per-pair loss sees the log-ratio gap h = h_w - h_l. For ``ipo`` (Azar et al., 2023, Eq. 17) it is
    TRL's per-token average, h_w / n_w - h_l / n_l, which equals averaging the policy and the reference
    log-probs of each response over its n tokens. The reported rewards stay ``beta * h`` of the summed
    log-probs for every loss type, as TRL 1.16 logs ``rewards/*``.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed response log-probs under pi_theta.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen pi_ref.
        beta: KL strength (for IPO it is tau).
        loss_type: a :class:`LossType` or its name.
        label_smoothing: label-flip rate for ``sigmoid`` (cDPO) and ``robust`` (rDPO); must be 0 for
            the loss types that do not use it (``LossType.uses_label_smoothing``).
        rpo_alpha: weight of the NLL term on chosen responses (RPO, Pang et al., 2024); the term is
            the mean token NLL, ``-policy_chosen_logps / chosen_token_counts``, averaged over pairs.
        chosen_token_counts: [B] int response tokens in each chosen response; needed when rpo_alpha > 0
            or the loss averages per token (``ipo``).
        rejected_token_counts: [B] int response tokens in each rejected response; needed when the loss
            averages per token (``ipo``).

    Returns:
        :class:`DPOOutput` with the scalar loss, per-pair losses and detached rewards.

    Raises:
        ValueError: unknown loss type; label_smoothing > 0 for a loss that ignores it; token counts
            missing where the loss or the RPO term needs them.
    """
    loss_type = LossType(loss_type) if not isinstance(loss_type, LossType) else loss_type
    if label_smoothing > 0 and not loss_type.uses_label_smoothing:
        users = ", ".join(m.value for m in LossType if m.uses_label_smoothing)
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect on loss_type={loss_type.value!r}; only {users} use it"
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    gaps = _logratio_gaps(loss_type, chosen_logratios, rejected_logratios, chosen_token_counts, rejected_token_counts)
    losses = loss_type.per_pair_loss(gaps, beta, label_smoothing)
    loss = losses.mean()
    if rpo_alpha > 0:
        if chosen_token_counts is None:
            raise ValueError("rpo_alpha > 0 needs chosen_token_counts for the per-token NLL")
        nll = -_per_token(policy_chosen_logps, chosen_token_counts).mean()
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
