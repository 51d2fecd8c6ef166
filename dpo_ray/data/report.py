"""The data report: rows read, kept and dropped (by reason, with example row ids), per source and in total.

Counting is one cheap Ray pass (:func:`summarize_batch` per block, merged in the driver). The report is
written to ``<output_dir>/data_report.json`` on every run, also when a check then stops the run, and
``read == kept + sum(dropped)`` holds for every file, every source and the total (a file that cannot be
read at all counts as one ``unreadable_file`` row, and its cause is in the source's ``unreadable_files``).
The ``split`` section (DPO) gives the pairs and the distinct prompts on each side.

``prompt_rules`` (per source) counts the kept rows by the rule that found their prompt
(:class:`~dpo_ray.data.formats.PromptRule`): ``given``, ``hh_assistant_turn`` and ``common_prefix`` (implicit
rows: HH's last assistant turn, or TRL's common prefix), ``shared_messages``; its counts add up to ``kept``
(empty for SFT, whose rows do not carry the rule).
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa

from dpo_ray.data.formats import DataValidationError, DropReason
from dpo_ray.data.reading import DataSource, explain_unreadable_file

MAX_EXAMPLES = 5
REPORT_FILE = "data_report.json"
SUMMARY_SCHEMA = pa.schema(
    [
        ("role", pa.string()),  # train / eval source
        ("file", pa.string()),
        ("file_index", pa.int64()),
        ("reason", pa.string()),  # "" for kept rows
        ("prompt_rule", pa.string()),  # the PromptRule of kept rows; "" for dropped ones and rows without a rule
        ("split", pa.string()),  # train / eval; null for a row dropped before its prompt was read
        ("rows", pa.int64()),
        ("truncated", pa.int64()),
        ("examples", pa.string()),  # JSON [[position, row_id, field], ...], the first MAX_EXAMPLES by position
    ]
)


def read_prompt_rules(batch: pa.Table) -> list:
    """The ``prompt_rule`` column, or all None for rows that carry no rule (SFT)."""
    if "prompt_rule" in batch.column_names:
        return batch.column("prompt_rule").to_pylist()
    return [None] * batch.num_rows


def summarize_batch(batch: pa.Table) -> pa.Table:
    """Ray UDF: tokenized rows -> one summary row per (source, file, reason, prompt rule, split) of this batch."""
    names = ["role", "file", "file_index", "position", "row_id", "drop_reason", "drop_field", "truncated", "split"]
    groups: dict[tuple, dict[str, Any]] = {}
    for (role, file, index, position, row_id, reason, field, truncated, split), rule in zip(
        zip(*batch.select(names).to_pydict().values()), read_prompt_rules(batch)
    ):
        key = (role, file, index, reason or "", "" if reason else rule or "", split)
        group = groups.setdefault(key, {"rows": 0, "truncated": 0, "examples": []})
        group["rows"] += 1
        group["truncated"] += bool(truncated)
        if reason:
            group["examples"].append([position, row_id, field])
    return pa.table(
        {
            "role": [k[0] for k in groups],
            "file": [k[1] for k in groups],
            "file_index": [k[2] for k in groups],
            "reason": [k[3] for k in groups],
            "prompt_rule": [k[4] for k in groups],
            "split": [k[5] for k in groups],
            "rows": [g["rows"] for g in groups.values()],
            "truncated": [g["truncated"] for g in groups.values()],
            "examples": [json.dumps(heapq.nsmallest(MAX_EXAMPLES, g["examples"])) for g in groups.values()],
        },
        schema=SUMMARY_SCHEMA,
    )


def describe_example(row_id: str, field: str | None, column_map: Mapping[str, str]) -> str:
    """``"train.jsonl:7 (field 'chosen')"``; a mapped field also names its column in the data."""
    if not field:
        return row_id
    target = field.split("[", 1)[0]
    columns = [src for src, dst in column_map.items() if dst == target]
    return f"{row_id} (field '{field}'" + (f", column '{columns[0]}')" if columns else ")")


def build_source_report(source: DataSource, fmt: str, summary: Iterable[Mapping[str, Any]],
                        column_map: Mapping[str, str]) -> dict[str, Any]:
    """The report of one source from the summary rows of all its batches.

    A file a Ray task could not read is read again here to say why (``unreadable_files``: name -> cause).
    """
    files: dict[str, dict[str, Any]] = {}
    unreadable: list[str] = []
    dropped: Counter = Counter()
    examples: dict[str, list] = defaultdict(list)
    splits: Counter = Counter()
    rules: Counter = Counter()
    truncated = 0
    for row in sorted(summary, key=lambda r: (r["file_index"], r["file"])):
        counts = files.setdefault(row["file"], {"read": 0, "kept": 0, "dropped": 0})
        counts["read"] += row["rows"]
        truncated += row["truncated"]
        if row["reason"] == DropReason.UNREADABLE_FILE.value:
            unreadable.append(row["file"])
        if row["reason"]:
            counts["dropped"] += row["rows"]
            dropped[row["reason"]] += row["rows"]
            examples[row["reason"]].extend([row["file_index"], *e] for e in json.loads(row["examples"]))
        else:
            counts["kept"] += row["rows"]
            splits[row["split"]] += row["rows"]
            if row["prompt_rule"]:
                rules[row["prompt_rule"]] += row["rows"]
    read = sum(f["read"] for f in files.values())
    return {
        "key": source.key,
        "path": source.location,
        "kind": source.kind,
        **({"split": source.split} if source.kind != "files" else {}),
        "format": fmt,
        "prompt_rules": dict(rules.most_common()),  # kept rows by the rule that found their prompt
        "read": read,
        "kept": read - sum(dropped.values()),
        "dropped_total": sum(dropped.values()),
        "dropped": dict(dropped.most_common()),
        "examples": {
            reason: [describe_example(rid, field, column_map)
                     for _, _, rid, field in heapq.nsmallest(MAX_EXAMPLES, examples[reason])]
            for reason, _ in dropped.most_common()
        },
        "truncated": truncated,
        "splits": dict(sorted(splits.items())),  # kept rows per split, before data.limit
        "files": files,
        "unreadable_files": {name: explain_unreadable_file(source, name) for name in unreadable},
        "ignored_files": list(source.ignored),
    }


def total_counts(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Read / kept / dropped summed over the sources."""
    dropped: Counter = Counter()
    for src in sources.values():
        dropped.update(src["dropped"])
    read = sum(s["read"] for s in sources.values())
    return {
        "read": read,
        "kept": sum(s["kept"] for s in sources.values()),
        "dropped_total": sum(dropped.values()),
        "dropped": dict(dropped.most_common()),
        "truncated": sum(s["truncated"] for s in sources.values()),
    }


