"""``prepare_data``: read, validate, tokenize, split and score preference pairs with Ray Data.

Stages (Ray Data operators; tokenized rows are materialized once and reused by the later passes):

1. parse: one task per file (``read_binary_files``) or per block of a Hugging Face dataset -> rows with
   a ``row_id`` and the record, or the reason it cannot be read;
2. tokenize: Ray Data tasks for all sources (:func:`~dpo_ray.data.tokenize.tokenize_pair_batch`) validate
   each row for its source's format, renders chat rows, tokenizes and truncates; every row, kept or not,
   is labelled with its split: the explicit eval source, or, held out by prompt, a seeded hash of
   (the row's prompt digest, seed) below ``eval_fraction``: every pair of one prompt is on the same side,
   with no dependence on block order or worker count (:func:`label_split`);
3. report: one summary pass, written to ``<output_dir>/data_report.json``; the run stops here when a
   source is empty, too many rows are unusable or a split is empty;
4. split: the kept rows; ``limit`` keeps the first train rows in (file, line) order; the distinct prompts of
   each side are counted for the report (:func:`count_prompts`);
5. reference: an actor pool adds the reference log-probs (:mod:`dpo_ray.data.reference`).

Tokenized pairs (with the report) and reference log-probs are cached as parquet under
``cfg.resolved_cache_dir()``; a run with the same key reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dpo_ray.config import Config
from dpo_ray.data.formats import DataValidationError, choose_format
from dpo_ray.data.reading import (
    DataSource,
    ParsedRecord,
    fingerprint_source,
    peek_records,
    read_parsed_dataset,
    resolve_source,
)
from dpo_ray.data.reference import (
    REFERENCE_COLUMNS,
    compute_cache_key,
    prepare_reference_logps,
    read_cached_json,
    read_cached_pairs,
    write_cache_entry,
)
from dpo_ray.data.report import (
    build_source_report,
    check_sources,
    check_splits,
    format_summary,
    summarize_batch,
    total_counts,
    write_report,
)
from dpo_ray.data.tokenize import tokenize_pair_batch

__all__ = ["DataValidationError", "PreparedData", "prepare_data"]

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 3  # bump when the stored rows or report would change for the same inputs and settings
# 3: implicit rows without an HH turn split by the common prefix; the report counts the prompt rules
# The held-out rule, part of the cache key: 1 hashed (row_id, seed); 2 hashes (prompt digest, seed).
SPLIT_RULE_VERSION = 2
PUBLIC_COLUMNS = ("row_id", "prompt_ids", "chosen_ids", "rejected_ids", "num_tokens")
PROMPT_COLUMN = "prompt_digest"  # kept with the pairs (and in the cache) for the prompt counts
ORDER_COLUMNS = ["file_index", "position"]
TOKENIZE_BATCH_ROWS = 256
ROWS_PER_BLOCK = 4096
TOKENIZER_TASK_CPUS = 0.5  # whole-CPU tokenizer tasks can starve the read tasks of a 2-CPU machine
CACHED_REPORT = "report.json"


@dataclass
class PreparedData:
    train: Any  # ray.data.Dataset, materialized: PUBLIC_COLUMNS (+ REFERENCE_COLUMNS with a reference model)
    eval: Any  # ray.data.Dataset, same columns
    report: dict  # the data report (also in <output_dir>/data_report.json)
    train_pairs: int
    eval_pairs: int
    reference_passes: int  # 1 if the reference stage ran in this call, else 0
    cache_dir: str  # where the tokenized pairs (and ref-*/ reference log-probs) are stored


# ---------------------------------------------------------------------------- sources and keys


def resolve_sources(cfg: Config) -> dict[str, DataSource]:
    """The train source and, when configured, the eval source (a file/dir/dataset or a hub split)."""
    sources = {"train": resolve_source(cfg.data.train, cfg.data.split, "data.train")}
    if cfg.data.eval:
        sources["eval"] = resolve_source(cfg.data.eval, cfg.data.eval_split or cfg.data.split, "data.eval")
    elif cfg.data.eval_split:
        if sources["train"].kind == "files":
            raise DataValidationError(
                "data.eval_split needs data.train to be a Hugging Face dataset; for files give data.eval"
            )
        sources["eval"] = dataclasses.replace(sources["train"], key="data.eval_split", split=cfg.data.eval_split)
    return sources


def fingerprint_tokenizer(tokenizer) -> str:
    """A hash of the tokenizer's content: its vocabulary and rules, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
                        tokenizer.pad_token, tokenizer.chat_template], default=str)
    return hashlib.sha256((state + extra).encode()).hexdigest()[:16]


