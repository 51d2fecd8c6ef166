"""Print the conformance matrix of tests/test_model_families.py as a table: the largest difference, in nats per
sequence, between dpo-ray's log-probs and the model's own forward, per family, attention and layout.

    .venv/bin/python benchmarks/family_matrix.py          # about a minute on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_model_families as matrix  # noqa: E402  (the test module holds the families and the oracle)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randint(3, matrix.VOCAB, (n,), generator=gen).tolist() for n in shape)
             for shape in matrix.SHAPES]
    print(f"{'family':16} {'attn':6} {'layout':10} {'fp32 response-only':>19} {'fp32 full logits':>17} "
          f"{'bf16 response-only':>19}")
    for family, attn in matrix.MATRIX:
        lm = matrix.build_family_model(family, attn)
        want = matrix.score_with_own_forward(lm, pairs)
        lm16 = matrix.build_family_model(family, attn, torch.bfloat16)
        want16 = matrix.score_with_own_forward(lm16, pairs)
        for sharing in (True, False):
            diffs = []
            for response_only in (True, False):
                got, used = matrix.score_with_dpo_ray(lm, pairs, sharing, response_only)
                diffs.append((got - want).abs().max().item())
            got16, _ = matrix.score_with_dpo_ray(lm16, pairs, sharing, response_only=True)
            layout = "prefix" if used else "separate"
            print(f"{family:16} {attn:6} {layout:10} {diffs[0]:19.2e} {diffs[1]:17.2e} "
                  f"{(got16 - want16).abs().max().item():19.2e}", flush=True)


if __name__ == "__main__":
    main()
