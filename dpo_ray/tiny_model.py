"""Tiny local models: a byte-level BPE tokenizer trained with ``tokenizers`` and a random-init
Llama or Qwen2 causal LM, saved as an ordinary Hugging Face directory.

Nothing here touches the network. ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load the result offline.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable

from dpo_ray.config import TinyModelSettings

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Qwen2's tokenizer class always adds <|endoftext|>; giving it an id inside the vocabulary keeps every
# id the loaded tokenizer can emit inside the model's embedding.
QWEN_ENDOFTEXT = "<|endoftext|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# A minimal chat template so conversational data works with the tiny model, the same way it does with
# any chat model's template (rendered by transformers' apply_chat_template).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts``; digits are split one by one.

    Returns a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos tokens and a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Individual digits make arithmetic learnable for a tiny model; byte-level covers any text.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS, QWEN_ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(settings: TinyModelSettings, tokenizer, seed: int = 0):
    """A random-init causal LM shaped by ``settings`` (Llama or Qwen2), matching ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config_cls = LlamaConfig if settings.architecture == "llama" else Qwen2Config
    config = config_cls(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def fingerprint_tiny_model(settings: TinyModelSettings, texts: list[str], seed: int) -> str:
    """Content key of a tiny model: its shape, its tokenizer texts and the seed."""
    h = hashlib.sha256(json.dumps([settings.__dict__, seed], sort_keys=True, default=str).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def make_tiny_model(output_dir: str | os.PathLike, texts: list[str], settings: TinyModelSettings, seed: int = 0) -> str:
    """Train the tokenizer, build the model and save both to ``output_dir`` (safetensors).

    The directory is written atomically (a temporary sibling, then a rename), so a crash never leaves a
    half-written model that a later run would pick up. Returns the directory as a string.
    """
    out = Path(output_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, settings.vocab_size)
    model = build_tiny_model(settings, tokenizer, seed)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").exists():  # another process won the race with an identical model
                raise
        else:
            os.makedirs(tmp, exist_ok=True)  # let TemporaryDirectory clean up a path that exists
    return str(out)


def make_cached_tiny_model(cache_dir: str | os.PathLike, texts: list[str], settings: TinyModelSettings,
                           seed: int = 0) -> str:
    """:func:`make_tiny_model` under ``cache_dir/tiny-<fingerprint>``: built once, reused after."""
    key = fingerprint_tiny_model(settings, texts, seed)
    return make_tiny_model(Path(cache_dir) / f"tiny-{key}", texts, settings, seed)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_saved_parameters(model_dir: str | os.PathLike) -> int:
    """Parameters in a saved model, read from its safetensors headers (no model is built)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:  # not ours (e.g. a .bin checkpoint): load it the ordinary way
        from transformers import AutoModelForCausalLM

        return count_parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def read_tokenizer_texts(path: str | os.PathLike, max_rows: int) -> list[str]:
    """The ``chosen`` and ``rejected`` strings of the first ``max_rows`` rows (0 = all) of a (gzipped) JSONL file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    rows = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            if max_rows and rows >= max_rows:
                break
            row = json.loads(line)
            rows += 1
            texts += [row[key] for key in ("chosen", "rejected") if isinstance(row.get(key), str) and row[key]]
    return texts
