"""What a model family's own forward does that dpo-ray's fast paths must reproduce exactly.

The oracle for every number dpo-ray computes is the model's own ``forward().logits``. Two fast paths
bypass parts of that forward, and this module holds what they need to know per family:

* **The response-only head** sends the decoder's hidden states through the output embedding itself,
  so it must apply the family's logit post-processing: Gemma 2/3's final soft-capping
  ``cap * tanh(logits / cap)``, Cohere's ``logits * logit_scale``, Granite's ``logits / logits_scaling``.
  :func:`resolve_logit_transform` reads it from the config, and :func:`check_logit_head` runs one short
  probe sequence through both paths, so a family with a transform not listed here is refused instead of
  silently scored on another distribution.
* **Prefix sharing** (``[prompt | chosen | rejected]`` in one row) hands the model a custom attention
  mask, which transformers then uses as is for every layer. :func:`build_prefix_sharing_masks` builds,
  with transformers' own mask factory (``masking_utils.create_causal_mask`` plus an ``and_mask_function``),
  the mask each layer type needs: the prefix-sharing pattern, intersected with the sliding window
  measured in *positions* (rejected continues from the prompt's end), in the format the attention
  implementation reads (additive float for eager, bool for sdpa, a BlockMask for flex_attention).
  :func:`resolve_prefix_sharing` says whether a family's attention pattern is one dpo-ray reproduces;
  where it is not (ALiBi, flash attention's padding-only masks, families not verified), the separate
  layout is used, in which the model builds its own masks from a padding mask: exact by construction.

Imports torch and transformers only (no Ray).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dpo_ray.batching import SEG_PAD, SEG_PROMPT
from dpo_ray.precision import in_eval_mode

logger = logging.getLogger("dpo_ray")


class UnsupportedModelError(ValueError):
    """The model's forward does something dpo-ray cannot reproduce; the message names the model and the fix."""


# ---------------------------------------------------------------------------- logit post-processing


@dataclass(frozen=True)
class LogitTransform:
    """The model's own post-processing of ``lm_head`` output, as ordered (op, value) steps.

    ``op`` is ``mul``, ``div`` or ``softcap``; each is applied in the logits' own dtype, as the model does.
    """

    steps: tuple[tuple[str, float], ...] = ()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] head output -> [..., V] the logits the model's forward returns."""
        for op, value in self.steps:
            if op == "mul":
                logits = logits * value
            elif op == "div":
                logits = logits / value
            else:  # softcap: Gemma 2 (arXiv 2408.00118, Sec. 2), cap * tanh(logits / cap)
                logits = torch.tanh(logits / value) * value
        return logits

    def describe(self) -> str:
        return ", ".join(f"{op} {value:g}" for op, value in self.steps) or "none"


def resolve_logit_transform(config: Any) -> LogitTransform:
    """The final-logit transform of ``config``'s family (see the module docstring for the families)."""
    model_type = getattr(config, "model_type", "")
    steps: list[tuple[str, float]] = []
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and scaling != 1.0:
        # Granite divides by it (muP); HyperCLOVA X multiplies: the attribute name alone does not say which
        if model_type.startswith("granite"):
            steps.append(("div", float(scaling)))
        elif model_type.startswith("hyperclovax"):
            steps.append(("mul", float(scaling)))
        else:
            raise UnsupportedModelError(
                f"model type {model_type!r} sets logits_scaling={scaling} and dpo-ray does not know whether its "
                "forward multiplies or divides by it; set train.response_only_logits=false to score with the "
                "model's own forward"
            )
    logit_scale = getattr(config, "logit_scale", None)
    if model_type.startswith("cohere") and logit_scale is not None and logit_scale != 1.0:
        steps.append(("mul", float(logit_scale)))
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        steps.append(("softcap", float(softcap)))
    return LogitTransform(tuple(steps))


def output_head(lm: nn.Module, transform: LogitTransform) -> Callable[[torch.Tensor], torch.Tensor]:
    """[n, H] hidden states -> [n, V] logits exactly as ``lm``'s forward makes them from those states."""
    head = lm.get_output_embeddings()
    if not transform.steps:
        return head
    return lambda hidden: transform(head(hidden))


