"""The arithmetic task (dpo_ray.task): seeded problems, disjoint splits, the checker, pair building.

Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import pytest

from dpo_ray.task import (
    Problem,
    build_preference_pairs,
    build_sft_rows,
    check_answer,
    check_prompt_answer,
    count_problems,
    format_answer,
    format_prompt,
    generate_problems,
    parse_prompt,
    split_problems,
    summarize_samples,
)

# ---------------------------------------------------------------------------- generation and splits


def test_same_seed_same_problems_other_seed_other_problems():
    assert generate_problems(200, seed=3) == generate_problems(200, seed=3)
    assert generate_problems(200, seed=3) != generate_problems(200, seed=4)


def test_generated_problems_are_distinct_and_in_the_digit_range():
    problems = generate_problems(500, seed=0, min_digits=2, max_digits=3)
    assert len(set(problems)) == 500
    for p in problems:
        assert 10 <= p.a <= 999 and 10 <= p.b <= 999
    assert any(p.a >= 100 for p in problems) and any(p.a < 100 for p in problems)


def test_one_digit_operands_include_zero():
    problems = generate_problems(count_problems(1, 1), seed=0, min_digits=1, max_digits=1)
    assert set(problems) == {Problem(a, b) for a in range(10) for b in range(10)}


def test_exclude_and_impossible_counts():
    first = generate_problems(50, seed=0, min_digits=1, max_digits=1)
    rest = generate_problems(50, seed=1, min_digits=1, max_digits=1, exclude=first)
    assert not set(first) & set(rest)
    with pytest.raises(ValueError, match="do not exist"):
        generate_problems(101, seed=0, min_digits=1, max_digits=1)
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, min_digits=3, max_digits=2)


def test_splits_are_disjoint_deterministic_and_heldout_is_stable():
    splits = split_problems(300, 200, 100, seed=7)
    assert (len(splits.sft), len(splits.pairs), len(splits.heldout)) == (300, 200, 100)
    sft, pairs, heldout = set(splits.sft), set(splits.pairs), set(splits.heldout)
    assert not sft & pairs and not sft & heldout and not pairs & heldout
    assert split_problems(300, 200, 100, seed=7) == splits
    # the held-out prompts do not move when the other splits change size
    assert split_problems(50, 10, 100, seed=7).heldout == splits.heldout


# ---------------------------------------------------------------------------- formatting and checking


def test_format_and_parse_round_trip():
    p = Problem(12, 345)
    assert format_prompt(p) == p.prompt == "12+345="
    assert format_answer(p) == p.answer == "357"
    assert parse_prompt("12+345=") == p
    for bad in ("12+345", "12-3=", " 12+3=", "12+3=\n", "a+b=", ""):
        with pytest.raises(ValueError):
            parse_prompt(bad)


@pytest.mark.parametrize("text", ["357", " 357", "357\n", "\t357 "])
def test_checker_accepts_the_right_answer(text):
    assert check_answer(Problem(12, 345), text)


@pytest.mark.parametrize("text", ["358", "356", "35", "3570", "-357", "+357", "0357", "357.0", "35 7", "357+1",
                                  "357=357", "", "   ", "abc", "3a7", "٣٥٧", "3٥7", "３57", None, 357])
def test_checker_rejects_wrong_and_malformed_answers(text):
    assert not check_answer(Problem(12, 345), text)


def test_checker_accepts_zero_and_checks_by_prompt():
    assert check_answer(Problem(0, 0), "0")
    assert not check_answer(Problem(0, 0), "00")
    assert check_prompt_answer("47+385=", "432")
    assert not check_prompt_answer("47+385=", "431")


def test_sft_rows_hold_the_solution():
    assert build_sft_rows([Problem(1, 2), Problem(40, 2)]) == [
        {"prompt": "1+2=", "chosen": "3"},
        {"prompt": "40+2=", "chosen": "42"},
    ]


# ---------------------------------------------------------------------------- preference pairs


def test_pairs_take_wrong_samples_as_rejected_and_a_verified_sample_as_chosen():
    p = Problem(28, 14)  # 42
    samples = ["41", "42", "41", "52", "42", " 42", "41"]
    rows = build_preference_pairs(p, samples, max_pairs=2)
    assert rows == [
        {"prompt": "28+14=", "chosen": "42", "rejected": "41"},  # the likeliest mistake first
        {"prompt": "28+14=", "chosen": "42", "rejected": "52"},
    ]
    for row in rows:
        assert check_answer(p, row["chosen"]) and not check_answer(p, row["rejected"])


def test_chosen_is_the_models_own_correct_sample_when_it_has_one():
    p = Problem(28, 14)
    rows = build_preference_pairs(p, [" 42", "40"], max_pairs=3)
    assert rows == [{"prompt": "28+14=", "chosen": " 42", "rejected": "40"}]


def test_chosen_falls_back_to_the_known_solution():
    p = Problem(28, 14)
    rows = build_preference_pairs(p, ["41", "43", "41", "4x2"], max_pairs=5)
    assert [r["chosen"] for r in rows] == ["42", "42", "42"]
    assert [r["rejected"] for r in rows] == ["41", "43", "4x2"]  # ties by frequency break by text


def test_no_pair_when_every_sample_is_right_and_blank_samples_are_never_rejected():
    p = Problem(28, 14)
    assert build_preference_pairs(p, ["42", "42"]) == []
    assert build_preference_pairs(p, ["42", "", "  "]) == []
    assert build_preference_pairs(p, ["", "40"]) == [{"prompt": "28+14=", "chosen": "42", "rejected": "40"}]
    assert build_preference_pairs(p, []) == []


def test_sample_summary():
    problems = [Problem(1, 1), Problem(2, 2)]
    summary = summarize_samples(problems, [["2", "3"], ["5", "5"]])
    assert summary == {"sample_accuracy": 0.25, "pass_at_k": 0.5, "all_wrong": 0.5}
