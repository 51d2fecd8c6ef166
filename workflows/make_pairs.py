#!/usr/bin/env python
"""Self-generated preference pairs for the arithmetic task (dpo_ray.task), sampled with Ray Data.

The model answers each prompt several times; the checker marks every answer; wrong answers become
"rejected", verified ones "chosen" (the known solution when no sample is right). Writes explicit-format
JSONL {prompt, chosen, rejected}: <output>/train.jsonl (pair prompts) and <output>/heldout.jsonl.

    python workflows/make_pairs.py --model outputs/demo/sft/final_model --output outputs/pairs
    python workflows/make_pairs.py --model outputs/demo/sft/final_model --output outputs/pairs \
        --demo samples_per_prompt=16 --demo temperature=0.8
"""

from dpo_ray.cli import main_make_pairs

if __name__ == "__main__":
    main_make_pairs()
