"""A small verifiable task shipped with dpo-ray: multi-digit addition.

A problem is two integers; its prompt is ``"47+385="`` and its answer ``"432"``. Problems are drawn from a
seeded generator, so the same settings give the same prompts on every machine, and the splits (SFT,
preference pairs, held-out) never share a problem. :func:`check_answer` verifies a model's answer text;
:func:`build_preference_pairs` turns a model's checked samples into explicit-format preference rows
``{prompt, chosen, rejected}``: its own wrong answers are rejected, a verified correct answer is chosen.

Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from dpo_ray.verifier import CHOSEN_SOLUTION, TaskPrompt, build_verified_pairs, summarize_verdicts

PROMPT_PATTERN = re.compile(r"^([0-9]+)\+([0-9]+)=$")
ANSWER_PATTERN = re.compile(r"^(0|[1-9][0-9]*)$")  # canonical ASCII decimal: no sign, no leading zeros


@dataclass(frozen=True)
class Problem:
    """``a + b`` with its prompt and answer texts."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return format_prompt(self)

    @property
    def answer(self) -> str:
        return format_answer(self)


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint problem sets: SFT targets, prompts the SFT model answers for pairs, held-out prompts."""

    sft: list[Problem]
    pairs: list[Problem]
    heldout: list[Problem]


# ---------------------------------------------------------------------------- formatting and checking


def format_prompt(problem: Problem) -> str:
    """``"a+b="``: the text the model continues."""
    return f"{problem.a}+{problem.b}="


def format_answer(problem: Problem) -> str:
    """The canonical answer text, ``str(a + b)``."""
    return str(problem.a + problem.b)


def parse_prompt(text: str) -> Problem:
    """The problem of a prompt written by :func:`format_prompt`; raises ValueError for anything else."""
    match = PROMPT_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"not an addition prompt: {text!r}")
    return Problem(int(match.group(1)), int(match.group(2)))


def check_answer(problem: Problem, text: str) -> bool:
    """True when ``text`` (surrounding whitespace ignored) is the canonical decimal of ``a + b``.

    Malformed answers (empty, signs, leading zeros, trailing symbols, several numbers) are wrong.
    """
    if not isinstance(text, str):
        return False
    answer = text.strip()
    return ANSWER_PATTERN.fullmatch(answer) is not None and int(answer) == problem.a + problem.b


# ---------------------------------------------------------------------------- seeded generation


def sample_problem(rng: random.Random, min_digits: int, max_digits: int) -> Problem:
    """Each operand gets a digit count uniform in [min_digits, max_digits], then a uniform value."""

    def operand() -> int:
        digits = rng.randint(min_digits, max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    return Problem(operand(), operand())


def count_problems(min_digits: int, max_digits: int) -> int:
    """How many distinct problems the digit range holds (ordered operand pairs)."""
    low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
    return (10**max_digits - low) ** 2


def generate_problems(count: int, seed: int, min_digits: int = 2, max_digits: int = 3,
                      exclude: Iterable[Problem] = ()) -> list[Problem]:
    """``count`` distinct problems from a seeded generator, none of them in ``exclude``.

    The same arguments give the same list, in the same order, on every run.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits; got {min_digits}, {max_digits}")
    taken = set(exclude)
    if count + len(taken) > count_problems(min_digits, max_digits):
        raise ValueError(f"{count} distinct problems of {min_digits}-{max_digits} digits do not exist")
    rng = random.Random(seed)
    problems: list[Problem] = []
    while len(problems) < count:
        problem = sample_problem(rng, min_digits, max_digits)
        if problem not in taken:
            taken.add(problem)
            problems.append(problem)
    return problems


def split_problems(num_sft: int, num_pairs: int, num_heldout: int, seed: int, min_digits: int = 2,
                   max_digits: int = 3) -> TaskSplits:
    """Three disjoint splits cut from one seeded stream of distinct problems.

    The held-out split comes first in the stream, so it stays the same when the other sizes change.
    """
    problems = generate_problems(num_heldout + num_sft + num_pairs, seed, min_digits, max_digits)
    heldout = problems[:num_heldout]
    sft = problems[num_heldout : num_heldout + num_sft]
    pairs = problems[num_heldout + num_sft :]
    return TaskSplits(sft=sft, pairs=pairs, heldout=heldout)


def build_sft_rows(problems: Sequence[Problem]) -> list[dict[str, str]]:
    """Rows ``{prompt, chosen}``: the known solution is the preferred response (SFT target)."""
    return [{"prompt": p.prompt, "chosen": p.answer} for p in problems]


# ---------------------------------------------------------------------------- preference pairs


def build_preference_pairs(problem: Problem, samples: Sequence[str], max_pairs: int = 2) -> list[dict[str, str]]:
    """Explicit-format rows ``{prompt, chosen, rejected}`` from the model's own samples for one prompt.

    Every sample is checked; :func:`dpo_ray.verifier.build_verified_pairs` makes the rows, with the known
    solution as ``chosen`` when no sample is correct. At most ``max_pairs`` rows per prompt.
    """
    verdicts = [check_answer(problem, s) for s in samples]
    rows, _ = build_verified_pairs(problem.prompt, samples, verdicts, problem.answer, CHOSEN_SOLUTION, max_pairs)
    return rows


def summarize_samples(problems: Sequence[Problem], samples: Sequence[Sequence[str]]) -> dict[str, float]:
    """Sample accuracy (mean over all samples), pass@k and the share of prompts with no correct sample."""
    return summarize_verdicts([[check_answer(p, x) for x in s] for p, s in zip(problems, samples)])


def to_task_prompts(problems: Sequence[Problem]) -> list[TaskPrompt]:
    """The problems as a verifiable task's prompts, each with its known solution."""
    return [TaskPrompt(p.prompt, p.answer) for p in problems]


def check_prompt_answer(prompt: str, text: str) -> bool:
    """:func:`check_answer` for the problem a prompt states (a verifier that needs only texts)."""
    return check_answer(parse_prompt(prompt), text)
