"""Supervised fine-tuning (SFT) on preferred responses, as a Ray Train job.

The DPO paper builds its reference policy this way when no SFT model exists: maximum likelihood on the
preferred responses, ``pi_ref = argmax E_(x, y_w) log pi(y_w | x)`` (Rafailov et al., 2023, Sec. 4). The
same loop is the Preferred-FT baseline of the paper's experiments.

The data is read and tokenized exactly as the DPO pipeline does it (:mod:`dpo_ray.data`): any source
``data.train`` accepts, in any of its formats (explicit ``prompt`` and ``chosen`` strings, implicit-prompt
dialogues such as Anthropic HH, conversational messages through the chat template; ``data.format`` or
detected), with ``rejected`` ignored and possibly absent; BOS starts the prompt, EOS ends the response.
Every row that cannot be used is counted by reason, with example row ids, in
``<output_dir>/data_report.json`` (the DPO report's per-source shape), and the run stops, as DPO does, on
an unreadable file, an empty source or more than ``data.max_invalid_fraction`` unusable rows. The objective
(:mod:`dpo_ray.sft_objective`) trains in the same worker loop as DPO. Training settings come from the usual
:class:`~dpo_ray.config.Config`: ``train.*`` (learning rate, batch size, steps, schedule, checkpoints),
``scaling.*`` (Ray Train workers, DDP or FSDP), ``model.*`` (start model, LoRA), ``output_dir`` and ``run_name``.

``run_sft(cfg)`` writes ``<output_dir>/final_model`` (a Hugging Face directory with the tokenizer),
``<output_dir>/data_report.json`` and ``<output_dir>/summary.json``. The same ``run_name`` resumes from the latest
checkpoint, as for DPO.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpo_ray.checkpointing import copy_model_dir
from dpo_ray.config import Config
from dpo_ray.data.report import REPORT_FILE
from dpo_ray.modeling import load_tokenizer
from dpo_ray.trainer import SUMMARY_FILE, build_trainer, fit_trainer, pad_token_id, prepare_model_path, start_run

logger = logging.getLogger(__name__)

SFT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("num_tokens", pa.int64()),
    ]
)
SFT_TOKENIZED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("role", pa.string()),  # train / eval source
        ("file", pa.string()),
        ("file_index", pa.int64()),
        ("position", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("num_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("drop_reason", pa.string()),
        ("drop_field", pa.string()),
        ("split", pa.string()),  # the source's role, for the data report's per-split counts
    ]
)
# ------------------------------------------------------------------------------------ data


@functools.lru_cache(maxsize=2)
def load_cached_tokenizer(tokenizer_path: str, trust_remote_code: bool):
    """One tokenizer per Ray worker process, reused across the batches it handles."""
    return load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)


def build_sft_table(batch: pa.Table, tokenized: list, reasons: list, fields: list, role: str) -> pa.Table:
    """:data:`SFT_TOKENIZED_SCHEMA` rows; token columns are null for unusable rows (``tokenized[i]`` None)."""

    def column(get):
        return [None if t is None else get(t) for t in tokenized]

    data = {name: batch.column(name) for name in ("row_id", "file", "file_index", "position")}
    data.update(
        role=[role] * batch.num_rows,
        prompt_ids=column(lambda t: t.prompt_ids),
        response_ids=column(lambda t: t.chosen_ids),
        num_tokens=column(lambda t: len(t.prompt_ids) + len(t.chosen_ids)),
        truncated=column(lambda t: t.truncated),
        drop_reason=reasons,
        drop_field=fields,
        split=[role] * batch.num_rows,
    )
    return pa.table(data, schema=SFT_TOKENIZED_SCHEMA)


def tokenize_sft_batch(
    batch: pa.Table,
    tokenizer_path: str,
    fmt: str,
    role: str,
    max_length: int,
    max_prompt_length: int,
    trust_remote_code: bool = False,
) -> pa.Table:
    """Ray UDF: parsed rows (:data:`dpo_ray.data.reading.PARSED_SCHEMA`) -> :data:`SFT_TOKENIZED_SCHEMA` rows.

    Each row is read as format ``fmt`` by :func:`~dpo_ray.data.formats.extract_sft_example` (explicit,
    implicit or conversational, as the DPO pipeline reads them; ``rejected`` is not needed). Every row comes
    back: a row that cannot be used carries its reason and field (``drop_reason`` / ``drop_field``) for the
    data report. Tokenization and truncation are the DPO pipeline's
    (:func:`~dpo_ray.data.tokenize.encode_pairs`, :func:`~dpo_ray.data.tokenize.truncate_pair`), so the SFT
    model sees its prompts exactly as DPO will.
    """
    from dpo_ray.data.formats import InvalidRow, TextPair, extract_sft_example
    from dpo_ray.data.tokenize import encode_pairs, truncate_pair

    tokenizer = load_cached_tokenizer(tokenizer_path, trust_remote_code)
    reasons = batch.column("drop_reason").to_pylist()
    fields = batch.column("drop_field").to_pylist()
    texts: dict[int, TextPair] = {}
    for i, record in enumerate(batch.column("record").to_pylist()):
        if reasons[i] is not None:
            continue
        try:
            example = extract_sft_example(json.loads(record), fmt, tokenizer)
        except InvalidRow as err:
            reasons[i], fields[i] = err.reason.value, err.field
            continue
        texts[i] = TextPair(example.prompt, example.response, example.response)  # the third field is unused
    tokenized: list = [None] * batch.num_rows
    for i, pair in zip(texts, encode_pairs(tokenizer, list(texts.values()))):
        try:
            tokenized[i] = truncate_pair(pair, max_length, max_prompt_length, tokenizer.bos_token_id)
        except InvalidRow as err:
            reasons[i], fields[i] = err.reason.value, err.field
    return build_sft_table(batch, tokenized, reasons, fields, role)


def tokenize_sft_source(source, fmt: str, role: str, cfg: Config, tokenizer_path: str):
    """Every row of ``source`` tokenized or marked with its drop reason (:func:`tokenize_sft_batch`), materialized."""
    from dpo_ray.data.pipeline import TOKENIZER_TASK_CPUS
    from dpo_ray.data.reading import read_parsed_dataset

    return (
        read_parsed_dataset(source, cfg.data.column_map)
        .map_batches(
            tokenize_sft_batch,
            batch_format="pyarrow",
            num_cpus=TOKENIZER_TASK_CPUS,
            fn_kwargs={
                "tokenizer_path": tokenizer_path,
                "fmt": fmt,
                "role": role,
                "max_length": cfg.data.max_length,
                "max_prompt_length": cfg.max_prompt_length(),
                "trust_remote_code": cfg.model.trust_remote_code,
            },
        )
        .materialize()
    )


def prepare_sft_dataset(cfg: Config, spec: str, key: str, tokenizer_path: str) -> tuple[Any, dict[str, Any]]:
    """The tokenized examples of ``spec`` (a file, directory or dataset, read as ``data.train`` is) and the
    report of its rows: read, kept, dropped by reason with example row ids (:func:`build_source_report`).

    The format is ``data.format`` or detected from the first rows, as for DPO. The counts are logged; the
    caller (:func:`prepare_sft_data`) writes the report and stops on bad data.

    Returns:
        (materialized :data:`SFT_SCHEMA` rows, or None when the source has no rows at all; the source report).

    Raises:
        DataValidationError: the source does not exist, its first file cannot be read (naming the file and
            the cause), or it is conversational and the tokenizer has no chat template.
    """
    from ray.data.expressions import col

    from dpo_ray.data.pipeline import detect_format, require_chat_template
    from dpo_ray.data.reading import peek_records, resolve_source
    from dpo_ray.data.report import build_source_report, format_counts, summarize_batch

    role = key.removeprefix("data.")
    source = resolve_source(spec, cfg.data.split, key)
    first_rows = peek_records(source, cfg.data.column_map)
    fmt = detect_format(first_rows, cfg)
    examples, summary = None, []
    if first_rows:  # an empty source starts no pipeline; its report (read 0) stops the run
        require_chat_template(fmt, load_cached_tokenizer(tokenizer_path, cfg.model.trust_remote_code), source)
        tokenized = tokenize_sft_source(source, fmt, role, cfg, tokenizer_path)
        summary = tokenized.map_batches(summarize_batch, batch_format="pyarrow").take_all()
        examples = tokenized.filter(expr=col("drop_reason").is_null()).select_columns(SFT_SCHEMA.names).materialize()
    report = build_source_report(source, fmt, summary, cfg.data.column_map)
    logger.info("sft data %s: %s (%s): %s", role, source.location, fmt, format_counts(report))
    return examples, report


def prepare_sft_data(cfg: Config, tokenizer_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SFT examples of ``data.train`` (and ``data.eval`` when given), with the data report.

    The report (:func:`prepare_sft_dataset` per source, totals and settings) is written to
    ``<output_dir>/data_report.json`` and summarized on the console before the checks.

    Returns:
        ({"train": dataset[, "eval": dataset]}, the report).

    Raises:
        DataValidationError: a file cannot be read, a source is empty, or more rows than
            ``data.max_invalid_fraction`` are unusable (naming the files, the reasons and example rows).
    """
    from dpo_ray.data.report import check_sources, format_summary, total_counts, write_report

    specs = {"train": cfg.data.train, **({"eval": cfg.data.eval} if cfg.data.eval else {})}
    datasets, source_reports = {}, {}
    for role, spec in specs.items():
        datasets[role], source_reports[role] = prepare_sft_dataset(cfg, spec, f"data.{role}", tokenizer_path)
    report = {
        "sources": source_reports,
        "total": total_counts(source_reports),
        "settings": {
            "format": cfg.data.format,
            "column_map": cfg.data.column_map,
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.max_prompt_length(),
            "tokenizer": tokenizer_path,
        },
    }
    path = write_report(report, cfg.resolved_output_dir())
    print(format_summary(report) + f"\ndata report: {path}", flush=True)
    check_sources(report, cfg.data.max_invalid_fraction)
    return datasets, report


