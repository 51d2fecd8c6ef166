"""Tiny local models (dpo_ray.tiny_model) and the workflows/make_tiny_model.py CLI, all offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_ray.config import TinyModelSettings
from dpo_ray.tiny_model import (
    CHAT_TEMPLATE,
    build_tiny_model,
    count_parameters,
    make_cached_tiny_model,
    make_tiny_model,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "workflows" / "make_tiny_model.py"

# Small enough that building one takes well under a second.
SMALL = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
             max_position_embeddings=128)


@pytest.fixture(scope="module")
def small_texts(hh_rows) -> list[str]:
    return [r["chosen"] for r in hh_rows[:30]] + [f"{a}*{b}={a * b}" for a in range(12) for b in range(12)]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def small_model_dirs(tmp_path_factory, small_texts) -> dict[str, str]:
    """make_tiny_model output for each architecture, built once for this module."""
    root = tmp_path_factory.mktemp("small_models")
    return {
        arch: make_tiny_model(root / arch, small_texts, TinyModelSettings(architecture=arch, **SMALL))
        for arch in ("llama", "qwen2")
    }


def test_offline_mode_is_on_for_tests():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_tiny_model_dir_loads_with_auto_classes_offline(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (
        tok.pad_token_id, tok.eos_token_id, tok.bos_token_id,
    )
    assert tok.pad_token_id != tok.eos_token_id  # a real pad token, distinct from EOS
    ids = tok("Human: hi there\n\nAssistant: hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_weights_are_saved_as_safetensors_only(tiny_model_dir):
    files = {p.name for p in Path(tiny_model_dir).iterdir()}
    assert "model.safetensors" in files
    assert "pytorch_model.bin" not in files
    assert not any(name.endswith(".bin") for name in files)
    assert {"config.json", "tokenizer.json"} <= files


def test_digits_are_tokenized_one_by_one(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # The fixture tokenizer was trained on many "a+b=c" strings, so merged digit tokens would exist if allowed.
    for text in ["12345", "12+34=46", "in 2024, 7 of 10"]:
        pieces = [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]
        digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
        assert digit_pieces == [ch for ch in text if ch.isdigit()], (text, pieces)
        assert "".join(pieces) == text
    assert not any(any(c.isdigit() for c in t) and len(t.lstrip("Ġ")) > 1 for t in tok.get_vocab())


def test_chat_template_renders_and_role_tokens_are_single_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template == CHAT_TEMPLATE  # saved and loaded back with the tokenizer
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<|user|>What is 2+2?<|eos|><|assistant|>4<|eos|>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>What is 2+2?<|eos|><|assistant|>"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.eos_token_id in ids
    assert tok.decode(ids) == prompt


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_loaded_tokenizer_encodes_like_the_trained_one(small_model_dirs, hh_rows, architecture):
    """AutoTokenizer may pick a model-specific class (Qwen2Tokenizer for qwen2); it must not re-tokenize."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = small_model_dirs[architecture]
    loaded = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(Path(out) / "tokenizer.json"))
    texts = [r["rejected"] for r in hh_rows[200:260]] + ["naïve café 12:30 ½ x²", "a\r\nb\tc   d"]
    for text in texts:
        assert loaded(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids
        assert loaded.decode(raw.encode(text).ids) == text


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_every_token_id_the_loaded_tokenizer_can_emit_fits_the_embedding(small_model_dirs, architecture):
    """For qwen2, AutoTokenizer forces Qwen2Tokenizer, which adds an unk token '<|endoftext|>' past the
    trained vocabulary: len(tokenizer) == vocab_size + 1, and text containing that string crashes the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = small_model_dirs[architecture]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == architecture
    assert max(tok.all_special_ids) < model.config.vocab_size, tok.special_tokens_map
    assert len(tok) == model.config.vocab_size
    ids = tok("the page ended <|endoftext|> here", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("architecture, model_type", [("llama", "llama"), ("qwen2", "qwen2")])
def test_both_architectures_build_with_the_requested_shape(small_texts, architecture, model_type):
    tok = train_tokenizer(small_texts, vocab_size=SMALL["vocab_size"])
    settings = TinyModelSettings(architecture=architecture, **SMALL)
    model = build_tiny_model(settings, tok, seed=0)
    cfg = model.config
    assert cfg.model_type == model_type
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 2, 4, 2)
    assert cfg.intermediate_size == 64
    assert cfg.vocab_size == len(tok)
    assert cfg.tie_word_embeddings is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, len(tok))


def test_build_is_deterministic_per_seed(small_texts):
    tok = train_tokenizer(small_texts, vocab_size=SMALL["vocab_size"])
    settings = TinyModelSettings(**SMALL)
    a = build_tiny_model(settings, tok, seed=3).state_dict()
    b = build_tiny_model(settings, tok, seed=3).state_dict()
    c = build_tiny_model(settings, tok, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_make_tiny_model_writes_atomically_and_leaves_no_temporary_dirs(small_model_dirs):
    root = Path(small_model_dirs["llama"]).parent
    assert small_model_dirs["llama"] == str(root / "llama")
    assert sorted(p.name for p in root.iterdir()) == ["llama", "qwen2"]  # no .tmp siblings left behind
    for out in small_model_dirs.values():
        assert (Path(out) / "model.safetensors").is_file() and (Path(out) / "tokenizer.json").is_file()


def test_make_cached_tiny_model_returns_the_same_dir_without_rebuilding(tmp_path, small_texts, monkeypatch):
    import dpo_ray.tiny_model as tm

    settings = TinyModelSettings(**SMALL)
    calls = []
    real_train = tm.train_tokenizer
    monkeypatch.setattr(tm, "train_tokenizer", lambda *a, **k: calls.append(1) or real_train(*a, **k))

    first = make_cached_tiny_model(tmp_path, small_texts, settings, seed=0)
    weights = Path(first) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = make_cached_tiny_model(tmp_path, small_texts, settings, seed=0)
    assert first == second
    assert Path(first).parent == tmp_path and Path(first).name.startswith("tiny-")
    assert len(calls) == 1  # built once
    assert weights.stat().st_mtime_ns == stamp

    other_seed = make_cached_tiny_model(tmp_path, small_texts, settings, seed=1)
    other_shape = make_cached_tiny_model(tmp_path, small_texts, TinyModelSettings(**{**SMALL, "hidden_size": 16}))
    assert len({first, other_seed, other_shape}) == 3
    assert len(calls) == 3


# ---------------------------------------------------------------------------- the CLI


def _cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def test_cli_builds_a_model_directory_that_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "cli-model"
    sets = [f"--set={k}={v}" for k, v in SMALL.items()] + ["--set", "tokenizer_texts=40"]
    proc = subprocess.run(
        [sys.executable, str(CLI), "--output", str(out), "--architecture", "qwen2", "--seed", "7", *sets],
        capture_output=True, text=True, env=_cli_env(), cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen2"
    assert model.config.hidden_size == 32 and model.config.vocab_size <= 300
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"
    n_params = count_parameters(model)
    assert f"{n_params:,}" in proc.stdout or str(n_params) in proc.stdout
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()


def test_cli_rejects_an_unknown_setting_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CLI), "--output", str(tmp_path / "x"), "--set", "hidden_sise=64"],
        capture_output=True, text=True, env=_cli_env(), timeout=60,
    )
    assert proc.returncode != 0
    assert "hidden_sise" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_requires_output():
    proc = subprocess.run([sys.executable, str(CLI)], capture_output=True, text=True, env=_cli_env(), timeout=60)
    assert proc.returncode == 2
    assert "--output" in proc.stderr
