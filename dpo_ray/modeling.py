"""Loading, building and saving models, and scoring preference pairs and responses with them.

:class:`PairLogProbs` wraps a causal LM so that one ``forward`` returns the summed response
log-probs of chosen and rejected for a batch of pairs. It is the module that DDP/FSDP wrap, so
gradient synchronisation hooks see every call.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dpo_ray.batching import Pair, build_prefix_sharing_batch, build_separate_batch
from dpo_ray.config import Config
from dpo_ray.families import (
    build_prefix_sharing_masks,
    check_logit_head,
    find_plain_linear_head,
    output_head,
    resolve_logit_transform,
    resolve_prefix_sharing,
)
from dpo_ray.losses import (
    compute_token_logps_chunked,
    compute_token_logps_linear,
    resolve_chunk_rows,
    sum_by_segment,
)
from dpo_ray.precision import in_eval_mode, prepare_for_training, resolve_config_precision

# CPU attention kernels reduce over the padded key length in 16-wide vectors plus a scalar tail, so a pair's
# bf16 log-probs changed with its batch's padded length; padding every batch to a multiple of 16 (the widest
# fp32 vector, AVX-512; AVX2's 8 and NEON's 4 divide it) keeps a pair's positions in full vectors and adds only
# exact zeros, so step-0 margins are exactly 0 (tests/test_precision_modes.py). Costs 7.5 positions per row.
LENGTH_MULTIPLE = 16


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token (EOS stands in when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
):
    """Load a causal LM from a hub id or local HF directory; remote code stays off unless asked.

    ``attn_implementation="auto"`` lets transformers pick what the family supports (sdpa where it can,
    eager for e.g. Gemma 2, whose attention soft-capping sdpa cannot do); ``model.config._attn_implementation``
    then says what was chosen.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=dtype,
        attn_implementation=None if attn_implementation == "auto" else attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device)


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """Recompute decoder-layer activations in backward (non-reentrant, so DDP and LoRA work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lm.config.use_cache = False


def count_head_rows(base: nn.Module) -> int:
    """The output head's vocabulary (rows of its logits), from the model's config (the weight may be sharded)."""
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return int(config.vocab_size)


def unwrap_base_model(lm: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def reads_head_weight(cfg: Config) -> bool:
    """Whether the trained scorer may read a plain linear head's weight directly (the fused linear head): not
    under FSDP, whose units hand their weights out only through the module's own forward and backward hooks."""
    return cfg.train.strategy != "fsdp"


@contextlib.contextmanager
def sparse_tied_embedding_grad(lm: nn.Module, head: nn.Linear | None):
    """While the decoder runs under it, a tied input embedding hands back a sparse gradient (the looked-up rows).

    With the fused linear head (``head``, from :func:`~dpo_ray.families.find_plain_linear_head`) the tied
    weight's dense ``[V, H]`` gradient is already there when the embedding's backward runs, last; a sparse
    gradient is added into it in place, where a dense one would be a second ``[V, H]`` tensor. Set only for
    the forward, so a DDP wrapper, which reads ``Embedding.sparse`` when it is built, keeps dense buckets.
    A no-op without grad, without that head or for an untied or non-``nn.Embedding`` input embedding.
    """
    embed = lm.get_input_embeddings()
    if (
        head is None
        or not torch.is_grad_enabled()
        or not isinstance(embed, nn.Embedding)
        or embed.sparse
        or embed.weight is not head.weight
    ):
        yield
        return
    embed.sparse = True
    try:
        yield
    finally:
        embed.sparse = False


