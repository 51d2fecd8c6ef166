"""Self-generated preference pairs: a model answers, a checker verifies, wrong answers become ``rejected``.

The demo's pairs step and each round of ``dpo-ray iterate``: the model answers each prompt several times
(:func:`dpo_ray.generation.sample_answers`, Ray Data), the task's checker (:class:`dpo_ray.verifier.Verifier`,
any ``task.verifier``) marks every answer, the model's wrong answers become ``rejected`` and verified correct
ones ``chosen``; when none is correct, a teacher's answer is chosen (:func:`dpo_ray.verifier.build_verified_pairs`).
The rows are written as explicit-format JSONL ``{prompt, chosen, rejected}``, the same input any user's data
would be.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from dpo_ray.generation import GenerationSettings, sample_answers
from dpo_ray.verifier import (
    CHOSEN_SOLUTION,
    CHOSEN_SOURCES,
    CHOSEN_TEACHER,
    TaskPrompt,
    Verifier,
    VerifierError,
    build_verified_pairs,
    summarize_verdicts,
)

TEACHER_SOLUTION = "solution"  # the task's known solution is the teacher
TEACHER_NONE = "none"  # no teacher: a prompt with no verified sample gives no pair (counted)


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


def find_teacher_answers(prompts: Sequence[TaskPrompt], needed: Sequence[int], verifier: Verifier, teacher: str,
                         settings: GenerationSettings) -> dict[int, str]:
    """Verified teacher answers for the prompts at indices ``needed`` (those the student never got right).

    ``teacher``: ``solution`` (each prompt's known solution; one the checker rejects is an error naming the
    prompt), ``none``, or a model directory (hub id) sampled with ``settings``: its most frequent verified answer.
    Prompts without a verified teacher answer are left out.
    """
    if teacher == TEACHER_NONE or not needed:
        return {}
    if teacher == TEACHER_SOLUTION:
        answers = {}
        for i in needed:
            solution = prompts[i].solution
            if solution is None:
                continue
            if not verifier(prompts[i].prompt, solution):
                raise VerifierError(f"the known solution {solution!r} of prompt {prompts[i].prompt!r} is rejected by "
                                    f"task.verifier {verifier.spec!r}: fix the solution or the checker")
            answers[i] = solution
        return answers
    samples = sample_answers([prompts[i].prompt for i in needed], teacher, settings)
    answers = {}
    for i, answers_i in zip(needed, samples):
        verified = Counter(a for a in answers_i if verifier(prompts[i].prompt, a))
        if verified:
            answers[i] = verified.most_common(1)[0][0]
    return answers


def make_preference_pairs(prompts: Sequence[TaskPrompt], model_path: str, settings: GenerationSettings,
                          path: str | os.PathLike, max_pairs_per_prompt: int = 2, verifier: Verifier | None = None,
                          teacher: str = TEACHER_SOLUTION) -> dict:
    """Sample answers to ``prompts`` with the model, check them with ``verifier`` (the arithmetic checker when
    None), and write the explicit-format pairs to ``path`` (JSONL).

    Returns a report: prompts, pairs, prompts with pairs, ``chosen_sources`` (pairs by where chosen came from:
    the policy's own answer, the known solution, a teacher model), ``chosen_from_solution`` (prompts),
    ``no_verified_chosen`` (prompts with wrong answers but no verified chosen: no pair), prompts the model always
    answered correctly (no pair), sample accuracy and pass@k.
    """
    verifier = verifier or Verifier()
    samples = sample_answers([p.prompt for p in prompts], model_path, settings)
    verdicts = [[verifier(p.prompt, s) for s in answers] for p, answers in zip(prompts, samples)]
    needed = [i for i, (answers, ok) in enumerate(zip(samples, verdicts))
              if not any(ok) and any(s.strip() for s in answers)]
    teacher_settings = dataclasses.replace(settings, seed=settings.seed + 7919)  # not the student's draws
    teacher_answers = find_teacher_answers(prompts, needed, verifier, teacher, teacher_settings)
    teacher_source = CHOSEN_SOLUTION if teacher == TEACHER_SOLUTION else CHOSEN_TEACHER
    rows, sources, prompt_sources = [], Counter({s: 0 for s in CHOSEN_SOURCES}), Counter()
    for i, (p, answers, ok) in enumerate(zip(prompts, samples, verdicts)):
        pairs, source = build_verified_pairs(p.prompt, answers, ok, teacher_answers.get(i), teacher_source,
                                             max_pairs_per_prompt)
        rows += pairs
        if source:
            sources[source] += len(pairs)
            prompt_sources[source] += 1
    write_jsonl(rows, path)
    return {
        "file": str(path),
        "prompts": len(prompts),
        "pairs": len(rows),
        "prompts_with_pairs": len({r["prompt"] for r in rows}),
        "chosen_sources": dict(sources),
        "chosen_from_solution": prompt_sources[CHOSEN_SOLUTION],
        "no_verified_chosen": len(needed) - len(teacher_answers),
        "always_correct": sum(1 for ok in verdicts if ok and all(ok)),
        **summarize_verdicts(verdicts),
        "teacher": teacher,
        "settings": asdict(settings),
    }