def run_sft(cfg: Config, model_path: str | None = None) -> dict[str, Any]:
    """Fine-tune ``model_path`` (default: ``model.name_or_path``, or the tiny model) on the chosen responses
    of ``data.train`` with the shared worker loop (:class:`~dpo_ray.sft_objective.SFTObjective`); writes
    ``<output_dir>/final_model``, ``<output_dir>/data_report.json`` (see :func:`prepare_sft_data`) and
    ``<output_dir>/summary.json``. A stop request (SIGINT/SIGTERM) checkpoints and exports no final model.

    ``data.eval`` (optional) gives held-out examples whose NLL is reported.
    """
    begin = time.perf_counter()
    out = cfg.resolved_output_dir()
    start_run(cfg)
    model_path = model_path or prepare_model_path(cfg)
    datasets, _ = prepare_sft_data(cfg, model_path)
    trainer = build_trainer(cfg, datasets, model_path, pad_token_id(model_path, cfg), objective="sft")
    result, interrupted, exit_code = fit_trainer(cfg, trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"SFT run {cfg.run_name} finished without a checkpoint")
    final_dir = ""
    if not interrupted:
        with result.checkpoint.as_directory() as ckpt:
            final_dir = str(copy_model_dir(Path(ckpt) / "model", out / "final_model"))
    metrics = result.metrics or {}
    summary = {
        "train_examples": datasets["train"].count(),
        "eval_examples": datasets["eval"].count() if "eval" in datasets else 0,
        "steps": metrics.get("step"),
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "train_seconds": metrics.get("train_seconds"),
        "wall_seconds": round(time.perf_counter() - begin, 2),
        "start_model": model_path,
        "final_model_dir": final_dir,
        "data_report": str(out / REPORT_FILE),
        "checkpoint_path": result.checkpoint.path,
        "interrupted": interrupted,
        "exit_code": exit_code,
        "config": cfg.to_dict(),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary
