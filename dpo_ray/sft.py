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
an unreadable file, an empty source or more than ``data.max_invalid_fraction`` unusable rows. The loss is the mean negative log-likelihood of
the response tokens (prompt and padding are masked out). Training settings come from the usual
:class:`~dpo_ray.config.Config`: ``train.*`` (learning rate, batch size, steps, schedule, checkpoints),
``scaling.*`` (Ray Train workers, DDP), ``model.*`` (start model, LoRA), ``output_dir`` and ``run_name``.

``run_sft(cfg)`` writes ``<output_dir>/final_model`` (a Hugging Face directory with the tokenizer),
``<output_dir>/data_report.json`` and ``<output_dir>/summary.json``. The same ``run_name`` resumes from the latest checkpoint, as for DPO.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import torch

from dpo_ray.config import Config, config_from_dict

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
SFT_EVAL_KEYS = ("nll_sum", "tokens", "count")


@dataclass
class SFTExample:
    """One tokenized example: the prompt (with BOS) and the target response (with EOS)."""

    row_id: str
    prompt: list[int]
    response: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.response)

    def as_example(self) -> tuple[list[int], list[int]]:
        return self.prompt, self.response


# ------------------------------------------------------------------------------------ data


@functools.lru_cache(maxsize=2)
def load_cached_tokenizer(tokenizer_path: str, trust_remote_code: bool):
    """One tokenizer per Ray worker process, reused across the batches it handles."""
    from dpo_ray.modeling import load_tokenizer

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


def tokenize_sft_batch(batch: pa.Table, tokenizer_path: str, fmt: str, role: str, max_length: int,
                       max_prompt_length: int, trust_remote_code: bool = False) -> pa.Table:
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
        "settings": {"format": cfg.data.format, "column_map": cfg.data.column_map, "max_length": cfg.data.max_length,
                     "max_prompt_length": cfg.max_prompt_length(), "tokenizer": tokenizer_path},
    }
    path = write_report(report, cfg.resolved_output_dir())
    print(format_summary(report) + f"\ndata report: {path}", flush=True)
    check_sources(report, cfg.data.max_invalid_fraction)
    return datasets, report


def collect_sft_examples(shard) -> list[SFTExample]:
    """All rows of this worker's shard, in shard order."""
    examples: list[SFTExample] = []
    if shard is None:
        return examples
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy", prefetch_batches=0):
        for row_id, prompt, response in zip(batch["row_id"], batch["prompt_ids"], batch["response_ids"]):
            examples.append(SFTExample(str(row_id), [int(t) for t in prompt], [int(t) for t in response]))
    return examples


# ------------------------------------------------------------------------------------ loss


def build_sft_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded rows ``[prompt | response | pad]`` for B ``(prompt_ids, response_ids)`` examples.

    Uses the DPO batching's separate layout (:func:`~dpo_ray.batching.build_separate_batch`, whose first B
    rows are ``[prompt | chosen]``) and keeps those rows.

    Returns:
        input_ids [B, T], attention_mask [B, T], loss_mask [B, T] (1 on response tokens), position_ids [B, T];
        T = the longest row.
    """
    from dpo_ray.batching import build_separate_batch

    full = build_separate_batch([(p, r, r) for p, r in examples], pad_id)
    n = len(examples)
    return {k: full[k][:n].to(device) for k in ("input_ids", "attention_mask", "loss_mask", "position_ids")}


def compute_response_nll(lm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the response tokens and their count.

    Args:
        lm: a causal LM (possibly DDP-wrapped).
        batch: from :func:`build_sft_batch`.

    Returns:
        ([] NLL summed over all response tokens of the batch, [] number of those tokens), fp32.
    """
    from dpo_ray.losses import compute_sequence_logps

    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False).logits  # [B, T, V]
    logps = compute_sequence_logps(logits, batch["input_ids"], batch["loss_mask"])  # [B]
    tokens = batch["loss_mask"][:, 1:].sum().float()
    return -logps.sum(), tokens


