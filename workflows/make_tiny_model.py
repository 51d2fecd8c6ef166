#!/usr/bin/env python
"""Build a tiny random-init causal LM (Llama or Qwen2) and its byte-level BPE tokenizer, offline.

The result is an ordinary Hugging Face directory (safetensors weights, tokenizer.json, chat template)
that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load without a hub.
"""
# Usage: .venv/bin/python workflows/make_tiny_model.py --output outputs/tiny-llama --architecture llama --set hidden_size=64

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from dpo_ray.config import BUNDLED_HH_DATA, REPO_ROOT, ConfigError, build_config
from dpo_ray.tiny_model import count_parameters, make_tiny_model


def count_saved_parameters(model_dir: Path) -> int:
    """Parameters in the saved weights, read from the safetensors headers (no model is built)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:  # not ours (e.g. an older directory): load it the ordinary way
        from transformers import AutoModelForCausalLM

        return count_parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                n = 1
                for dim in f.get_slice(name).get_shape():
                    n *= dim
                total += n
    return total


def read_texts(path: Path, max_rows: int) -> list[str]:
    """Chosen and rejected strings of the first ``max_rows`` rows of a (gzipped) JSONL file."""
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
            for key in ("chosen", "rejected"):
                value = row.get(key)
                if isinstance(value, str) and value:
                    texts.append(value)
    return texts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory to write the model and tokenizer to")
    parser.add_argument(
        "--texts",
        default=str(REPO_ROOT / BUNDLED_HH_DATA),
        help="JSONL(.gz) with 'chosen'/'rejected' strings to train the tokenizer on (default: bundled HH sample)",
    )
    parser.add_argument("--architecture", choices=("llama", "qwen2"), default="llama")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TinyModelSettings field, e.g. --set hidden_size=64 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [f"model.tiny.architecture={args.architecture}"]
    overrides += [f"model.tiny.{item}" for item in args.overrides]
    try:
        settings = build_config(None, overrides).model.tiny
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    texts_path = Path(args.texts)
    if not texts_path.exists():
        print(f"error: texts file not found: {texts_path}", file=sys.stderr)
        return 2
    texts = read_texts(texts_path, settings.tokenizer_texts)
    if not texts:
        print(f"error: no 'chosen'/'rejected' strings in {texts_path}", file=sys.stderr)
        return 2

    out = make_tiny_model(args.output, texts, settings, seed=args.seed)

    n_params = count_saved_parameters(Path(out))
    print(f"tiny {settings.architecture} model: {out}")
    print(f"parameters: {n_params:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
