"""Supervised fine-tuning (SFT) on preferred responses, as a Ray Train job.

The DPO paper builds its reference policy this way when no SFT model exists: maximum likelihood on the
preferred responses, ``pi_ref = argmax E_(x, y_w) log pi(y_w | x)`` (Rafailov et al., 2023, Sec. 4). The
same loop is the Preferred-FT baseline of the paper's experiments.

The data is read and tokenized exactly as the DPO pipeline does it (:mod:`dpo_ray.data`): any source
``data.train`` accepts, with rows holding ``prompt`` and ``chosen`` strings (``rejected`` is ignored and may
be absent); BOS starts the prompt, EOS ends the response. The loss is the mean negative log-likelihood of
the response tokens (prompt and padding are masked out). Training settings come from the usual
:class:`~dpo_ray.config.Config`: ``train.*`` (learning rate, batch size, steps, schedule, checkpoints),
``scaling.*`` (Ray Train workers, DDP), ``model.*`` (start model, LoRA), ``output_dir`` and ``run_name``.

``run_sft(cfg)`` writes ``<output_dir>/final_model`` (a Hugging Face directory with the tokenizer) and
``<output_dir>/summary.json``. The same ``run_name`` resumes from the latest checkpoint, as for DPO.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import torch

from dpo_ray.config import Config, config_from_dict

SFT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("num_tokens", pa.int64()),
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


def tokenize_sft_batch(batch: pa.Table, tokenizer_path: str, max_length: int, max_prompt_length: int,
                       trust_remote_code: bool = False) -> pa.Table:
    """Ray UDF: parsed rows (:data:`dpo_ray.data.reading.PARSED_SCHEMA`) -> :data:`SFT_SCHEMA` rows.

    Rows without a non-blank ``prompt`` and ``chosen`` string are dropped. Tokenization and truncation are
    the DPO pipeline's (:func:`~dpo_ray.data.tokenize.encode_pairs`, :func:`~dpo_ray.data.tokenize.truncate_pair`),
    so the SFT model sees its prompts exactly as DPO will.
    """
    from dpo_ray.data.formats import InvalidRow, TextPair, require_string
    from dpo_ray.data.tokenize import encode_pairs, truncate_pair

    tokenizer = load_cached_tokenizer(tokenizer_path, trust_remote_code)
    ids, texts = [], []
    for row_id, record, reason in zip(batch.column("row_id").to_pylist(), batch.column("record").to_pylist(),
                                      batch.column("drop_reason").to_pylist()):
        if reason is not None or record is None:
            continue
        fields = json.loads(record)
        try:
            prompt, chosen = require_string(fields, "prompt"), require_string(fields, "chosen")
        except InvalidRow:
            continue
        ids.append(row_id)
        texts.append(TextPair(prompt, chosen, chosen))  # the pipeline tokenizes three fields; the third is unused
    rows: dict[str, list] = {name: [] for name in SFT_SCHEMA.names}
    for row_id, pair in zip(ids, encode_pairs(tokenizer, texts)):
        try:
            pair = truncate_pair(pair, max_length, max_prompt_length, tokenizer.bos_token_id)
        except InvalidRow:
            continue
        rows["row_id"].append(row_id)
        rows["prompt_ids"].append(pair.prompt_ids)
        rows["response_ids"].append(pair.chosen_ids)
        rows["num_tokens"].append(len(pair.prompt_ids) + len(pair.chosen_ids))
    return pa.table(rows, schema=SFT_SCHEMA)


def prepare_sft_dataset(cfg: Config, spec: str, key: str, tokenizer_path: str):
    """The tokenized examples of ``spec`` (a file, directory or dataset, read as ``data.train`` is), materialized."""
    from dpo_ray.data.formats import DataValidationError
    from dpo_ray.data.reading import read_parsed_dataset, resolve_source

    source = resolve_source(spec, cfg.data.split, key)
    dataset = (
        read_parsed_dataset(source, cfg.data.column_map)
        .map_batches(
            tokenize_sft_batch,
            batch_format="pyarrow",
            fn_kwargs={
                "tokenizer_path": tokenizer_path,
                "max_length": cfg.data.max_length,
                "max_prompt_length": cfg.max_prompt_length(),
                "trust_remote_code": cfg.model.trust_remote_code,
            },
        )
        .materialize()
    )
    if dataset.count() == 0:
        raise DataValidationError(f"{key}: {spec} holds no rows with non-blank 'prompt' and 'chosen' strings")
    return dataset


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

    was_training = lm.training
    lm.eval()
    sums = dict.fromkeys(SFT_EVAL_KEYS, 0.0)
    for start in range(0, len(examples), micro_batch_size):
        chunk = examples[start : start + micro_batch_size]
        nll, tokens = compute_response_nll(lm, build_sft_batch([e.as_example() for e in chunk], pad_id, device))
        sums["nll_sum"] += nll.item()
        sums["tokens"] += tokens.item()
        sums["count"] += len(chunk)
    lm.train(was_training)
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
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
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
    of ``data.train``; writes ``<output_dir>/final_model`` and ``<output_dir>/summary.json``.

    ``data.eval`` (optional) gives held-out examples whose NLL is reported.
    """
    from dpo_ray.checkpointing import copy_model_dir
    from dpo_ray.cluster import check_cluster_resources, release_leaked_placement_groups
    from dpo_ray.trainer import SUMMARY_FILE, pad_token_id, prepare_model_path, write_resolved_config

    begin = time.perf_counter()
    out = cfg.resolved_output_dir()
    write_resolved_config(cfg)
    release_leaked_placement_groups()
    check_cluster_resources(cfg)
    model_path = model_path or prepare_model_path(cfg)
    datasets = {"train": prepare_sft_dataset(cfg, cfg.data.train, "data.train", model_path)}
    if cfg.data.eval:
        datasets["eval"] = prepare_sft_dataset(cfg, cfg.data.eval, "data.eval", model_path)
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
