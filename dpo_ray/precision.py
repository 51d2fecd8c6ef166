"""How the policy and the reference compute: one precision recipe, dropout off, train and eval modes.

DPO compares two forward passes of the same weights: the policy's and the reference's. At step 0 they are
the same model, so every margin must be exactly 0. That holds only if both passes compute alike:

* **One precision recipe.** :func:`resolve_precision` turns ``(model.dtype, train.mixed_precision, device)``
  into the weights dtype and the autocast dtype (or none); the policy, the frozen reference model and the
  precomputed reference pass all load and run with it (:func:`resolve_config_precision`).

  =============  ===============  ======  =============  ============
  model.dtype    mixed_precision  device  weights        autocast
  =============  ===============  ======  =============  ============
  auto/float32   auto             cuda    float32        bfloat16
  auto/float32   auto             cpu     float32        none
  auto/float32   bf16             any     float32        bfloat16
  auto/float32   no               any     float32        none
  bfloat16       auto             cuda    bfloat16       bfloat16
  bfloat16       auto             cpu     bfloat16       none
  bfloat16       bf16             any     bfloat16       bfloat16
  bfloat16       no               any     bfloat16       none
  =============  ===============  ======  =============  ============

  ``model.dtype=auto`` keeps float32 master weights everywhere: bf16 compute on GPU comes from autocast
  (``mixed_precision=auto``), and an optimizer stepping bf16 weights loses small updates. ``bfloat16`` asks
  for bf16 weights (half the memory) in the policy and the reference alike.
* **Dropout off** (:func:`disable_dropout`, as TRL's ``disable_dropout_in_model``, plus the float dropout
  rates that attention code applies functionally in training mode), so train-mode passes are deterministic.
* **Modes.** The policy trains in train mode (gradient checkpointing in transformers runs only then);
  :func:`in_eval_mode` evaluates in eval mode and gives every submodule back its own previous mode.
* **Padding that does not change a pair's numbers.** The precomputed reference pass groups pairs into other
  batches than training does, so a pair is padded to other lengths. CPU attention kernels reduce over the
  padded key length in 16-wide vectors plus a scalar tail, so the padded length alone changed bf16 log-probs
  in the last bits (measured: 9 of 64 step-0 margins not 0). :meth:`dpo_ray.modeling.PairLogProbs.build_batch`
  pads every batch to a multiple of ``dpo_ray.modeling.LENGTH_MULTIPLE``; a pair's real positions then always sit
  in full vectors and the padding adds exact zeros, so its log-probs no longer depend on the batch it is in
  (bf16 on CPU: every step-0 margin exactly 0). fp32 matmuls can still split their reductions by shape, so fp32
  margins may keep a few ~1e-6 residues; GPU kernels (cuBLAS, attention) pick algorithms by shape, so there the
  guarantee is "same recipe", not "same bits".

Imports torch only (no Ray, no transformers).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIXED_PRECISION = {"bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionRecipe:
    """The weights dtype, and the autocast dtype (None: no autocast), on one device type."""

    weights_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this recipe; a no-op context when it has none."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def describe(self) -> dict[str, str]:
        """JSON-able form, for cache keys and logs: {weights, autocast, device}."""
        return {
            "weights": str(self.weights_dtype).removeprefix("torch."),
            "autocast": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "none",
            "device": self.device_type,
        }


def resolve_precision(model_dtype: str, mixed_precision: str, device: torch.device | str) -> PrecisionRecipe:
    """The recipe of ``model.dtype`` x ``train.mixed_precision`` on ``device`` (the table in the module docstring).

    Args:
        model_dtype: ``auto`` | ``float32`` | ``bfloat16``.
        mixed_precision: ``auto`` (bf16 autocast on CUDA, none elsewhere) | ``bf16`` | ``no``.
        device: where the model runs; only its type matters.
    """
    device_type = torch.device(device).type
    if model_dtype not in ("auto", *DTYPES):
        raise ValueError(f"model.dtype must be auto, float32 or bfloat16; got {model_dtype!r}")
    if mixed_precision not in ("auto", "no", *MIXED_PRECISION):
        raise ValueError(f"train.mixed_precision must be auto, bf16 or no; got {mixed_precision!r}")
    weights = DTYPES.get(model_dtype, torch.float32)  # auto: fp32 master weights, bf16 compute from autocast
    if mixed_precision == "auto":
        # CPU bf16 autocast is slow on most CPUs and gains little memory for the small models run there
        autocast = torch.bfloat16 if device_type == "cuda" else None
    else:
        autocast = MIXED_PRECISION.get(mixed_precision)
    return PrecisionRecipe(weights, autocast, device_type)


def resolve_config_precision(cfg: Any, device: torch.device | str) -> PrecisionRecipe:
    """:func:`resolve_precision` of a :class:`~dpo_ray.config.Config`'s model.dtype and train.mixed_precision."""
    return resolve_precision(cfg.model.dtype, cfg.train.mixed_precision, device)


