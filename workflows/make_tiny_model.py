#!/usr/bin/env python
"""Build a tiny random-init causal LM (Llama or Qwen2) and its byte-level BPE tokenizer, offline.

    python workflows/make_tiny_model.py --output outputs/tiny-llama --architecture llama --set hidden_size=64

The result is an ordinary Hugging Face directory (safetensors weights, tokenizer.json, chat template)
that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load without a hub.
"""

from dpo_ray.cli import main_make_tiny_model

if __name__ == "__main__":
    main_make_tiny_model()
