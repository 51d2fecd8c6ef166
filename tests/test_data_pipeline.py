"""prepare_data on Ray Data (shared local Ray from ``ray_session``): formats, the report, splits, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray.config import BUNDLED_HH_DATA, REPO_ROOT, Config, config_from_dict
from dpo_ray.data import DataValidationError, prepare_data
from dpo_ray.data.pipeline import PUBLIC_COLUMNS


def build_config(root: Path, train: str | Path, **data) -> Config:
    """A validated config writing to ``root/out`` (cache in ``root/cache``), one worker."""
    return config_from_dict(
        {"output_dir": str(root / "out"), "data": {"train": str(train), **data}, "scaling": {"num_workers": 1}}
    )


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a ``bytes`` row is written as the raw line."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def explicit_rows(start: int, count: int) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i}+1?", "chosen": f"It is {i + 1}.", "rejected": f"It is {i}."}
            for i in range(start, start + count)]


def row_ids(dataset) -> list[str]:
    return sorted(r["row_id"] for r in dataset.take_all())


def assert_counts_add_up(report: dict) -> None:
    for counts in [*report["sources"].values(), report["total"]]:
        assert (counts["read"] == counts["kept"] + sum(counts["dropped"].values())
                == counts["kept"] + counts["dropped_total"])
    for src in report["sources"].values():
        assert sum(f["read"] for f in src["files"].values()) == src["read"]


def test_bundled_hh_file_reports_its_quirks(ray_session, tiny_model_dir, tmp_path):
    cfg = build_config(tmp_path, BUNDLED_HH_DATA, max_length=1024, max_invalid_fraction=0.05)
    data = prepare_data(cfg, tiny_model_dir, None)

    src = data.report["sources"]["train"]
    assert (src["format"], src["read"], src["path"]) == ("implicit", 1800, str(REPO_ROOT / BUNDLED_HH_DATA))
    name = Path(BUNDLED_HH_DATA).name
    assert src["dropped"]["empty_field"] == 4
    assert src["examples"]["empty_field"] == [f"{name}:{i + 1} (field 'chosen')" for i in (86, 516, 925, 1103)]
    assert src["dropped"]["prompt_mismatch"] == 2
    assert src["examples"]["prompt_mismatch"] == [f"{name}:{i + 1} (field 'chosen')" for i in (1254, 1688)]
    assert set(src["dropped"]) <= {"empty_field", "prompt_mismatch", "prompt_too_long"}
    assert src["truncated"] > 0
    assert_counts_add_up(data.report)
    assert json.loads((tmp_path / "out" / "data_report.json").read_text()) == data.report

    assert data.train_pairs + data.eval_pairs == src["kept"]
    assert (data.train.count(), data.eval.count()) == (data.train_pairs, data.eval_pairs)
    assert data.train.columns() == list(PUBLIC_COLUMNS) and data.reference_passes == 0
    rows = data.train.take_all() + data.eval.take_all()
    assert len({r["row_id"] for r in rows}) == len(rows)
    for row in rows:
        longest = max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        assert len(row["prompt_ids"]) + longest <= 1024
        assert row["num_tokens"] == len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])


def test_every_invalid_row_is_counted_with_its_row_id(ray_session, tiny_model_dir, tmp_path):
    good = explicit_rows(0, 24)
    bad = [
        b'{"prompt": "p", "chosen": ',  # line 3
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # line 4: latin-1, not UTF-8
        {"chosen": "a", "rejected": "b"},  # line 5
        {"prompt": "p", "chosen": "  ", "rejected": "b"},  # line 6
        {"prompt": "p", "chosen": "a", "rejected": 5},  # line 7
        {"prompt": "p", "chosen": "same", "rejected": "same"},  # line 8
        {"prompt": "word " * 300, "chosen": "a", "rejected": "b"},  # line 9: prompt_too_long
        {"prompt": "short", "chosen": "long answer " * 100, "rejected": "b"},  # line 10: truncated, kept
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", good[:2] + bad + good[2:])
    cfg = build_config(tmp_path, path, max_length=64, max_invalid_fraction=0.5, eval_fraction=0.25)
    data = prepare_data(cfg, tiny_model_dir, None)

    src = data.report["sources"]["train"]
    assert src["examples"] == {
        "unparseable_line": ["bad.jsonl:3"],
        "invalid_utf8": ["bad.jsonl:4"],
        "missing_field": ["bad.jsonl:5 (field 'prompt')"],
        "empty_field": ["bad.jsonl:6 (field 'chosen')"],
        "non_string_field": ["bad.jsonl:7 (field 'rejected')"],
        "chosen_equals_rejected": ["bad.jsonl:8"],
        "prompt_too_long": ["bad.jsonl:9 (field 'prompt')"],
    }
    assert (src["read"], src["kept"], src["dropped_total"], src["truncated"]) == (32, 25, 7, 1)
    assert_counts_add_up(data.report)
    assert "bad.jsonl:10" in {r["row_id"] for r in data.train.take_all() + data.eval.take_all()}

    # The same data under the default 1% limit stops before training (from the cached report too),
    # naming the file and the reasons, and the report is still written.
    (tmp_path / "out" / "data_report.json").unlink()
    strict = build_config(tmp_path, path, max_length=64, eval_fraction=0.25)
    with pytest.raises(DataValidationError) as info:
        prepare_data(strict, tiny_model_dir, None)
    message = str(info.value)
    assert "7 of 32 rows" in message and "bad.jsonl (7 of 32 unusable)" in message
    assert "unparseable_line: 1 (e.g. bad.jsonl:3)" in message and "prompt_too_long" in message
    assert json.loads((tmp_path / "out" / "data_report.json").read_text())["total"]["dropped_total"] == 7


def test_directory_of_every_file_kind_with_a_deterministic_split(ray_session, tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n"
                                                               for r in explicit_rows(0, 10))))
    (folder / "b.json").write_text(json.dumps(explicit_rows(10, 10), indent=2))
    pq.write_table(pa.Table.from_pylist(explicit_rows(20, 10)), folder / "sub" / "c.parquet")
    (folder / "README.md").write_text("not data")

    first = prepare_data(build_config(tmp_path / "one", folder, eval_fraction=0.3), tiny_model_dir, None)
    src = first.report["sources"]["train"]
    assert src["files"] == {name: {"read": 10, "kept": 10, "dropped": 0}
                            for name in ("a.jsonl.gz", "b.json", "sub/c.parquet")}
    assert src["ignored_files"] == ["README.md"] and src["format"] == "explicit"
    train_ids, eval_ids = row_ids(first.train), row_ids(first.eval)
    assert {"a.jsonl.gz:1", "b.json#0", "sub/c.parquet#9"} <= set(train_ids + eval_ids)
    assert len(train_ids) + len(eval_ids) == 30 and 0 < len(eval_ids) < 30

    # Other worker count and cache, with a limit: the same eval rows, train = its first 5 rows in file order.
    other = build_config(tmp_path / "two", folder, eval_fraction=0.3, limit=5)
    other.scaling.num_workers = 4
    second = prepare_data(other, tiny_model_dir, None)
    assert row_ids(second.eval) == eval_ids
    order = {f"a.jsonl.gz:{i + 1}": (0, i) for i in range(10)} | {f"b.json#{i}": (1, i) for i in range(10)}
    order |= {f"sub/c.parquet#{i}": (2, i) for i in range(10)}
    assert row_ids(second.train) == sorted(sorted(train_ids, key=order.get)[:5])
    assert second.train_pairs == 5


def test_local_hf_dataset_with_column_map_and_eval_split(ray_session, tiny_model_dir, tmp_path):
    import datasets

    def rows(start, count):
        return [{"question": f"q{i}?", "good": f"yes {i}", "bad": f"no {i}", "id": i}
                for i in range(start, start + count)]

    train = rows(0, 12) + [{"question": "q?", "good": None, "bad": "no", "id": 99}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(rows(50, 4))}
    ).save_to_disk(str(tmp_path / "hf"))
    cfg = build_config(tmp_path, tmp_path / "hf", split="train", eval_split="test", max_invalid_fraction=0.1,
                       column_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    data = prepare_data(cfg, tiny_model_dir, None)

    report = data.report
    assert report["sources"]["train"]["kind"] == "hf_disk" and report["sources"]["train"]["format"] == "explicit"
    assert report["sources"]["train"]["examples"] == {"missing_field": ["hf[train]#12 (field 'chosen', column 'good')"]}
    assert row_ids(data.eval) == sorted(f"hf[test]#{i}" for i in range(4))
    assert row_ids(data.train) == sorted(f"hf[train]#{i}" for i in range(12))
    assert_counts_add_up(report)


def test_conversational_data_uses_the_chat_template(ray_session, tiny_model_dir, tmp_path):
    from dpo_ray.modeling import load_tokenizer

    def conversation(i):
        user = {"role": "user", "content": f"What is {i}+{i}?"}
        return {"prompt": [user], "chosen": [{"role": "assistant", "content": str(2 * i)}],
                "rejected": [{"role": "assistant", "content": str(2 * i + 1)}]}

    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(8)])
    data = prepare_data(build_config(tmp_path, path, eval_fraction=0.5), tiny_model_dir, None)

    assert data.report["sources"]["train"]["format"] == "conversational"
    tokenizer = load_tokenizer(tiny_model_dir)
    row = next(r for r in data.train.take_all() + data.eval.take_all() if r["row_id"] == "chat.jsonl:3")
    assert tokenizer.decode(row["prompt_ids"]) == "<|bos|><|user|>What is 2+2?<|eos|><|assistant|>"
    assert tokenizer.decode(row["chosen_ids"]) == "4<|eos|>"
    assert tokenizer.decode(row["rejected_ids"]) == "5<|eos|>"


def test_missing_and_empty_data_are_errors(ray_session, tiny_model_dir, tmp_path):
    with pytest.raises(DataValidationError, match="no such file or directory: .*nowhere.jsonl"):
        prepare_data(build_config(tmp_path, tmp_path / "nowhere.jsonl"), tiny_model_dir, None)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataValidationError, match="data.train .*empty.jsonl.*no rows found"):
        prepare_data(build_config(tmp_path, tmp_path / "empty.jsonl"), tiny_model_dir, None)
    assert json.loads((tmp_path / "out" / "data_report.json").read_text())["total"]["read"] == 0
    few = write_jsonl(tmp_path / "few.jsonl", explicit_rows(0, 3))
    with pytest.raises(DataValidationError, match="the eval split is empty"):
        prepare_data(build_config(tmp_path / "few", few, eval_fraction=0.01), tiny_model_dir, None)
    assert json.loads((tmp_path / "few" / "out" / "data_report.json").read_text())["split"]["eval_pairs"] == 0


def test_every_pair_of_a_prompt_is_held_out_on_the_same_side(ray_session, tiny_model_dir, tmp_path):
    from dpo_ray.data.pipeline import SPLIT_RULE_VERSION, hash_fraction

    # 40 prompts x 3 pairs, one pair of each prompt in each of three files (three tasks and blocks).
    folder = tmp_path / "data"
    folder.mkdir()
    prompt_of = {}
    for k, name in enumerate(("a.jsonl", "b.jsonl", "c.jsonl")):
        rows = [{"prompt": f"Question {i}: what is {i}+1?", "chosen": f"It is {i + 1}.", "rejected": f"Maybe {i + k}."}
                for i in range(40)]
        write_jsonl(folder / name, rows)
        prompt_of |= {f"{name}:{line}": row["prompt"] for line, row in enumerate(rows, 1)}
    cfg = build_config(tmp_path, folder, eval_fraction=0.25)
    data = prepare_data(cfg, tiny_model_dir, None)

    sides = {"train": data.train.take_all(), "eval": data.eval.take_all()}
    prompts = {name: {prompt_of[r["row_id"]] for r in rows} for name, rows in sides.items()}
    assert not prompts["train"] & prompts["eval"]
    assert len(prompts["train"]) + len(prompts["eval"]) == 40 and prompts["eval"]
    split = data.report["split"]
    assert split["unit"] == "prompt" and split["method"].startswith("by prompt: hash(prompt, seed 1234)")
    assert (split["train_prompts"], split["eval_prompts"], split["shared_prompts"]) == (
        len(prompts["train"]), len(prompts["eval"]), 0)
    assert (split["train_pairs"], split["eval_pairs"]) == (3 * split["train_prompts"], 3 * split["eval_prompts"])
    assert (len(sides["train"]), len(sides["eval"])) == (split["train_pairs"], split["eval_pairs"])
    assert json.loads((tmp_path / "out" / "data_report.json").read_text())["split"] == split
    done = json.loads((Path(data.cache_dir) / "done.json").read_text())
    assert done["parts"]["split_rule"] == SPLIT_RULE_VERSION  # caches of the row-id rule are not reused

    # The old rule (hash of row_id and seed) would have put some prompt on both sides of this data.
    old_side = {rid: hash_fraction(rid, 1234) < 0.25 for rid in prompt_of}
    assert any(len({old_side[rid] for rid in prompt_of if prompt_of[rid] == p}) == 2 for p in set(prompt_of.values()))


def test_an_explicit_eval_source_reports_the_prompts_it_shares(ray_session, tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", explicit_rows(0, 10))
    held_out = write_jsonl(tmp_path / "eval.jsonl", explicit_rows(8, 4))  # prompts 8 and 9 are in both
    data = prepare_data(build_config(tmp_path, train, eval=str(held_out)), tiny_model_dir, None)

    split = data.report["split"]
    assert (split["unit"], split["method"]) == ("source", "eval from data.eval")
    assert (split["train_pairs"], split["eval_pairs"]) == (10, 4)
    assert (split["train_prompts"], split["eval_prompts"], split["shared_prompts"]) == (10, 4, 2)


def test_an_unreadable_file_stops_the_run_naming_the_file_and_the_cause(ray_session, tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", explicit_rows(0, 250))  # more than the format detection reads
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n"
                                                                for r in explicit_rows(20, 50)))[:60])
    with pytest.raises(DataValidationError) as info:
        prepare_data(build_config(tmp_path, folder), tiny_model_dir, None)
    assert "1 file(s) cannot be read: b.jsonl.gz: not a readable gzip file (Compressed file ended" in str(info.value)
    src = json.loads((tmp_path / "out" / "data_report.json").read_text())["sources"]["train"]
    assert src["dropped"] == {"unreadable_file": 1} and src["examples"] == {"unreadable_file": ["b.jsonl.gz"]}
    assert list(src["unreadable_files"]) == ["b.jsonl.gz"] and src["files"]["a.jsonl"]["kept"] == 250

    # Where the format detection reaches the file, the driver stops already, also naming it and the cause.
    with pytest.raises(DataValidationError, match=r"b\.jsonl\.gz: cannot be read \(EOFError: Compressed file ended"):
        prepare_data(build_config(tmp_path / "alone", folder / "b.jsonl.gz"), tiny_model_dir, None)