# ---------------------------------------------------------------------------- dropout

# Float attributes that hold a dropout rate applied functionally in training mode, on modules
# (Llama/Qwen2/Mistral attention's ``attention_dropout``, BART/OPT's ``dropout``, ``activation_dropout``) and
# on configs that some attention code reads at forward time (GPT-Neo, GPT-J ``attn_pdrop``, Falcon, Persimmon).
DROPOUT_ATTRIBUTE = re.compile(r"dropout|pdrop|layerdrop|drop_prob|drop_path")


def list_dropout_rates(obj: Any) -> dict[str, float]:
    """{attribute: rate} of ``obj``'s own float attributes named like a dropout rate (booleans excluded)."""
    return {
        name: value for name, value in vars(obj).items() if isinstance(value, float) and DROPOUT_ATTRIBUTE.search(name)
    }


def disable_dropout(model: nn.Module) -> None:
    """Switch every dropout in ``model`` off, in place, so that train mode computes what eval mode does.

    Every ``nn.Dropout``-family module gets ``p = 0`` (TRL's ``disable_dropout_in_model``; with peft that
    includes LoRA's dropout), and every float dropout rate that attention or layer code applies as
    ``F.dropout(x, p=self.attention_dropout, training=self.training)`` is set to 0, on the modules and on
    the model configs they hold (the saved config then records the dropout the policy trained with: none).
    """
    seen_configs: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in list_dropout_rates(module):
            setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and not isinstance(config, nn.Module) and id(config) not in seen_configs:
            seen_configs.add(id(config))
            for name in list_dropout_rates(config):
                setattr(config, name, 0.0)


def list_active_dropout(model: nn.Module) -> list[str]:
    """Where ``model`` would still drop anything in train mode: ``module.attribute`` names, empty when none."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f"{path or '<root>'}.p")
        found.extend(f"{path or '<root>'}.{name}" for name, rate in list_dropout_rates(module).items() if rate > 0)
        config = getattr(module, "config", None)
        if config is not None and not isinstance(config, nn.Module):
            rates = list_dropout_rates(config)
            found.extend(f"{path or '<root>'}.config.{name}" for name, rate in rates.items() if rate > 0)
    return sorted(set(found))


# ---------------------------------------------------------------------------- modes


def prepare_for_training(model: nn.Module, disable_dropout_rates: bool = True) -> nn.Module:
    """``model`` in train mode (transformers checkpoints activations only there), dropout off when asked."""
    model.train()
    if disable_dropout_rates:
        disable_dropout(model)
    return model


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Give every submodule of ``model`` back its own ``training`` flag on exit, whatever ran inside.

    ``model.train(was_training)`` would set one flag on the whole tree; a frozen part kept in eval mode
    inside a training model (or a training model inside a fresh wrapper) would come out in the wrong mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every submodule's previous mode restored after it."""
    with preserved_modes(model):
        model.eval()
        yield


# ---------------------------------------------------------------------------- threads


def count_cpu_threads(cpus_per_worker: float) -> int:
    """torch threads for a process given ``cpus_per_worker`` CPUs: the training workers and the reference
    actors use the same count (the split of an fp32 reduction over threads can change its last bits)."""
    return max(1, int(cpus_per_worker))