def find_plain_linear_head(lm: nn.Module) -> nn.Linear | None:
    """``lm``'s output head if it is a plain ``nn.Linear`` with no hooks, so that its weight can be read directly
    (:func:`dpo_ray.losses.compute_token_logps_linear`); None for a LoRA-wrapped, quantized or hooked head,
    which must be called as a module."""
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    return head


PROBE_TOKENS = 12  # enough positions for every head row to differ; tiny next to any real batch


@torch.no_grad()
def check_logit_head(lm: nn.Module, transform: LogitTransform) -> None:
    """Refuse a model whose forward post-processes logits beyond ``transform``.

    Runs one ``PROBE_TOKENS`` sequence through ``lm``'s forward and through decoder + head + transform,
    in eval mode (every module's mode is restored afterwards). The result is remembered on ``lm``.
    """
    if getattr(lm, "_dpo_ray_head_checked", None) == transform:
        return
    vocab = lm.get_output_embeddings().weight.shape[0]
    device = lm.get_output_embeddings().weight.device
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % max(vocab - 1, 1) + 1).unsqueeze(0)
    with in_eval_mode(lm):
        want = lm(input_ids=ids, use_cache=False).logits.float()
        hidden = lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        got = output_head(lm, transform)(hidden).float()
    scale = max(1.0, want.abs().max().item())
    tol = (1e-4 if want.dtype == torch.float32 and hidden.dtype == torch.float32 else 2e-2) * scale
    diff = (want - got).abs().max().item()
    if not diff <= tol:
        raise UnsupportedModelError(
            f"model type {lm.config.model_type!r}: its forward's logits differ from decoder + output head + "
            f"the known transform ({transform.describe()}) by {diff:.3g}; dpo-ray does not know this family's "
            "logit post-processing. Set train.response_only_logits=false to score with the model's own forward"
        )
    lm._dpo_ray_head_checked = transform


# ---------------------------------------------------------------------------- attention masks


class MaskStyle(enum.Enum):
    """How a family's decoder builds its attention masks (read from its transformers source)."""

    CAUSAL = "causal"  # one causal mask for every layer (Llama)
    CONFIG_WINDOW = "config_window"  # one mask, sliding when config.sliding_window is set (Mistral)
    PER_LAYER_TYPE = "per_layer_type"  # one mask per config.layer_types entry, passed as a dict (Gemma 2/3)


# Families whose prefix-sharing log-probs the conformance tests check against the model's own forward
# (tests/test_model_families.py). Any other family is scored in the separate layout, where the model builds
# its own masks, so it is exact by construction.
PREFIX_SHARING_FAMILIES: dict[str, MaskStyle] = {
    "llama": MaskStyle.CAUSAL,
    "gemma": MaskStyle.CAUSAL,
    "cohere": MaskStyle.CAUSAL,
    "granite": MaskStyle.CAUSAL,
    "olmo": MaskStyle.CAUSAL,
    "olmo2": MaskStyle.CAUSAL,
    "gpt_neox": MaskStyle.CAUSAL,
    "gpt2": MaskStyle.CAUSAL,
    "phi": MaskStyle.CAUSAL,
    "falcon": MaskStyle.CAUSAL,  # rotary Falcon only; ALiBi Falcon is refused below
    "mistral": MaskStyle.CONFIG_WINDOW,
    "mixtral": MaskStyle.CONFIG_WINDOW,
    "phi3": MaskStyle.CONFIG_WINDOW,
    "qwen3_moe": MaskStyle.CONFIG_WINDOW,
    "starcoder2": MaskStyle.CONFIG_WINDOW,
    "qwen2": MaskStyle.PER_LAYER_TYPE,
    "qwen2_moe": MaskStyle.PER_LAYER_TYPE,
    "qwen3": MaskStyle.PER_LAYER_TYPE,
    "gemma2": MaskStyle.PER_LAYER_TYPE,
    "gemma3_text": MaskStyle.PER_LAYER_TYPE,
    "cohere2": MaskStyle.PER_LAYER_TYPE,
}
MASKED_ATTENTION = ("eager", "sdpa", "flex_attention")  # implementations that read a full [B, 1, L, L] mask
LAYER_TYPES = ("full_attention", "sliding_attention")