def build_data_key(cfg: Config, sources: dict[str, DataSource], tokenizer) -> dict[str, Any]:
    """Everything the tokenized pairs depend on: the data, the tokenization and the split settings."""
    return {
        "version": PIPELINE_VERSION,
        "sources": {role: fingerprint_source(src) for role, src in sources.items()},
        "format": cfg.data.format,
        "column_map": cfg.data.column_map,
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.max_prompt_length(),
        "tokenizer": fingerprint_tokenizer(tokenizer),
        "eval_fraction": None if "eval" in sources else cfg.data.eval_fraction,
        "split_rule": SPLIT_RULE_VERSION,
        "split_seed": cfg.data.split_seed,
        "limit": cfg.data.limit,
    }


# ---------------------------------------------------------------------------- read, validate, tokenize


def detect_format(first_rows: list[ParsedRecord], cfg: Config) -> str:
    """The configured format, or the one most of the source's first records look like."""
    if cfg.data.format != "auto":
        return cfg.data.format
    return choose_format(r.record for r in first_rows if r.record is not None)


def require_chat_template(fmt: str, tokenizer, source: DataSource) -> None:
    if fmt == "conversational" and not tokenizer.chat_template:
        raise DataValidationError(
            f"{source.key} ({source.location}) is conversational, but the tokenizer has no chat template"
        )


def union_all(datasets: list):
    """One dataset of all ``datasets`` (Ray's union needs at least two)."""
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def tag_role(batch: pa.Table, role: str) -> pa.Table:
    """Ray UDF: mark parsed rows with the source they came from (train / eval)."""
    return batch.append_column("role", pa.array([role] * batch.num_rows, pa.string()))


def tokenize_sources(sources: dict[str, DataSource], formats: dict[str, str], cfg: Config, tokenizer_path: str):
    """Every row of every source, tokenized or marked with its drop reason, and labelled with its split
    (one set of tasks for all sources; materialized)."""
    parsed = [
        read_parsed_dataset(source, cfg.data.column_map).map_batches(
            tag_role, batch_format="pyarrow", fn_kwargs={"role": role}
        )
        for role, source in sources.items()
    ]
    return (
        union_all(parsed)
        .repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
        .map_batches(
            tokenize_pair_batch,
            batch_size=TOKENIZE_BATCH_ROWS,
            batch_format="pyarrow",
            num_cpus=TOKENIZER_TASK_CPUS,
            fn_kwargs={
                "tokenizer_path": tokenizer_path,
                "formats": formats,
                "max_length": cfg.data.max_length,
                "max_prompt_length": cfg.max_prompt_length(),
                "trust_remote_code": cfg.model.trust_remote_code,
            },
        )
        .map_batches(
            label_split, batch_format="pyarrow",
            fn_kwargs={"seed": cfg.data.split_seed, "eval_fraction": cfg.data.eval_fraction,
                       "by_role": "eval" in sources},
        )
        .materialize()
    )


def summarize_dataset(tokenized) -> list[dict]:
    """Summary rows (per block, source, file and reason) of a tokenized dataset."""
    return tokenized.map_batches(summarize_batch, batch_format="pyarrow").take_all()


# ---------------------------------------------------------------------------- split


def hash_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (key, seed) alone: no dependence on block order or worker count."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_side(prompt_digest: str | None, seed: int, eval_fraction: float) -> str | None:
    """``"eval"`` when :func:`hash_fraction` of the prompt digest is below ``eval_fraction``, else ``"train"``;
    None for a row dropped before its prompt was read (it is on neither side)."""
    if prompt_digest is None:
        return None
    return "eval" if hash_fraction(prompt_digest, seed) < eval_fraction else "train"


def label_split(batch: pa.Table, seed: int, eval_fraction: float, by_role: bool) -> pa.Table:
    """Ray UDF: add the ``split`` column: the row's source (explicit eval data), or held out by prompt.

    The hash is over the digest of the row's canonical prompt (``prompt_digest``: the prompt text of
    explicit and implicit rows, the parsed prompt messages of conversational rows, before any chat template
    and before truncation; see :func:`~dpo_ray.data.formats.canonical_prompt`) and the seed, so all pairs
    of one prompt (UltraFeedback all-pairs, Nectar) land on the same side, whatever the block or worker.
    """
    if by_role:
        labels = batch.column("role")
    else:
        digests = batch.column(PROMPT_COLUMN).to_pylist()
        labels = pa.array([choose_side(d, seed, eval_fraction) for d in digests], pa.string())
    return batch.append_column("split", labels)