@torch.no_grad()
def evaluate_sft(lm: torch.nn.Module, examples: Sequence[SFTExample], pad_id: int, micro_batch_size: int,
                 device: torch.device) -> dict[str, float]:
    """Held-out mean response-token NLL over all workers' eval shards (each example counts once)."""
    from dpo_ray.train_loop import all_reduce_sum

    from dpo_ray.precision import in_eval_mode

    sums = dict.fromkeys(SFT_EVAL_KEYS, 0.0)
    with in_eval_mode(lm):
        for start in range(0, len(examples), micro_batch_size):
            chunk = examples[start : start + micro_batch_size]
            nll, tokens = compute_response_nll(lm, build_sft_batch([e.as_example() for e in chunk], pad_id, device))
            sums["nll_sum"] += nll.item()
            sums["tokens"] += tokens.item()
            sums["count"] += len(chunk)
    total = dict(zip(SFT_EVAL_KEYS, all_reduce_sum([sums[k] for k in SFT_EVAL_KEYS], device)))
    if total["count"] == 0:
        return {}
    return {"eval_loss": total["nll_sum"] / max(total["tokens"], 1.0), "eval_examples": int(total["count"])}


# ------------------------------------------------------------------------------------ the worker loop


def accumulate_sft_gradients(model: torch.nn.Module, rows: Sequence[SFTExample], micro_batch_size: int, pad_id: int,
                             device: torch.device) -> tuple[float, float]:
    """Backward of one step's token-mean NLL over ``rows``, micro-batch by micro-batch (DDP syncs on the last).

    Returns:
        (summed NLL of the response tokens, their count) on this worker, for logging.
    """
    from dpo_ray.train_loop import split_micro_batches

    micro = split_micro_batches(list(range(len(rows))), micro_batch_size)
    step_tokens = float(sum(len(r.response) for r in rows))
    nll_sum = token_count = 0.0
    for m_i, idx in enumerate(micro):
        sync = m_i == len(micro) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            nll, tokens = compute_response_nll(model, build_sft_batch([rows[i].as_example() for i in idx], pad_id, device))
            (nll / step_tokens).backward()
        nll_sum += nll.item()
        token_count += tokens.item()
    return nll_sum, token_count


def sft_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config`` = {cfg: Config dict, model_path, tokenizer_path, pad_id}.

    Each optimizer step takes ``train.batch_size`` examples across workers (``micro_batch_size`` per
    forward pass, gradients accumulated) and minimizes the token-mean NLL of the responses. Every
    ``train.checkpoint_every`` steps (and at the end) it evaluates the held-out NLL and reports a checkpoint.
    """
    import ray.train
    import ray.train.torch

    from dpo_ray.checkpointing import open_run_checkpoints, save_training_state
    from dpo_ray.train_loop import (
        EpochPlanner,
        all_reduce_sum,
        build_optimization,
        build_policy,
        clip_gradients,
        count_steps,
        save_policy,
        say,
        set_up_worker,
    )

    cfg = config_from_dict(loop_config["cfg"])
    model_path, tokenizer_path, pad_id = loop_config["model_path"], loop_config["tokenizer_path"], loop_config["pad_id"]
    rank, world, device = set_up_worker(cfg)

    train_rows = collect_sft_examples(ray.train.get_dataset_shard(f"train_{rank}"))  # cut on the driver
    eval_rows = collect_sft_examples(ray.train.get_dataset_shard(f"eval_{rank}")) if loop_config.get("has_eval") else []
    per_step, total_steps = count_steps(cfg, len(train_rows), world)

    checkpoints = open_run_checkpoints(cfg, score_attribute=None)  # newest kept, as build_sft_trainer's config
    ckpt_dir = checkpoints.find_latest()
    lm = build_policy(cfg, model_path, device, ckpt_dir)
    model = ray.train.torch.prepare_model(lm, parallel_strategy="ddp")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, state = build_optimization(cfg, params, total_steps, ckpt_dir)
    ckpt_every = cfg.train.checkpoint_every or cfg.train.eval_every or total_steps
    start = time.perf_counter() - state.train_seconds
    window_nll = window_tokens = 0.0
    metrics: dict[str, Any] = {}
    reported_final = False

    def report(is_last: bool) -> None:
        state.train_seconds = time.perf_counter() - start
        metrics.update(evaluate_sft(lm, eval_rows, pad_id, cfg.train.micro_batch_size, device))
        metrics.update(step=state.step, epoch=state.epoch, train_seconds=state.train_seconds,
                       examples_per_second=state.pairs_seen / max(state.train_seconds, 1e-9))
        snapshot = dict(metrics)

        def write(directory: Path) -> None:
            save_policy(lm, tokenizer_path, directory, cfg, merge_lora=is_last)
            save_training_state(directory, optimizer, scheduler, state, snapshot)

        checkpoints.report(snapshot, write)
        if rank == 0 and "eval_loss" in metrics:
            say(f"sft eval at step {state.step}: loss {metrics['eval_loss']:.4f}")

    planner = EpochPlanner(train_rows, per_step, cfg)
    while state.step < total_steps:
        step_rows = planner.take_step_rows(state)
        optimizer.zero_grad(set_to_none=True)
        nll_sum, token_count = accumulate_sft_gradients(model, step_rows, cfg.train.micro_batch_size, pad_id, device)
        window_nll += nll_sum
        window_tokens += token_count
        clip_gradients(model, params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state.step += 1
        state.batch_in_epoch += 1
        n_rows, n_tokens = all_reduce_sum([len(step_rows), sum(r.num_tokens for r in step_rows)], device)
        state.pairs_seen += int(n_rows)
        state.tokens_seen += int(n_tokens)
        is_last = state.step >= total_steps
        is_report = state.step % ckpt_every == 0 or is_last
        if state.step % cfg.train.log_every == 0 or is_report:
            nll_s, tok_s = all_reduce_sum([window_nll, window_tokens], device)
            metrics["train_loss"] = nll_s / max(tok_s, 1.0)
            window_nll = window_tokens = 0.0
            if rank == 0:
                say(f"sft step {state.step}/{total_steps} | loss {metrics['train_loss']:.4f} | "
                    f"lr {scheduler.get_last_lr()[0]:.2e}")
        if is_report:
            report(is_last)
            reported_final = is_last
    if not reported_final:
        report(True)  # resumed a finished run: report the restored model so the result has a checkpoint


# ------------------------------------------------------------------------------------ the driver


def build_sft_trainer(cfg: Config, datasets: dict[str, Any], model_path: str, pad_id: int):
    """A TorchTrainer running :func:`sft_loop_per_worker`; the same run name resumes from its latest checkpoint."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dpo_ray.checkpointing import build_checkpoint_config
    from dpo_ray.trainer import split_for_workers

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        sft_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "model_path": model_path, "tokenizer_path": model_path,
                           "pad_id": pad_id, "has_eval": "eval" in datasets},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.resolved_storage_path(),
            checkpoint_config=build_checkpoint_config(cfg, score_attribute=None),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
        ),
        datasets=split_for_workers(datasets, cfg.scaling.num_workers),
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker reads its own shard, "<name>_<rank>"
    )


def run_sft(cfg: Config, model_path: str | None = None) -> dict[str, Any]:
    """Fine-tune ``model_path`` (default: ``model.name_or_path``, or the tiny model) on the chosen responses
    of ``data.train``; writes ``<output_dir>/final_model``, ``<output_dir>/data_report.json`` (see
    :func:`prepare_sft_data`) and ``<output_dir>/summary.json``.

    ``data.eval`` (optional) gives held-out examples whose NLL is reported.
    """
    from dpo_ray.checkpointing import copy_model_dir
    from dpo_ray.cluster import check_cluster_resources, release_leaked_placement_groups
    from dpo_ray.data.report import REPORT_FILE
    from dpo_ray.trainer import SUMMARY_FILE, pad_token_id, prepare_model_path, write_resolved_config

    begin = time.perf_counter()
    out = cfg.resolved_output_dir()
    write_resolved_config(cfg)
    release_leaked_placement_groups()
    check_cluster_resources(cfg)
    model_path = model_path or prepare_model_path(cfg)
    datasets, _ = prepare_sft_data(cfg, model_path)
    result = build_sft_trainer(cfg, datasets, model_path, pad_token_id(model_path, cfg)).fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"SFT run {cfg.run_name} finished without a checkpoint")
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
        "config": cfg.to_dict(),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main_sft(argv: list[str] | None = None) -> dict[str, Any]:
    """``workflows/sft.py``: parse ``--config`` / ``--set``, start Ray, fine-tune, print where the model is."""
    from dpo_ray.cli import build_parser, exit_on_input_error, parse_config, print_config
    from dpo_ray.cluster import init_ray

    _, cfg = parse_config(build_parser("Supervised fine-tuning on the chosen responses of data.train (Ray Train)."), argv)
    print_config(cfg)
    init_ray()
    with exit_on_input_error():
        summary = run_sft(cfg)
    for key in ("train_examples", "eval_examples", "steps", "train_loss", "eval_loss", "wall_seconds"):
        print(f"  {key:16s} {summary[key]}")
    print(f"[dpo-ray] final model: {summary['final_model_dir']}", flush=True)
    return summary
