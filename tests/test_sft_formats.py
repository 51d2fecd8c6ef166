"""SFT reads every format the DPO pipeline reads (rejected may be absent) and reports every row it cannot use."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dpo_ray.config import BUNDLED_HH_DATA, Config, config_from_dict
from dpo_ray.data.formats import DataValidationError, InvalidRow, TextExample, extract_sft_example
from dpo_ray.sft import prepare_sft_data

USER = {"role": "user", "content": "What is 2+2?"}
ANSWER = {"role": "assistant", "content": "4"}


def build_config(root: Path, train: str | Path, **data) -> Config:
    """A validated config writing to ``root/out``, one worker."""
    return config_from_dict(
        {"output_dir": str(root / "out"), "data": {"train": str(train), **data}, "scaling": {"num_workers": 1}}
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reason_of(record: dict, fmt: str, tokenizer=None) -> tuple[str, str | None]:
    with pytest.raises(InvalidRow) as info:
        extract_sft_example(record, fmt, tokenizer)
    return info.value.reason.value, info.value.field


# ---------------------------------------------------------------------------- rows (no Ray)


def test_sft_rows_of_every_format_need_no_rejected(tokenizer):
    assert extract_sft_example({"prompt": "Q", "chosen": "A"}, "explicit") == TextExample("Q", "A")
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sing\n\nAssistant: La la. Human: again?"
    assert extract_sft_example({"chosen": dialogue}, "implicit") == TextExample(
        "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sing\n\nAssistant:", " La la. Human: again?")
    qa = "Question: What is the capital of France?\nAnswer:"  # TRL's standard implicit rows: the prompt as DPO's
    assert extract_sft_example({"chosen": qa + " Paris", "rejected": qa + " Rome"}, "implicit") == TextExample(
        qa, " Paris")
    expected = TextExample("<|user|>What is 2+2?<|eos|><|assistant|>", "4<|eos|>")
    for record in ({"prompt": [USER], "chosen": [ANSWER]}, {"chosen": [USER, ANSWER]},
                   {"prompt": USER["content"], "chosen": [USER, ANSWER], "rejected": "ignored"}):
        assert extract_sft_example(record, "conversational", tokenizer) == expected


def test_sft_rows_that_cannot_be_used_name_the_reason_and_field(tokenizer):
    assert reason_of({"chosen": "A"}, "explicit") == ("missing_field", "prompt")
    assert reason_of({"prompt": "Q", "chosen": " "}, "explicit") == ("empty_field", "chosen")
    assert reason_of({"chosen": "\n\nHuman: Hi\n\nAssistant: "}, "implicit") == ("empty_field", "chosen")
    # Without an HH turn the prompt is the common prefix with rejected, so rejected is needed.
    assert reason_of({"chosen": "no turns at all"}, "implicit") == ("missing_field", "rejected")
    assert reason_of({"chosen": "Q: A", "rejected": "Q: A, B"}, "implicit") == ("response_is_prefix", "chosen")
    assert reason_of({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Bye"}, "implicit") == (
        "prompt_mismatch",
        "chosen",
    )
    assert reason_of({"chosen": [ANSWER]}, "conversational", tokenizer) == ("missing_field", "prompt")
    assert reason_of({"prompt": [USER], "chosen": "4"}, "conversational", tokenizer) == ("non_string_field", "chosen")
    assert reason_of({"chosen": [USER]}, "conversational", tokenizer) == ("empty_field", "chosen")


# ---------------------------------------------------------------------------- prepare_sft_data (Ray)


def test_sft_reads_the_bundled_hh_file_in_its_implicit_format(ray_session, tiny_model_dir, tmp_path):
    from dpo_ray.modeling import load_tokenizer

    cfg = build_config(tmp_path, BUNDLED_HH_DATA, max_length=1024, max_invalid_fraction=0.05)
    datasets, report = prepare_sft_data(cfg, tiny_model_dir)

    src = report["sources"]["train"]
    name = Path(BUNDLED_HH_DATA).name
    assert (src["format"], src["read"]) == ("implicit", 1800)
    assert src["dropped"]["empty_field"] == 4  # final assistant turns left blank
    assert src["examples"]["empty_field"] == [f"{name}:{i + 1} (field 'chosen')" for i in (86, 516, 925, 1103)]
    assert "prompt_mismatch" not in src["dropped"]  # the two rows DPO drops for their rejected side are fine here
    assert set(src["dropped"]) <= {"empty_field", "prompt_too_long"}
    assert src["read"] == src["kept"] + src["dropped_total"] and datasets["train"].count() == src["kept"]
    assert json.loads((tmp_path / "out" / "data_report.json").read_text()) == report

    tokenizer = load_tokenizer(tiny_model_dir)
    row = next(r for r in datasets["train"].take_all() if r["row_id"] == f"{name}:1")
    assert tokenizer.decode(row["prompt_ids"]).rstrip().endswith("Assistant:")
    assert list(row["response_ids"])[-1] == tokenizer.eos_token_id
    assert row["num_tokens"] == len(row["prompt_ids"]) + len(row["response_ids"]) <= 1024


def test_sft_reads_conversations_and_reports_the_rows_it_cannot_use(ray_session, tiny_model_dir, tmp_path):
    from dpo_ray.modeling import load_tokenizer

    def conversation(i):
        return {
            "chosen": [{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]
        }

    rows = [conversation(i) for i in range(20)]
    rows[3] = {"prompt": [USER], "chosen": "4"}  # line 4: a string where messages belong
    rows[7] = {"chosen": [ANSWER]}  # line 8: nothing to answer
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    datasets, report = prepare_sft_data(build_config(tmp_path, path, max_invalid_fraction=0.2), tiny_model_dir)

    src = report["sources"]["train"]
    assert (src["format"], src["read"], src["kept"]) == ("conversational", 20, 18)
    assert src["examples"] == {
        "non_string_field": ["chat.jsonl:4 (field 'chosen')"],
        "missing_field": ["chat.jsonl:8 (field 'prompt')"],
    }
    tokenizer = load_tokenizer(tiny_model_dir)
    row = next(r for r in datasets["train"].take_all() if r["row_id"] == "chat.jsonl:3")
    assert tokenizer.decode(row["prompt_ids"]) == "<|bos|><|user|>What is 2+2?<|eos|><|assistant|>"
    assert tokenizer.decode(row["response_ids"]) == "4<|eos|>"

    # Under the default 1% limit the same rows stop the run, naming the file, the reasons and the rows.
    with pytest.raises(DataValidationError) as info:
        prepare_sft_data(build_config(tmp_path / "strict", path), tiny_model_dir)
    message = str(info.value)
    assert "2 of 20 rows" in message and "chat.jsonl (2 of 20 unusable)" in message
    assert "non_string_field: 1 (e.g. chat.jsonl:4 (field 'chosen'))" in message


def test_sft_names_an_unreadable_or_empty_file(ray_session, tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": f"Q{i}", "chosen": f"A{i}"} for i in range(250)])
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "Q", "chosen": "A"}\n' * 50)[:40])
    with pytest.raises(DataValidationError, match="data.train .* cannot be read: b.jsonl.gz: not a readable gzip file"):
        prepare_sft_data(build_config(tmp_path, folder), tiny_model_dir)
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert list(report["sources"]["train"]["unreadable_files"]) == ["b.jsonl.gz"]

    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataValidationError, match="data.train .*empty.jsonl.*no rows found"):
        prepare_sft_data(build_config(tmp_path, tmp_path / "empty.jsonl"), tiny_model_dir)
