"""Self-generated preference pairs: a model answers, a checker verifies, wrong answers become ``rejected``.

The demo's pairs step (and the building block of rounds of it): the model answers each prompt several times
(:func:`dpo_ray.generation.sample_answers`, Ray Data), the task's checker marks every answer, the model's wrong
answers become ``rejected`` and verified correct ones ``chosen`` (:func:`dpo_ray.task.build_preference_pairs`;
the known solution when no sample is right). The rows are written as explicit-format JSONL
``{prompt, chosen, rejected}``, the same input any user's data would be.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from dpo_ray.generation import GenerationSettings, sample_answers
from dpo_ray.task import build_preference_pairs, check_answer, summarize_samples


def write_jsonl(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` as JSON lines, atomically (a temporary sibling, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def make_preference_pairs(problems: Sequence, model_path: str, settings: GenerationSettings, path: str | os.PathLike,
                          max_pairs_per_prompt: int = 2) -> dict:
    """Sample answers to ``problems`` (:class:`dpo_ray.task.Problem`) with the model, check them, and write
    the explicit-format pairs to ``path`` (JSONL).

    Returns a report: prompts, pairs, prompts whose chosen is the known solution (no correct sample),
    prompts the model always answered correctly (no pair), sample accuracy and pass@k.
    """
    samples = sample_answers([p.prompt for p in problems], model_path, settings)
    rows = [row for problem, answers in zip(problems, samples)
            for row in build_preference_pairs(problem, answers, max_pairs_per_prompt)]
    write_jsonl(rows, path)
    with_pairs = {r["prompt"] for r in rows}
    return {
        "file": str(path),
        "prompts": len(problems),
        "pairs": len(rows),
        "prompts_with_pairs": len(with_pairs),
        "chosen_from_solution": sum(
            1 for p, s in zip(problems, samples) if p.prompt in with_pairs and not any(check_answer(p, x) for x in s)
        ),
        "always_correct": sum(1 for p, s in zip(problems, samples) if s and all(check_answer(p, x) for x in s)),
        **summarize_samples(problems, samples),
        "settings": asdict(settings),
    }