class ResponseTokenScorer(nn.Module):
    """Log-probs of response tokens as the model's own forward computes them, through the fused head.

    ``response_only`` sends only the hidden states that predict response tokens through the output head
    (with the family's logit transform, checked on a probe at construction), ``chunk_size`` rows at a time
    (``"auto"``: :func:`~dpo_ray.losses.resolve_chunk_rows`), fused with the log-softmax
    (:func:`~dpo_ray.losses.compute_token_logps_chunked`); otherwise the model's own ``[B, L, V]`` logits.
    With ``fused_linear_head`` a plain ``nn.Linear`` head is read as a weight by
    :func:`~dpo_ray.losses.compute_token_logps_linear` (one ``[V, H]`` weight gradient per backward, not one
    per chunk); turn it off where the weight must only be touched through the module (FSDP's sharded units).
    The wrapped LM is ``self.lm``, so DDP/FSDP wrap this module and checkpoints drop the ``lm.`` prefix.
    """

    def __init__(
        self, lm: nn.Module, chunk_size: int | str = "auto", response_only: bool = True, fused_linear_head: bool = True
    ):
        super().__init__()
        self.lm = lm
        base = unwrap_base_model(lm)
        self.chunk_size = resolve_chunk_rows(chunk_size, count_head_rows(base))
        self.response_only = response_only
        self.fused_linear_head = fused_linear_head
        if response_only:
            self.logit_transform = resolve_logit_transform(base.config)
            check_logit_head(base, self.logit_transform)

    def _score_tokens(
        self, inputs: dict[str, Any], rows: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """[N] log p(targets[n]) predicted at ``(rows[n], pos[n])`` of the batch ``inputs`` describes."""
        if self.response_only:
            base = unwrap_base_model(self.lm)
            linear = find_plain_linear_head(base) if self.fused_linear_head else None
            with sparse_tied_embedding_grad(base, linear):
                hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [B, L, H]
            if linear is not None:
                transform = self.logit_transform if self.logit_transform.steps else None
                return compute_token_logps_linear(
                    hidden[rows, pos], targets, linear.weight, linear.bias, transform, self.chunk_size
                )
            head = output_head(base, self.logit_transform)
            return compute_token_logps_chunked(hidden[rows, pos], targets, head, self.chunk_size)
        logits = self.lm(**inputs, use_cache=False).logits  # [B, L, V]: the model's own forward, memory-hungry
        return torch.log_softmax(logits[rows, pos].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class ResponseNLL(ResponseTokenScorer):
    """SFT's loss terms: the summed NLL of an SFT batch's response tokens and their count (the fused head)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` from :func:`~dpo_ray.batching.build_sft_batch` (input_ids, attention_mask, loss_mask,
        position_ids, each [B, T]); returns ([] NLL summed over the response tokens, [] their count), fp32."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        rows, pos = batch["loss_mask"][:, 1:].nonzero(as_tuple=True)  # token pos+1 is predicted at pos
        token_logps = self._score_tokens(inputs, rows, pos, batch["input_ids"][rows, pos + 1])
        return -token_logps.sum(), token_logps.new_tensor(float(rows.numel()))


class PairLogProbs(ResponseTokenScorer):
    """Summed response log-probs of chosen and rejected for each pair, equal to the model's own forward.

    Two independent switches, each numerically equivalent to scoring every sequence alone with the
    model's own ``forward().logits`` (tests/test_model_families.py checks it per family):
    ``prefix_sharing`` runs the prompt once per pair (``[prompt | chosen | rejected]`` rows, with the
    family's per-layer masks from :mod:`dpo_ray.families`) instead of two padded rows per pair; it is
    turned off, with one log line, for families whose attention it cannot reproduce (``self.prefix_sharing``
    holds the layout in use, so build batches with :meth:`build_batch`). ``response_only`` sends only the
    hidden states that predict response tokens through the output head (with the family's logit
    transform), ``chunk_size`` rows at a time, instead of materializing ``[B, T, V]`` logits; the head is
    fused with the log-softmax (:func:`~dpo_ray.losses.compute_token_logps_chunked`), so one chunk's
    ``[chunk_size, V]`` logits exist at a time in the backward too (each chunk's are recomputed there).
    """

    def __init__(
        self,
        lm: nn.Module,
        prefix_sharing: bool = True,
        chunk_size: int | str = "auto",
        response_only: bool = True,
        fused_linear_head: bool = True,
    ):
        super().__init__(lm, chunk_size, response_only, fused_linear_head)
        self.prefix_sharing = resolve_prefix_sharing(unwrap_base_model(lm).config, prefix_sharing)

    def build_batch(
        self, pairs: Sequence[Pair], pad_id: int, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Model inputs for ``pairs`` in the layout this scorer uses, on ``device``, padded to a multiple of
        :data:`LENGTH_MULTIPLE` so that a pair scores the same in any batch (policy and reference passes
        batch pairs differently)."""
        return build_pair_batch(pairs, pad_id, self.prefix_sharing, device, LENGTH_MULTIPLE)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` from :meth:`build_batch`; returns ([B] chosen logps, [B] rejected logps)."""
        if "segment_ids" in batch:
            return self._forward_prefix_sharing(batch)
        return self._forward_separate(batch)

    def _forward_prefix_sharing(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        base = unwrap_base_model(self.lm)
        mask = build_prefix_sharing_masks(
            base.config, batch["segment_ids"], batch["position_ids"], base.get_input_embeddings().weight.dtype
        )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
        token_logps = self._score_tokens(inputs, batch["target_batch"], batch["target_pos"], batch["target_ids"])
        seq = sum_by_segment(token_logps, batch["target_seq"], 2 * batch["input_ids"].shape[0])
        seq = seq.view(-1, 2)
        return seq[:, 0], seq[:, 1]

    def _forward_separate(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        rows, pos = batch["loss_mask"][:, 1:].nonzero(as_tuple=True)  # token pos+1 is predicted at pos
        token_logps = self._score_tokens(inputs, rows, pos, batch["input_ids"][rows, pos + 1])
        logps = sum_by_segment(token_logps, rows, batch["input_ids"].shape[0])
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]


def build_pair_batch(
    pairs: Sequence[Pair],
    pad_id: int,
    prefix_sharing: bool,
    device: torch.device | str = "cpu",
    pad_to_multiple_of: int = 1,
):
    """Model inputs for ``pairs`` in the given layout, on ``device`` (prefer :meth:`PairLogProbs.build_batch`,
    which knows the layout the model allows)."""
    if prefix_sharing:
        batch = build_prefix_sharing_batch(pairs, pad_id, pad_to_multiple_of)
    else:
        batch = build_separate_batch(pairs, pad_id, pad_to_multiple_of=pad_to_multiple_of)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def disabled_adapter(lm: nn.Module):
    """Run a peft model with its adapter off: the frozen base model serves as pi_ref."""
    if hasattr(lm, "disable_adapter"):
        with lm.disable_adapter():
            yield
    else:
        yield


@torch.no_grad()
def score_pairs(
    lm: nn.Module,
    pairs: Sequence[Pair],
    pad_id: int,
    prefix_sharing: bool = True,
    chunk_size: int | str = "auto",
    device: torch.device | str = "cpu",
    response_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] chosen, [B] rejected) summed response log-probs under ``lm`` in eval mode, no grad (every
    submodule's own mode is restored afterwards)."""
    with in_eval_mode(lm):
        scorer = PairLogProbs(lm, prefix_sharing=prefix_sharing, chunk_size=chunk_size, response_only=response_only)
        chosen, rejected = scorer(scorer.build_batch(pairs, pad_id, device))
    return chosen.float().cpu(), rejected.float().cpu()


# ------------------------------------------------------------------------------------ training models


def attach_lora(cfg: Config, lm: nn.Module, ckpt_dir: Path | None) -> nn.Module:
    """``lm`` with a trainable LoRA adapter: the checkpoint's when resuming, else a fresh one from ``model.lora``."""
    from peft import LoraConfig, PeftModel, get_peft_model  # optional dependency, only for LoRA runs

    if ckpt_dir is not None and (ckpt_dir / "adapter").exists():
        return PeftModel.from_pretrained(lm, str(ckpt_dir / "adapter"), is_trainable=True)
    lora = cfg.model.lora
    return get_peft_model(
        lm,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )


def load_checkpoint_weights(lm: nn.Module, ckpt_dir: Path) -> None:
    """Load the full-finetune weights of ``ckpt_dir/model`` into ``lm`` (a tied ``lm_head`` may be absent)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted((ckpt_dir / "model").glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(lm.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_dir} does not match the model: missing {missing}, unexpected {unexpected}"
        )


def build_policy(cfg: Config, model_path: str, device: torch.device, ckpt_dir: Path | None):
    """Policy LM with LoRA and checkpoint weights, ready to train: weights in the run's precision recipe
    (:func:`~dpo_ray.precision.resolve_config_precision`, the same as the reference's), train mode, dropout
    off unless ``train.disable_dropout=false``.

    Train mode matters beyond dropout: transformers recomputes activations (``model.gradient_checkpointing``)
    only in training mode, and ``from_pretrained`` returns the model in eval mode.
    """
    lm = load_causal_lm(
        model_path,
        dtype=resolve_config_precision(cfg, device).weights_dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    if cfg.model.lora.enabled:
        lm = attach_lora(cfg, lm, ckpt_dir)
    elif ckpt_dir is not None:
        load_checkpoint_weights(lm, ckpt_dir)
    return prepare_for_training(lm.to(device), cfg.train.disable_dropout)


def build_reference(cfg: Config, model_path: str, device: torch.device):
    """A frozen copy of the starting policy for ``dpo.reference=model``: the policy's weights dtype, eval mode."""
    ref = load_causal_lm(
        model_path,
        dtype=resolve_config_precision(cfg, device).weights_dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        device=device,
    )
    ref.eval()
    ref.requires_grad_(False)
    return ref


def gather_model_state(model: nn.Module, cfg: Config) -> dict[str, torch.Tensor] | None:
    """Full state dict of the LM for saving (all ranks must call this under FSDP); None off rank 0.

    The wrapped module's own prefix (``lm.`` of :class:`PairLogProbs`) is removed.
    """
    if cfg.train.strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        ):
            state = model.state_dict()
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        return state if dist.get_rank() == 0 else None
    return None


def save_policy(lm, tokenizer_path: str, out_dir: Path, cfg: Config, state_dict=None, merge_lora: bool = False) -> None:
    """The policy as a Hugging Face directory (safetensors) with its tokenizer; LoRA as an adapter or merged."""
    from transformers import AutoTokenizer

    if cfg.model.lora.enabled:
        lm.save_pretrained(str(out_dir / "adapter"))
        if not merge_lora:
            return
        merged = copy.deepcopy(lm).merge_and_unload()
        merged.save_pretrained(str(out_dir / "model"), safe_serialization=True)
    else:
        lm.save_pretrained(str(out_dir / "model"), safe_serialization=True, state_dict=state_dict)
    tok = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    tok.save_pretrained(str(out_dir / "model"))
