"""Verifiable tasks with any checker: prompts, a pluggable verifier, and pairs built from checked answers.

A checker is any importable function ``f(prompt: str, answer: str) -> bool | int | float``, named in the config as
``task.verifier=package.module:function`` (the embedded arithmetic checker,
:func:`dpo_ray.task.check_prompt_answer`, by default). :class:`Verifier` wraps it: an answer scoring at least
``task.pass_score`` is verified correct. A checker that raises, or returns something that is not a finite number,
stops the run with an error naming the prompt and the answer: a silent zero would turn a broken checker into
"every answer is wrong" and train on it.

:func:`build_verified_pairs` turns one prompt's checked samples into explicit-format rows: the model's own wrong
answers are ``rejected``; ``chosen`` is its most frequent verified answer, else a teacher's (the task's known
solution, or another model's verified answer), and the report counts pairs by that source.

Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_VERIFIER = "dpo_ray.task:check_prompt_answer"

# Where a pair's chosen answer came from (the rounds' reports count pairs by these).
CHOSEN_POLICY = "policy"  # the sampled model's own verified answer
CHOSEN_SOLUTION = "solution"  # the task's known solution
CHOSEN_TEACHER = "teacher"  # a teacher model's verified answer
CHOSEN_SOURCES = (CHOSEN_POLICY, CHOSEN_SOLUTION, CHOSEN_TEACHER)


class VerifierError(ValueError):
    """A checker that cannot be loaded, raised, or returned a non-number; the message names the prompt."""


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt of a verifiable task and, when known, a solution the checker accepts."""

    prompt: str
    solution: str | None = None


@functools.lru_cache(maxsize=None)
def load_verifier_function(spec: str) -> Callable:
    """The function named by ``package.module:function``; a :class:`VerifierError` names what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise VerifierError(f"task.verifier must be 'package.module:function'; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module, named here
        raise VerifierError(f"task.verifier {spec!r}: cannot import {module_name!r}: {exc!r}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise VerifierError(f"task.verifier {spec!r}: {module_name!r} has no function {attr!r}")
    return fn


@dataclass(frozen=True)
class Verifier:
    """``verifier(prompt, answer) -> bool``: the checker's score is at least ``pass_score``.

    Picklable (it holds the name, not the function), so Ray Data actors load the checker themselves.
    """

    spec: str = DEFAULT_VERIFIER
    pass_score: float = 1.0

    def check_loadable(self) -> "Verifier":
        load_verifier_function(self.spec)
        return self

    def score(self, prompt: str, answer: str) -> float:
        """The checker's score as a float (a bool counts 1 or 0); raises :class:`VerifierError` naming the
        prompt when the checker raises or returns a non-number, NaN or an infinity."""
        fn = load_verifier_function(self.spec)
        try:
            value = fn(prompt, answer)
        except Exception as exc:  # noqa: BLE001 - the checker's own failure, reported with its prompt
            raise VerifierError(f"task.verifier {self.spec!r} raised {exc!r} on prompt {prompt!r} "
                                f"(answer {answer!r})") from exc
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise VerifierError(f"task.verifier {self.spec!r} returned {value!r} ({type(value).__name__}) on prompt "
                                f"{prompt!r} (answer {answer!r}); it must return a bool or a finite number")
        return float(value)

    def __call__(self, prompt: str, answer: str) -> bool:
        return self.score(prompt, answer) >= self.pass_score


def build_verifier(task_settings) -> Verifier:
    """The run's :class:`Verifier` from the config's ``task`` section, loaded once here so a bad name fails
    before any model is sampled."""
    return Verifier(task_settings.verifier, task_settings.pass_score).check_loadable()


def read_task_prompts(path: str | Path) -> list[TaskPrompt]:
    """``{"prompt": str, "solution": str (optional)}`` JSON lines; an error names the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise VerifierError(f"task prompts file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise VerifierError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise VerifierError(f"{where}: field 'prompt' must be a non-empty string")
            solution = row.get("solution")
            if solution is not None and (not isinstance(solution, str) or not solution.strip()):
                raise VerifierError(f"{where}: field 'solution' must be a non-empty string when present")
            prompts.append(TaskPrompt(row["prompt"], solution))
    if not prompts:
        raise VerifierError(f"{path}: no prompts")
    return prompts


def build_verified_pairs(prompt: str, samples: Sequence[str], verdicts: Sequence[bool], teacher_answer: str | None,
                         teacher_source: str, max_pairs: int = 2) -> tuple[list[dict[str, str]], str | None]:
    """Explicit-format rows ``{prompt, chosen, rejected}`` from one prompt's checked samples, and the chosen's source.

    Distinct wrong answers become ``rejected``, the most frequent first (the model's likeliest mistakes); blank
    samples are left out, since a response needs text. ``chosen`` is the most frequent verified sample
    (source ``policy``), else ``teacher_answer`` (source ``teacher_source``), else there is no pair. A prompt
    the model always answers correctly gives no pair. At most ``max_pairs`` rows.
    """
    correct = Counter(s for s, ok in zip(samples, verdicts) if ok)
    wrong = Counter(s for s, ok in zip(samples, verdicts) if not ok and s.strip())
    if not wrong:
        return [], None
    if correct:
        chosen, source = correct.most_common(1)[0][0], CHOSEN_POLICY
    elif teacher_answer is not None:
        chosen, source = teacher_answer, teacher_source
    else:
        return [], None
    rejected = [s for s, _ in sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))][:max_pairs]
    return [{"prompt": prompt, "chosen": chosen, "rejected": r} for r in rejected], source


def summarize_verdicts(verdicts: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Sample accuracy (mean over all samples), pass@k and the share of prompts with no verified sample."""
    n = max(len(verdicts), 1)
    total = sum(len(v) for v in verdicts) or 1
    return {
        "sample_accuracy": sum(sum(v) for v in verdicts) / total,
        "pass_at_k": sum(any(v) for v in verdicts) / n,
        "all_wrong": sum(not any(v) for v in verdicts) / n,
    }