def find_prefix_sharing_obstacle(config: Any) -> str | None:
    """Why prefix sharing cannot reproduce ``config``'s forward exactly, or None when it can."""
    model_type = getattr(config, "model_type", "")
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    if attn not in MASKED_ATTENTION:
        return f"{attn} reads only a padding mask, not the prefix-sharing pattern"
    style = PREFIX_SHARING_FAMILIES.get(model_type)
    if style is None:
        return f"prefix sharing is not verified for model type {model_type!r}"
    if getattr(config, "alibi", False):
        return "ALiBi biases are built from a padding mask and token distances, not from a custom mask"
    if style is MaskStyle.PER_LAYER_TYPE:
        unknown = set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES)
        if unknown:
            return f"layer types {sorted(unknown)} have no prefix-sharing mask"
    return None


_reported_fallbacks: set[tuple[str, str]] = set()


def resolve_prefix_sharing(config: Any, requested: bool) -> bool:
    """``requested`` unless the family cannot share prefixes exactly; a fallback is logged once per reason."""
    if not requested:
        return False
    obstacle = find_prefix_sharing_obstacle(config)
    if obstacle is None:
        return True
    key = (getattr(config, "model_type", ""), obstacle)
    if key not in _reported_fallbacks:
        _reported_fallbacks.add(key)
        logger.warning("prefix sharing off for this model (%s): scoring chosen and rejected as separate rows", obstacle)
    return False


def prefix_sharing_mask_function(segment_ids: torch.Tensor, position_ids: torch.Tensor, window: int | None):
    """A transformers mask function (batch, head, q, kv) -> bool, to be ANDed with the causal mask.

    A query sees the prompt and its own response, never the other response; with ``window``, only keys
    whose *position* is less than ``window`` before its own, as in the model's forward on
    ``[prompt | response]`` (``kv > q - window``, transformers' ``sliding_window_overlay``).

    Args:
        segment_ids: [B, L] SEG_* labels of :func:`dpo_ray.batching.build_prefix_sharing_batch`.
        position_ids: [B, L] the positions the model sees (rejected restarts after the prompt).
        window: the sliding window of this layer type, or None for full attention.
    """

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        seg_q, seg_kv = segment_ids[batch_idx, q_idx], segment_ids[batch_idx, kv_idx]
        allowed = (seg_kv == SEG_PROMPT) | (seg_kv == seg_q)
        if window is not None:
            allowed = allowed & (position_ids[batch_idx, q_idx] - position_ids[batch_idx, kv_idx] < window)
        return allowed

    return mask


def list_layer_windows(config: Any) -> dict[str, int | None]:
    """{layer type: sliding window or None} for every mask the family's decoder reads."""
    style = PREFIX_SHARING_FAMILIES[config.model_type]
    window = getattr(config, "sliding_window", None) or None
    if style is MaskStyle.CAUSAL:
        return {"full_attention": None}
    if style is MaskStyle.CONFIG_WINDOW:
        return {"sliding_attention" if window else "full_attention": window}
    types = set(getattr(config, "layer_types", None) or ("full_attention",))
    return {t: (window if t == "sliding_attention" else None) for t in sorted(types)}


def build_prefix_sharing_masks(config: Any, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                               dtype: torch.dtype):
    """The ``attention_mask`` argument for a prefix-shared batch, as the family's decoder reads it.

    Args:
        config: the model's config (its ``_attn_implementation`` picks the mask format).
        segment_ids, position_ids: [B, L] from :func:`dpo_ray.batching.build_prefix_sharing_batch`.
        dtype: the dtype of the model's input embeddings (eager masks are additive in it).

    Returns:
        One mask ([B, 1, L, L] tensor or BlockMask) for single-mask families, else {layer type: mask}.
    """
    from transformers.masking_utils import create_causal_mask

    bsz, length = segment_ids.shape
    shape_only = torch.empty((bsz, length, 0), dtype=dtype, device=segment_ids.device)  # mask factory reads B, L, dtype
    padding = segment_ids != SEG_PAD
    masks = {
        layer_type: create_causal_mask(
            config=config,
            inputs_embeds=shape_only,
            attention_mask=padding,
            past_key_values=None,
            position_ids=position_ids,
            and_mask_function=prefix_sharing_mask_function(segment_ids, position_ids, window),
        )
        for layer_type, window in list_layer_windows(config).items()
    }
    if PREFIX_SHARING_FAMILIES[config.model_type] is MaskStyle.PER_LAYER_TYPE:
        return masks
    (mask,) = masks.values()
    return mask
