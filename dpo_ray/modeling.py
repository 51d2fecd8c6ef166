"""Loading models and scoring preference pairs with them.

:class:`PairLogProbs` wraps a causal LM so that one ``forward`` returns the summed response
log-probs of chosen and rejected for a batch of pairs. It is the module that DDP/FSDP wrap, so
gradient synchronisation hooks see every call.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from dpo_ray.batching import Pair, build_prefix_sharing_batch, build_prefix_sharing_mask, build_separate_batch
from dpo_ray.losses import compute_sequence_logps, compute_token_logps_chunked, sum_by_segment


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU (tensor cores) and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


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
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
):
    """Load a causal LM from a hub id or local HF directory; remote code stays off unless asked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
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


def unwrap_base_model(lm: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class PairLogProbs(nn.Module):
    """Summed response log-probs of chosen and rejected for each pair.

    Two independent switches, each numerically equivalent to the plain path in fp32:
    ``prefix_sharing`` runs the prompt once per pair (``[prompt | chosen | rejected]`` rows) instead of
    two padded rows per pair; ``response_only`` sends only the hidden states that predict response
    tokens through the output head, ``chunk_size`` rows at a time, instead of materializing
    ``[B, T, V]`` logits for every position.
    """

    def __init__(self, lm: nn.Module, prefix_sharing: bool = True, chunk_size: int = 1024, response_only: bool = True):
        super().__init__()
        self.lm = lm
        self.prefix_sharing = prefix_sharing
        self.chunk_size = chunk_size
        self.response_only = response_only

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` from :func:`build_pair_batch`; returns ([B] chosen logps, [B] rejected logps)."""
        if "segment_ids" in batch:
            return self._forward_prefix_sharing(batch)
        return self._forward_separate(batch)

    def _token_logps(self, hidden: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor):
        """[N] log p(targets) predicted by ``hidden[rows, pos]``; hidden is [B, L, H]."""
        head = unwrap_base_model(self.lm).get_output_embeddings()
        if self.response_only:
            return compute_token_logps_chunked(hidden[rows, pos], targets, head, self.chunk_size)
        logps = torch.log_softmax(head(hidden).float(), dim=-1)  # [B, L, V]: the plain, memory-hungry path
        return logps[rows, pos, targets]

    def _decode(self, **inputs) -> torch.Tensor:
        return unwrap_base_model(self.lm).get_decoder()(**inputs, use_cache=False).last_hidden_state

    def _forward_prefix_sharing(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        base = unwrap_base_model(self.lm)
        mask = build_prefix_sharing_mask(batch["segment_ids"])
        if base.config._attn_implementation != "sdpa":
            # eager attention adds the mask to the scores: turn "allowed" into 0 / dtype-min
            dtype = next(base.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        hidden = self._decode(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
        token_logps = self._token_logps(hidden, batch["target_batch"], batch["target_pos"], batch["target_ids"])
        seq = sum_by_segment(token_logps, batch["target_seq"], 2 * batch["input_ids"].shape[0])
        seq = seq.view(-1, 2)
        return seq[:, 0], seq[:, 1]

    def _forward_separate(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.response_only:
            hidden = self._decode(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"])
            rows, pos = batch["loss_mask"][:, 1:].nonzero(as_tuple=True)  # token pos+1 is predicted at pos
            token_logps = self._token_logps(hidden, rows, pos, batch["input_ids"][rows, pos + 1])
            logps = sum_by_segment(token_logps, rows, batch["input_ids"].shape[0])
        else:
            logits = self.lm(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            ).logits
            logps = compute_sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]


def build_pair_batch(pairs: Sequence[Pair], pad_id: int, prefix_sharing: bool, device: torch.device | str = "cpu"):
    """Model inputs for ``pairs`` in the layout that :class:`PairLogProbs` expects, on ``device``."""
    batch = build_prefix_sharing_batch(pairs, pad_id) if prefix_sharing else build_separate_batch(pairs, pad_id)
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
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    response_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] chosen, [B] rejected) summed response log-probs under ``lm`` in eval mode, no grad."""
    was_training = lm.training
    lm.eval()
    try:
        scorer = PairLogProbs(lm, prefix_sharing=prefix_sharing, chunk_size=chunk_size, response_only=response_only)
        chosen, rejected = scorer(build_pair_batch(pairs, pad_id, prefix_sharing, device))
    finally:
        lm.train(was_training)
    return chosen.float().cpu(), rejected.float().cpu()
