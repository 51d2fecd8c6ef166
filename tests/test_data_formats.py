"""Pure-Python parts of the data pipeline (no Ray): parsing, formats, validation, tokenization rules."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray.data.formats import (
    DataValidationError,
    DropReason,
    InvalidRow,
    PromptRule,
    TextPair,
    apply_column_map,
    choose_format,
    extract_text_pair,
    list_source_columns,
    normalize_implicit,
    parse_pair,
    split_common_prefix,
    split_implicit_prompt,
)
from dpo_ray.data.reading import parse_file_bytes, read_preference_texts, resolve_source
from dpo_ray.data.report import build_source_report, check_sources, describe_example, format_summary, summarize_batch
from dpo_ray.data.tokenize import TokenizedPair, encode_pairs, truncate_pair

ROWS = [
    {"prompt": " 3", "chosen": "four", "rejected": "five"},
    {"prompt": "2020-01-01", "chosen": "a date", "rejected": "not a date"},
]


def to_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def to_parquet(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def reason_of(record: dict, fmt: str, tokenizer=None) -> tuple[str, str | None]:
    with pytest.raises(InvalidRow) as info:
        extract_text_pair(record, fmt, tokenizer)
    return info.value.reason.value, info.value.field


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "name, data, ids",
    [
        ("t.jsonl", to_jsonl(ROWS), ["t.jsonl:1", "t.jsonl:2"]),
        ("t.jsonl.gz", gzip.compress(to_jsonl(ROWS)), ["t.jsonl.gz:1", "t.jsonl.gz:2"]),
        ("t.json", json.dumps(ROWS, indent=1).encode(), ["t.json#0", "t.json#1"]),
        ("t.json.gz", gzip.compress(json.dumps(ROWS).encode()), ["t.json.gz#0", "t.json.gz#1"]),
        ("t.json", to_jsonl(ROWS), ["t.json:1", "t.json:2"]),  # .json holding JSON lines
        ("t.parquet", to_parquet(ROWS), ["t.parquet#0", "t.parquet#1"]),
    ],
)
def test_every_file_kind_parses_to_the_same_records_with_exact_ids(name, data, ids):
    parsed = parse_file_bytes(name, data, ["prompt", "chosen", "rejected"])
    assert [p.row_id for p in parsed] == ids
    # Strings stay strings: no " 3" -> 3 (pandas) and no "2020-01-01" -> timestamp (Arrow inference).
    assert [p.record for p in parsed] == ROWS
    assert all(p.problem is None for p in parsed)


def test_json_lines_blank_lines_keep_line_numbers():
    data = b'\n{"chosen": "a"}\n\n   \n{"chosen": "b"}\n'
    assert [(p.row_id, p.record) for p in parse_file_bytes("x.jsonl", data)] == [
        ("x.jsonl:2", {"chosen": "a"}), ("x.jsonl:5", {"chosen": "b"})
    ]


def test_bad_lines_are_found_line_by_line():
    data = b'{"chosen": "a"}\n{"chosen": \n{"chosen": "\xff"}\n[1, 2]\n{"chosen": 3}\n{"a": 1} {"a": 2}\n'
    parsed = parse_file_bytes("bad.jsonl", data)
    assert [(p.row_id, p.problem and p.problem.value) for p in parsed] == [
        ("bad.jsonl:1", None),
        ("bad.jsonl:2", "unparseable_line"),
        ("bad.jsonl:3", "invalid_utf8"),
        ("bad.jsonl:4", "unparseable_line"),
        ("bad.jsonl:5", None),  # parses; its int value is a non_string_field later
        ("bad.jsonl:6", "unparseable_line"),  # two objects on one line
    ]
    assert parsed[4].record == {"chosen": 3}


def test_broken_json_array_is_one_bad_row_at_the_error_line():
    parsed = parse_file_bytes("arr.json", b'[\n{"chosen": "a"},\n{"chosen": }\n]')
    assert [(p.row_id, p.problem) for p in parsed] == [("arr.json:3", DropReason.UNPARSEABLE_LINE)]


def test_corrupt_gzip_names_the_file():
    with pytest.raises(DataValidationError, match="broken.jsonl.gz"):
        parse_file_bytes("broken.jsonl.gz", gzip.compress(b'{"a": 1}\n')[:15])


# ---------------------------------------------------------------------------- formats


def test_format_detection_and_column_map():
    mapped = apply_column_map({"question": "q", "good": "g", "bad": "b", "prompt": "old"},
                              {"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert mapped == {"prompt": "q", "chosen": "g", "rejected": "b"}
    assert sorted(list_source_columns({"question": "prompt"})) == ["chosen", "question", "rejected"]
    explicit, implicit = {"prompt": "p", "chosen": "c", "rejected": "r"}, {"chosen": "c", "rejected": "r"}
    chat = {"chosen": [{"role": "user", "content": "x"}], "rejected": []}
    assert choose_format([explicit, explicit, implicit]) == "explicit"
    assert choose_format([implicit, implicit, explicit, {}]) == "implicit"
    assert choose_format([chat]) == "conversational"


@pytest.mark.parametrize(
    "record, reason, field",
    [
        ({"chosen": "c", "rejected": "r"}, "missing_field", "prompt"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "missing_field", "chosen"),
        ({"prompt": "p", "chosen": "c", "rejected": 7}, "non_string_field", "rejected"),
        ({"prompt": " \n", "chosen": "c", "rejected": "r"}, "empty_field", "prompt"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty_field", "chosen"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected", None),
    ],
)
def test_explicit_rows_are_validated(record, reason, field):
    assert reason_of(record, "explicit") == (reason, field)


def test_implicit_prompt_is_the_common_part_up_to_the_last_assistant_turn():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sing\n\nAssistant:"
    pair = split_implicit_prompt(prompt + " La la. Human: again?", prompt + " La di da.")
    assert pair == TextPair(prompt, " La la. Human: again?", " La di da.")  # inline "Human:" is fine
    # Responses starting alike do not move the prompt past the last turn marker.
    assert split_implicit_prompt(prompt + " I think so", prompt + " I do not").prompt == prompt


def test_implicit_rows_differing_before_the_last_turn_are_a_prompt_mismatch():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye!"
    rejected = "\n\nHuman: Hi\n\nAssistant: Go away"
    assert reason_of({"chosen": chosen, "rejected": rejected}, "implicit") == ("prompt_mismatch", "chosen")
    assert reason_of({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "Yo"}, "implicit") == (
        "prompt_mismatch", "chosen")  # one text has an HH turn: HH's rule, not the common prefix
    empty = {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"}
    assert reason_of(empty, "implicit") == ("empty_field", "chosen")


QA = "Question: What is the capital of France?\nAnswer:"


def test_trl_standard_implicit_rows_split_at_the_common_prefix_less_the_space():
    parsed = parse_pair({"chosen": QA + " Paris", "rejected": QA + " Rome"}, "implicit")
    assert parsed == (TextPair(QA, " Paris", " Rome"), QA, PromptRule.COMMON_PREFIX)
    # TRL's own documented example; only a space moves to the responses, a newline stays in the prompt.
    assert split_common_prefix("The sky is blue.", "The sky is green.") == TextPair("The sky is", " blue.", " green.")
    assert split_common_prefix("Q:\nParis", "Q:\nRome") == TextPair("Q:\n", "Paris", "Rome")
    # As in TRL, a difference inside a word splits the word.
    assert split_common_prefix("The sky is blue.", "The sky is black.") == TextPair("The sky is bl", "ue.", "ack.")


def test_hh_rows_keep_their_rule_and_whole_answers():
    prompt = "\n\nHuman: Capital of France?\n\nAssistant:"
    parsed = parse_pair({"chosen": prompt + " I think Paris", "rejected": prompt + " I think Rome"}, "implicit")
    assert parsed == (TextPair(prompt, " I think Paris", " I think Rome"), prompt, PromptRule.HH_ASSISTANT_TURN)


@pytest.mark.parametrize(
    "chosen, rejected, reason, field",
    [
        (QA + " Paris", QA + " Paris", "chosen_equals_rejected", None),
        ("Paris", "Rome", "no_shared_prompt", None),
        (" Paris", " Rome", "no_shared_prompt", None),  # the shared space moves to the responses: no prompt left
        ("\n Paris", "\n Rome", "no_shared_prompt", None),  # a blank prompt is none
        (QA + " Paris", QA + " Paris, of course", "response_is_prefix", "chosen"),
        (QA + " Paris, of course", QA + " Paris", "response_is_prefix", "rejected"),
        (QA + " Paris", QA + "  ", "empty_field", "rejected"),
    ],
)
def test_common_prefix_rows_without_a_usable_split_are_dropped_by_name(chosen, rejected, reason, field):
    assert reason_of({"chosen": chosen, "rejected": rejected}, "implicit") == (reason, field)


def test_the_report_counts_the_prompt_rules_of_each_source():
    from dpo_ray.data.reading import DataSource

    rows = [("common_prefix", None), ("common_prefix", None), ("hh_assistant_turn", None), (None, "no_shared_prompt")]
    batch = pa.table({
        "role": ["train"] * 4, "file": ["qa.jsonl"] * 4, "file_index": [0] * 4, "position": [1, 2, 3, 4],
        "row_id": [f"qa.jsonl:{i}" for i in range(1, 5)], "drop_reason": [r for _, r in rows],
        "drop_field": [None] * 4, "truncated": [False, False, False, None], "split": ["train"] * 3 + [None],
        "prompt_rule": [rule for rule, _ in rows],
    })
    source = DataSource(key="data.train", spec="/tmp/qa.jsonl", kind="files", location="/tmp/qa.jsonl", split="")
    src = build_source_report(source, "implicit", summarize_batch(batch).to_pylist(), {})
    assert src["prompt_rules"] == {"common_prefix": 2, "hh_assistant_turn": 1}
    assert (src["kept"], src["dropped"], src["examples"]) == (3, {"no_shared_prompt": 1},
                                                               {"no_shared_prompt": ["qa.jsonl:4"]})
    line = format_summary({"sources": {"train": src}})
    assert line.startswith("data train: /tmp/qa.jsonl (implicit; prompt split by common_prefix 2, hh_assistant_turn 1)")


def test_bundled_hh_quirks(hh_rows):
    problems, rules = {}, set()
    for i, row in enumerate(hh_rows):
        try:
            rules.add(normalize_implicit(row)[1])
        except InvalidRow as err:
            problems[i] = (err.reason.value, err.field)
    assert rules == {PromptRule.HH_ASSISTANT_TURN}  # every bundled HH row still splits by HH's rule
    assert problems == {
        86: ("empty_field", "chosen"), 516: ("empty_field", "chosen"), 925: ("empty_field", "chosen"),
        1103: ("empty_field", "chosen"), 1254: ("prompt_mismatch", "chosen"), 1688: ("prompt_mismatch", "chosen"),
    }
    assert hh_rows[86]["chosen"].endswith("Assistant: ")


def test_conversational_rows_render_with_the_chat_template(tokenizer):
    user = {"role": "user", "content": "What is 2+2?"}
    expected = TextPair("<|user|>What is 2+2?<|eos|><|assistant|>", "4<|eos|>", "5<|eos|>")
    answers = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5", "name": None}]
    shapes = [
        {"prompt": [user], "chosen": answers[0], "rejected": answers[1]},  # TRL's prompt + completion
        {"chosen": [user, *answers[0]], "rejected": [user, *answers[1]]},  # full conversations, shared prefix
        {"prompt": user["content"], "chosen": [user, *answers[0]], "rejected": [user, *answers[1]]},  # UltraFeedback
    ]
    for record in shapes:
        assert extract_text_pair(record, "conversational", tokenizer) == expected
    rules = [parse_pair(record, "conversational", tokenizer).rule for record in shapes]
    assert rules == [PromptRule.GIVEN, PromptRule.SHARED_MESSAGES, PromptRule.GIVEN]


def test_conversational_rows_are_validated(tokenizer):
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}
    other = {"role": "user", "content": "Other"}
    cases = [
        ({"chosen": [user, answer], "rejected": [other, answer]}, ("prompt_mismatch", "prompt")),
        ({"chosen": [user, answer, user, answer], "rejected": [user, answer, other, answer]},
         ("prompt_mismatch", "chosen")),
        ({"prompt": [user], "chosen": "Yo", "rejected": [answer]}, ("non_string_field", "chosen")),
        ({"prompt": [user], "chosen": [{"role": "assistant", "content": 5}], "rejected": [answer]},
         ("non_string_field", "chosen[0].content")),
        ({"prompt": [user], "chosen": [{"role": "assistant", "content": " "}], "rejected": [answer]},
         ("empty_field", "chosen")),
        ({"prompt": [user], "rejected": [answer]}, ("missing_field", "chosen")),
        ({"prompt": [user], "chosen": [answer], "rejected": [answer]}, ("chosen_equals_rejected", None)),
    ]
    for record, expected in cases:
        assert reason_of(record, "conversational", tokenizer) == expected


def test_the_canonical_prompt_is_the_same_for_every_pair_and_shape_of_one_prompt(tokenizer):
    prompt = "\n\nHuman: Hi\n\nAssistant:"
    hh = [parse_pair({"chosen": prompt + a, "rejected": prompt + b}, "implicit")
          for a, b in ((" A", " B"), (" C", " D"))]
    assert {p.prompt for p in hh} == {prompt}
    assert parse_pair({"prompt": "Q", "chosen": "a", "rejected": "b"}, "explicit").prompt == "Q"
    user, a, b = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"},
                  {"role": "assistant", "content": "B"})
    shapes = [
        {"prompt": [user], "chosen": [a], "rejected": [b]},
        {"chosen": [user, a], "rejected": [user, b]},
        {"prompt": "Hi", "chosen": [user, b], "rejected": [user, a]},
    ]
    chat = {parse_pair(record, "conversational", tokenizer).prompt for record in shapes}
    assert chat == {'[{"content": "Hi", "role": "user"}]'}  # the parsed messages, not the chat template's text


# ---------------------------------------------------------------------------- tokenization


def test_bos_and_eos_are_added_once(tokenizer):
    plain, chat = encode_pairs(tokenizer, [
        TextPair("Hi", "a b", "c"),
        TextPair("<|bos|><|user|>Hi<|eos|><|assistant|>", "Yo<|eos|>", "No<|eos|>"),
    ])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for pair in (plain, chat):
        assert pair.prompt_ids[0] == bos and pair.prompt_ids.count(bos) == 1
        assert pair.chosen_ids[-1] == eos and pair.chosen_ids.count(eos) == 1
        assert pair.rejected_ids[-1] == eos and pair.rejected_ids.count(eos) == 1
    assert tokenizer.decode(plain.chosen_ids) == "a b<|eos|>"


def test_truncation_keeps_the_prompt_end_and_the_response_starts():
    bos = 0
    prompt, chosen, rejected = [bos, *range(1, 20)], list(range(100, 130)), list(range(200, 205))
    # P=20, M=30, L=32, Pmax=16: prompt keeps max(min(20, 2), min(20, 16)) = 16 tokens, responses 16.
    out = truncate_pair(TokenizedPair(prompt, chosen, rejected), max_length=32, max_prompt_length=16, bos_id=bos)
    assert out.truncated
    assert out.prompt_ids == [bos, *range(5, 20)]  # BOS stays in front of the prompt's end
    assert out.chosen_ids == list(range(100, 116)) and out.rejected_ids == rejected
    assert len(out.prompt_ids) + max(len(out.chosen_ids), len(out.rejected_ids)) <= 32
    # Short responses leave the prompt longer than Pmax: P' = max(min(20, 32 - 5), 16) = 20 (no cut).
    short = truncate_pair(TokenizedPair(prompt, chosen[:5], rejected), 32, 16, bos)
    assert short == TokenizedPair(prompt, chosen[:5], rejected, False)
    # P' = max(min(20, 24 - 10), min(20, 8)) = 14: the prompt gives way to the responses down to Pmax.
    mid = truncate_pair(TokenizedPair(prompt, chosen[:10], rejected), 24, 8, bos)
    assert mid.prompt_ids == [bos, *range(7, 20)] and mid.chosen_ids == chosen[:10]


def test_a_prompt_reaching_max_length_is_dropped():
    with pytest.raises(InvalidRow) as info:
        truncate_pair(TokenizedPair(list(range(32)), [1], [2]), max_length=32, max_prompt_length=16)
    assert (info.value.reason, info.value.field) == (DropReason.PROMPT_TOO_LONG, "prompt")


# ---------------------------------------------------------------------------- sources and reports


def test_sources_that_do_not_exist_name_the_path(tmp_path):
    with pytest.raises(DataValidationError, match="no such file or directory: .*missing.jsonl"):
        resolve_source(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataValidationError, match="holds no"):
        resolve_source(str(tmp_path), "train")
    assert resolve_source("org/some-dataset", "train").kind == "hf_hub"


def test_read_preference_texts_from_a_directory(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(to_jsonl(ROWS))
    (tmp_path / "b.parquet").write_bytes(to_parquet([{"chosen": "x", "rejected": "y"}]))
    assert read_preference_texts(str(tmp_path), limit=10) == [" 3\nfour\nfive", "2020-01-01\na date\nnot a date",
                                                              "x\ny"]
    assert len(read_preference_texts(str(tmp_path), limit=2)) == 2


def test_too_many_unusable_rows_stop_with_files_and_reasons():
    source = {
        "key": "data.train", "path": "/d/train.jsonl", "read": 10, "kept": 7, "dropped_total": 3,
        "dropped": {"missing_field": 2, "empty_field": 1},
        "examples": {"missing_field": ["train.jsonl:3 (field 'prompt')", "train.jsonl:9 (field 'prompt')"],
                     "empty_field": ["train.jsonl:4 (field 'chosen')"]},
        "files": {"train.jsonl": {"read": 10, "kept": 7, "dropped": 3}},
    }
    check_sources({"sources": {"train": source}}, max_invalid_fraction=0.3)
    with pytest.raises(DataValidationError) as info:
        check_sources({"sources": {"train": source}}, max_invalid_fraction=0.2)
    message = str(info.value)
    assert "train.jsonl (3 of 10 unusable)" in message
    assert "missing_field: 2 (e.g. train.jsonl:3 (field 'prompt')" in message and "empty_field: 1" in message
    assert describe_example("f.jsonl:2", "chosen", {"good": "chosen"}) == "f.jsonl:2 (field 'chosen', column 'good')"