def filter_split(dataset, name: str):
    from ray.data.expressions import col

    return dataset.filter(expr=col("split") == name)


def find_limit_cutoff(train, limit: int) -> tuple[int, int] | None:
    """(file_index, position) of the ``limit``-th train row in file order; None when there are no more rows.

    Only the two order columns travel to the driver; a Ray ``sort`` (a shuffle) took 25 s for 30 rows here.
    """
    import ray

    keys = pa.concat_tables(ray.get(train.select_columns(ORDER_COLUMNS).to_arrow_refs()))
    if keys.num_rows <= limit:
        return None
    order = pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in ORDER_COLUMNS])
    last = keys.take(order[limit - 1 : limit]).to_pylist()[0]
    return last["file_index"], last["position"]


def keep_first_rows(train, limit: int):
    """The first ``limit`` rows of ``train`` in (file, line) order."""
    from ray.data.expressions import col

    cutoff = find_limit_cutoff(train, limit)
    if cutoff is None:
        return train
    file_index, position = cutoff
    return train.filter(
        expr=(col("file_index") < file_index) | ((col("file_index") == file_index) & (col("position") <= position))
    )


def split_pairs(tokenized, cfg: Config):
    """The kept rows with their split, ``limit`` applied to train in file order; materialized."""
    from ray.data.expressions import col

    pairs = tokenized.filter(expr=col("drop_reason").is_null())
    if cfg.data.limit > 0:
        pairs = keep_first_rows(filter_split(pairs, "train"), cfg.data.limit).union(filter_split(pairs, "eval"))
    return pairs.select_columns([*PUBLIC_COLUMNS, PROMPT_COLUMN, "split"]).materialize()


def separate_splits(pairs, columns: list[str]):
    """(train, eval) datasets with ``columns``, materialized."""
    return tuple(filter_split(pairs, name).select_columns(columns).materialize() for name in ("train", "eval"))


# ---------------------------------------------------------------------------- report


def describe_split(cfg: Config, sources: dict[str, DataSource]) -> str:
    """How the held-out side is chosen, in one line for the report and the console."""
    if "eval" in sources:
        return f"eval from {sources['eval'].key}"
    return (f"by prompt: hash(prompt, seed {cfg.data.split_seed}) < eval_fraction {cfg.data.eval_fraction}, "
            "every pair of a prompt on the same side")


def count_split(source_reports: dict[str, dict], name: str) -> int:
    return sum(src["splits"].get(name, 0) for src in source_reports.values())


def count_prompts(pairs) -> dict[str, int]:
    """Distinct prompts on each side of the split pairs (after ``limit``) and how many are on both sides.

    Only the split and prompt-digest columns travel to the driver (a 32-character digest a row).
    """
    import ray

    counts = {"train_prompts": 0, "eval_prompts": 0, "shared_prompts": 0}
    tables = [] if pairs is None else ray.get(pairs.select_columns(["split", PROMPT_COLUMN]).to_arrow_refs())
    if not tables:
        return counts
    keys = pa.concat_tables(tables)
    train, held_out = (
        pc.unique(keys.filter(pc.equal(keys.column("split"), name)).column(PROMPT_COLUMN)) for name in ("train", "eval")
    )
    counts.update(train_prompts=len(train), eval_prompts=len(held_out),
                  shared_prompts=pc.sum(pc.is_in(held_out, value_set=train)).as_py() or 0)
    return counts


def build_report(cfg: Config, source_reports: dict[str, dict], sources: dict[str, DataSource],
                 tokenizer_path: str, prompt_counts: dict[str, int]) -> dict[str, Any]:
    """The whole report; the pair counts follow from the per-source counts (limit: the first N train rows),
    the prompt counts (:func:`count_prompts`) from the split pairs.

    ``split`` holds ``train_pairs`` / ``eval_pairs`` and ``train_prompts`` / ``eval_prompts`` (distinct
    prompts each side holds), and ``shared_prompts`` (on both sides: 0 when held out by prompt; an explicit
    eval source may share prompts with the train data).
    """
    train_pairs = count_split(source_reports, "train")
    return {
        "sources": source_reports,
        "total": total_counts(source_reports),
        "split": {
            "method": describe_split(cfg, sources),
            "unit": "source" if "eval" in sources else "prompt",
            "limit": cfg.data.limit,
            "train_pairs": min(train_pairs, cfg.data.limit) if cfg.data.limit > 0 else train_pairs,
            "eval_pairs": count_split(source_reports, "eval"),
            **prompt_counts,
        },
        "settings": {
            "format": cfg.data.format,
            "column_map": cfg.data.column_map,
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.max_prompt_length(),
            "tokenizer": tokenizer_path,
        },
    }