def write_report(report: Mapping[str, Any], output_dir: Path) -> Path:
    """Write ``data_report.json`` into ``output_dir``; returns its path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_counts(counts: Mapping[str, Any]) -> str:
    reasons = ", ".join(f"{r} {n}" for r, n in counts["dropped"].items())
    return (f"read {counts['read']}, kept {counts['kept']}, dropped {counts['dropped_total']}"
            + (f" ({reasons})" if reasons else "") + f", truncated {counts['truncated']}")


def describe_prompt_rules(src: Mapping[str, Any]) -> str:
    """``"; prompt split by common_prefix 118, hh_assistant_turn 2"``, or "" when every prompt was given."""
    rules = src.get("prompt_rules") or {}
    if set(rules) <= {"given"}:
        return ""
    return "; prompt split by " + ", ".join(f"{rule} {n}" for rule, n in rules.items())


def format_summary(report: Mapping[str, Any]) -> str:
    """A few lines for the console: counts per source (with the prompt rules), the split and the cache."""
    lines = [f"data {role}: {src['path']} ({src['format']}{describe_prompt_rules(src)}): {format_counts(src)}"
             for role, src in report["sources"].items()]
    if len(report["sources"]) > 1:
        lines.append(f"data total: {format_counts(report['total'])}")
    split = report.get("split", {})
    if split:
        lines.append(f"data split: {describe_side(split, 'train')} / {describe_side(split, 'eval')} "
                     f"({split['method']})")
        if split.get("shared_prompts"):
            lines.append(f"data split: {split['shared_prompts']} prompts are on both sides (the eval source shares "
                         "them with the train data)")
    return "\n".join(lines)


def describe_side(split: Mapping[str, Any], name: str) -> str:
    """``"900 train pairs of 300 prompts"`` (a report from before the prompt counts: pairs only)."""
    prompts = split.get(f"{name}_prompts")
    return f"{split[f'{name}_pairs']} {name} pairs" + ("" if prompts is None else f" of {prompts} prompts")


def describe_drops(src: Mapping[str, Any], top: int = 3) -> str:
    """The unusable files and the top reasons with example row ids, for an error message."""
    files = ", ".join(f"{name} ({c['dropped']} of {c['read']} unusable)"
                      for name, c in src["files"].items() if c["dropped"])
    reasons = "; ".join(
        f"{reason}: {count} (e.g. {', '.join(src['examples'][reason])})"
        for reason, count in list(src["dropped"].items())[:top]
    )
    return f"Files: {files}. Top reasons: {reasons}."


def check_sources(report: Mapping[str, Any], max_invalid_fraction: float) -> None:
    """Stop before training on an unreadable file, an empty source or one with too many unusable rows.

    Raises:
        DataValidationError: naming the source, its files and the top reasons with example row ids.
    """
    for src in report["sources"].values():
        where = f"{src['key']} ({src['path']})"
        if src.get("unreadable_files"):
            causes = "; ".join(src["unreadable_files"].values())
            raise DataValidationError(
                f"{where}: {len(src['unreadable_files'])} file(s) cannot be read: {causes}. "
                f"Fix or remove them; details in {REPORT_FILE}."
            )
        if src["read"] == 0:
            raise DataValidationError(f"{where}: no rows found; the data is empty")
        fraction = src["dropped_total"] / src["read"]
        if src["kept"] == 0 or fraction > max_invalid_fraction:
            raise DataValidationError(
                f"{where}: {src['dropped_total']} of {src['read']} rows ({fraction:.1%}) are unusable, more than "
                f"data.max_invalid_fraction={max_invalid_fraction}. {describe_drops(src)} "
                f"Fix the data, set data.format / data.column_map, raise data.max_length (prompt_too_long) "
                f"or data.max_invalid_fraction; "
                f"details in {REPORT_FILE}."
            )


def check_splits(report: Mapping[str, Any]) -> None:
    """Stop when the train or the eval split ended up empty."""
    split = report["split"]
    for name in ("train", "eval"):
        if split[f"{name}_pairs"] == 0:
            raise DataValidationError(
                f"the {name} split is empty ({split['method']}; {report['total']['kept']} usable rows in all). "
                "Add rows, change data.eval_fraction, or give data.eval."
            )