def publish_report(report: dict, cfg: Config) -> None:
    """Write the report, print its summary, then stop on bad data (the report stays for inspection)."""
    path = write_report(report, cfg.resolved_output_dir())
    print(format_summary(report) + f"\ndata report: {path}", flush=True)
    check_sources(report, cfg.data.max_invalid_fraction)
    check_splits(report)


def build_pairs(cfg: Config, sources: dict[str, DataSource], tokenizer_path: str, tokenizer):
    """Read, validate, tokenize and split every source; returns (pairs with a split column, report).

    A source without a single row starts no pipeline: pairs is None and the report (read 0) stops the run.
    """
    first_rows = {role: peek_records(source, cfg.data.column_map) for role, source in sources.items()}
    formats = {role: detect_format(rows, cfg) for role, rows in first_rows.items()}
    pairs, summary = None, []
    if all(first_rows.values()):
        for role, source in sources.items():
            require_chat_template(formats[role], tokenizer, source)
        tokenized = tokenize_sources(sources, formats, cfg, tokenizer_path)
        summary = summarize_dataset(tokenized)
        pairs = split_pairs(tokenized, cfg)
    source_reports = {
        role: build_source_report(source, formats[role], [r for r in summary if r["role"] == role], cfg.data.column_map)
        for role, source in sources.items()
    }
    return pairs, build_report(cfg, source_reports, sources, tokenizer_path, count_prompts(pairs))


# ---------------------------------------------------------------------------- entry point


def load_or_build_pairs(cfg: Config, sources: dict[str, DataSource], tokenizer_path: str, tokenizer):
    """Tokenized pairs and their report from the cache, or built, checked and stored.

    Returns:
        (pairs with a split column, report, cache entry directory, cache key).
    """
    key_parts = build_data_key(cfg, sources, tokenizer)
    key = compute_cache_key(key_parts)
    data_dir = cfg.resolved_cache_dir() / f"data-{key}"
    pairs = read_cached_pairs(data_dir)
    reused = pairs is not None
    if reused:
        logger.info("tokenized data: reusing cache %s (key %s)", data_dir, key)
        report = read_cached_json(data_dir, CACHED_REPORT)
    else:
        logger.info("tokenized data: computing (key %s) -> %s", key, data_dir)
        pairs, report = build_pairs(cfg, sources, tokenizer_path, tokenizer)
    publish_report(report, cfg)  # the checks apply to a cached report too (the limits may have changed)
    if not reused:
        write_cache_entry(pairs, data_dir, {"key": key, "parts": key_parts}, {CACHED_REPORT: report})
    report["cache"] = {"dir": str(data_dir), "key": key, "tokenized": "reused" if reused else "computed"}
    return pairs, report, data_dir, key


def prepare_data(cfg: Config, tokenizer_path: str, reference_model_path: str | None) -> PreparedData:
    """Read, validate, tokenize, split and (if ``reference_model_path``) add reference log-probs.

    Raises:
        DataValidationError: a missing source, an empty dataset or split, or more unusable rows than
            ``data.max_invalid_fraction`` (the report names the files, reasons and example rows).
    """
    import ray

    from dpo_ray.modeling import load_tokenizer

    # Blocks in input order, not completion order: the per-worker shards, and so the training batches
    # and the eval reduction order, are then the same on every run (seeded determinism, exact resume).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    sources = resolve_sources(cfg)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    pairs, report, data_dir, key = load_or_build_pairs(cfg, sources, tokenizer_path, tokenizer)
    columns = list(PUBLIC_COLUMNS)
    reference_passes = 0
    if reference_model_path:
        pairs, computed, ref_dir = prepare_reference_logps(
            pairs, data_dir, key, cfg, reference_model_path, tokenizer.pad_token_id
        )
        reference_passes = int(computed)
        columns += REFERENCE_COLUMNS
        report["cache"]["reference"] = {"dir": str(ref_dir), "status": "computed" if computed else "reused"}
    write_report(report, cfg.resolved_output_dir())
    train, held_out = separate_splits(pairs, columns)
    return PreparedData(
        train=train,
        eval=held_out,
        report=report,
        train_pairs=report["split"]["train_pairs"],
        eval_pairs=report["split"]["eval_pairs"],
        reference_passes=reference_passes,
        cache_dir=str(data_dir),
    )
