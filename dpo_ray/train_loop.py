"""The training function each Ray Train worker runs, for any objective (:mod:`dpo_ray.objective`); a sweep's
one-worker trial runs the same :class:`WorkerLoop` in its own process (:mod:`dpo_ray.sweep.trial`).

``train_loop_per_worker(loop_config)`` takes the resolved :class:`~dpo_ray.config.Config` (as a dict), the
objective's name, the model and tokenizer paths; trains with DDP or FSDP under the precision recipe,
accumulating gradients over micro-batches, clipping them, stopping on (or skipping) non-finite losses and
checkpointing on a graceful stop; evaluates on its eval shard (reduced so that each held-out row counts
once) and reports metrics with a checkpoint through ``ray.train.report``. Running it again under the same
run name continues from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import ray.train
import ray.train.torch
import torch

from dpo_ray.checkpointing import RayTrainCheckpoints, TrainState, open_run_checkpoints, save_training_state
from dpo_ray.config import Config, config_from_dict
from dpo_ray.distributed import all_reduce_max, all_reduce_max_many, all_reduce_sum, clip_gradients
from dpo_ray.epochs import EpochPlanner, count_steps, plan_micro_batches, resolve_micro_batch_tokens, split_to_count
from dpo_ray.interrupt import StopPoller
from dpo_ray.modeling import build_policy, gather_model_state, save_policy
from dpo_ray.objective import resolve_objective
from dpo_ray.optim import build_optimization
from dpo_ray.precision import count_cpu_threads
from dpo_ray.tracking import close_metric_writers, log_metrics, open_metric_writers, peak_memory_mb, say

logger = logging.getLogger("dpo_ray")


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient was NaN or infinite; the message names the step and the batch's rows."""


def wrap_model(cfg: Config, module: torch.nn.Module, lm: torch.nn.Module) -> torch.nn.Module:
    """DDP (default) or FSDP of ``module`` (holding causal LM ``lm``) through Ray Train's prepare_model;
    a no-op for a single worker. FSDP wraps each decoder layer of ``lm`` as its own unit."""
    if cfg.train.strategy == "fsdp":
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy  # 0.5 s per worker process, FSDP only

        layer_cls = {type(layer) for layer in lm.get_decoder().layers} if hasattr(lm, "get_decoder") else set()
        policy = partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls) if layer_cls else None
        kwargs: dict[str, Any] = {"auto_wrap_policy": policy, "use_orig_params": True}
        return ray.train.torch.prepare_model(module, parallel_strategy="fsdp", parallel_strategy_kwargs=kwargs)
    return ray.train.torch.prepare_model(module, parallel_strategy="ddp")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class RayTrainRuntime:
    """What the worker loop asks of the process it runs in, answered by Ray Train (a worker of a group, or the
    driver in Ray Train's local mode): rank and device, the dataset shards the driver cut, DDP or FSDP, and
    checkpoints reported through ``ray.train.report``. A sweep's one-worker trial answers the same questions
    without Ray Train (:class:`dpo_ray.sweep.trial.TrialRuntime`)."""

    def locate(self, cfg: Config) -> tuple[int, int, torch.device]:
        """(rank, world size, device)."""
        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()

    def read_shard(self, name: str):
        """The dataset shard ``name`` (``train_<rank>``, ``eval_<rank>``) as a Ray Data iterator."""
        return ray.train.get_dataset_shard(name)

    def wrap_model(self, cfg: Config, module: torch.nn.Module, lm: torch.nn.Module) -> torch.nn.Module:
        return wrap_model(cfg, module, lm)

    def open_checkpoints(self, cfg: Config, score_attribute: str | None) -> RayTrainCheckpoints:
        return open_run_checkpoints(cfg, score_attribute)


def set_up_worker(cfg: Config, runtime: RayTrainRuntime) -> tuple[int, int, torch.device]:
    """Quiet Ray Train's metric logs, size torch's threads to the worker's CPUs, seed; (rank, world, device)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one progress line per interval, not Ray's dicts
    rank, world, device = runtime.locate(cfg)
    if device.type == "cpu":
        torch.set_num_threads(count_cpu_threads(cfg.scaling.cpus_per_worker))  # as the reference actors
    seed_everything(cfg.train.seed)
    return rank, world, device


def build_report_metrics(state: TrainState, train: dict[str, float], evals: dict[str, float]) -> dict[str, Any]:
    """What a checkpoint is reported with: the eval metrics, the last train window, throughput and state."""
    pps = state.pairs_seen / max(state.train_seconds, 1e-9)
    return {
        **evals,
        "step": state.step,
        "epoch": state.epoch,
        "train_loss": train.get("loss", float("nan")),
        "train_accuracy": train.get("acc", float("nan")),
        "train_reward_margin": train.get("margin", float("nan")),
        "pairs_seen": state.pairs_seen,
        "tokens_seen": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "pairs_per_second": pps,
        "tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
        "nonfinite_skips": state.nonfinite_skips,
        "skipped_row_ids": list(state.skipped_row_ids),
        "peak_memory_mb": peak_memory_mb(),
    }


class WorkerLoop:
    """One worker's run of an objective: model, optimizer, rows and the bookkeeping between steps."""

    def __init__(self, loop_config: dict[str, Any], runtime: RayTrainRuntime | None = None):
        cfg = self.cfg = config_from_dict(loop_config["cfg"])
        runtime = runtime or RayTrainRuntime()
        self.model_path, self.tokenizer_path = loop_config["model_path"], loop_config["tokenizer_path"]
        self.rank, self.world, self.device = set_up_worker(cfg, runtime)
        self.micro_batch_tokens = resolve_micro_batch_tokens(cfg.train.micro_batch_tokens, self.device)
        objective_cls = resolve_objective(loop_config.get("objective", "dpo"))
        self.train_rows = objective_cls.read_rows(runtime.read_shard(f"train_{self.rank}"))  # cut on the driver
        has_eval = loop_config.get("has_eval", True)
        self.eval_rows = objective_cls.read_rows(runtime.read_shard(f"eval_{self.rank}")) if has_eval else []
        self.rows_per_step, self.total_steps = count_steps(cfg, len(self.train_rows), self.world)
        self.checkpoints = runtime.open_checkpoints(cfg, objective_cls.checkpoint_score)
        ckpt_dir = self.checkpoints.find_latest()
        self.lm = build_policy(cfg, self.model_path, self.device, ckpt_dir)
        self.objective = objective_cls(cfg, self.lm, loop_config["pad_id"], self.device)
        self.model = runtime.wrap_model(cfg, self.objective.trainable_module(), self.lm)
        self.objective.attach(self.model, self.model_path)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler, self.state = build_optimization(cfg, self.params, self.total_steps, ckpt_dir)
        if ckpt_dir is not None and self.rank == 0:
            say(f"resuming from checkpoint at step {self.state.step}/{self.total_steps}")
        self.writers = open_metric_writers(cfg, self.rank)
        self.poller = StopPoller(cfg.run_name)
        self.window = dict.fromkeys(self.objective.window_keys, 0.0)
        self.last_train: dict[str, float] = {}
        self.segment_start, self.seconds_before = time.perf_counter(), self.state.train_seconds

    def plan_micro_batches(self, step_rows: Sequence) -> list[list[int]]:
        """The step's forward passes (:func:`~dpo_ray.epochs.plan_micro_batches`); under a token budget every worker
        runs as many as the worker that needs the most."""
        lengths = [r.num_tokens for r in step_rows]
        micro = plan_micro_batches(lengths, self.cfg.train.micro_batch_size, self.micro_batch_tokens)
        if self.micro_batch_tokens > 0 and self.world > 1:
            micro = split_to_count(micro, int(all_reduce_max(float(len(micro)), self.device)), lengths)
        return micro

    def accumulate_gradients(self, step_rows: Sequence) -> tuple[bool, dict[str, float]]:
        """Backward of one step over its micro-batches (DDP syncs on the last): (all losses finite, step sums)."""
        micro = self.plan_micro_batches(step_rows)
        step_sums = dict.fromkeys(self.objective.window_keys, 0.0)
        finite = True
        for m_i, idx in enumerate(micro):
            sync = m_i == len(micro) - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                weighted, loss, sums = self.objective.compute_micro([step_rows[i] for i in idx], step_rows)
                finite = finite and bool(torch.isfinite(loss).item())
                weighted.backward()
            for k in step_sums:
                step_sums[k] += sums[k]
        return finite, step_sums

    def skip_or_raise_nonfinite(self, step_rows: Sequence) -> None:
        """A non-finite step on some worker: drop its gradients and skip it, or stop naming its rows."""
        self.optimizer.zero_grad(set_to_none=True)
        ids = [r.row_id for r in step_rows]
        if not self.cfg.train.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {self.state.step + 1} (worker {self.rank}); rows in the batch: "
                f"{', '.join(ids)}. Set train.skip_nonfinite=true to skip such batches."
            )
        self.state.nonfinite_skips += 1
        self.state.skipped_row_ids.extend(ids[:20])
        logger.warning("skipping a non-finite batch at step %d: rows %s", self.state.step + 1, ids)

    def train_step(self, step_rows: Sequence) -> tuple[bool, bool]:
        """One optimizer step on ``step_rows``: (stepped, stop requested on some worker)."""
        self.optimizer.zero_grad(set_to_none=True)
        finite, step_sums = self.accumulate_gradients(step_rows)
        grad_norm = clip_gradients(self.model, self.params, self.cfg.train.max_grad_norm)
        finite = finite and bool(torch.isfinite(grad_norm).item())
        nonfinite_flag, stop_flag = all_reduce_max_many(
            [0.0 if finite else 1.0, float(self.poller.poll())], self.device
        )
        self.state.batch_in_epoch += 1
        if nonfinite_flag > 0:
            self.skip_or_raise_nonfinite(step_rows)
            return False, stop_flag > 0
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        n_rows, n_tokens = all_reduce_sum([len(step_rows), sum(r.num_tokens for r in step_rows)], self.device)
        self.state.pairs_seen += int(n_rows)
        self.state.tokens_seen += int(n_tokens)
        for k in self.window:
            self.window[k] += step_sums[k]
        return True, stop_flag > 0

    def log_progress(self) -> None:
        """Reduce the window's sums over workers into the train metrics; a line and scalars on rank 0."""
        keys = self.objective.window_keys
        self.last_train = self.objective.summarize_window(
            dict(zip(keys, all_reduce_sum([self.window[k] for k in keys], self.device)))
        )
        self.window = dict.fromkeys(keys, 0.0)
        state = self.state
        state.train_seconds = self.seconds_before + time.perf_counter() - self.segment_start
        pps = state.pairs_seen / max(state.train_seconds, 1e-9)
        if self.rank == 0:
            eta = (self.total_steps - state.step) * state.train_seconds / max(state.step, 1)
            lr = self.scheduler.get_last_lr()[0]
            say(self.objective.format_progress(state.step, self.total_steps, self.last_train, pps, eta, lr))
            log_metrics(
                self.writers,
                {**self.objective.train_scalars(self.last_train), "train/pairs_per_second": pps, "train/lr": lr},
                state.step,
            )

    def report(self, final: bool, interrupted: bool = False) -> dict[str, Any]:
        """Evaluate, then report the metrics with a checkpoint (the LoRA merged in when ``final``)."""
        self.state.train_seconds = self.seconds_before + time.perf_counter() - self.segment_start
        eval_model = self.model if self.cfg.train.strategy == "fsdp" else self.objective.trainable_module()
        metrics = build_report_metrics(self.state, self.last_train, self.objective.evaluate(self.eval_rows, eval_model))
        if interrupted:
            metrics["interrupted"] = True
        full_state = gather_model_state(self.model, self.cfg)

        def write(directory: Path) -> None:
            save_policy(self.lm, self.tokenizer_path, directory, self.cfg, state_dict=full_state, merge_lora=final)
            save_training_state(directory, self.optimizer, self.scheduler, self.state, metrics)

        self.checkpoints.report(metrics, write)
        return metrics

    def report_eval(self, is_last: bool) -> None:
        """A scheduled evaluation and checkpoint; the eval metrics go to the writers and the console."""
        metrics = self.report(final=is_last)
        log_metrics(self.writers, {k: v for k, v in metrics.items() if k.startswith("eval_")}, self.state.step)
        line = self.objective.format_eval(self.state.step, metrics)
        if self.rank == 0 and line:
            say(line)
        self.segment_start, self.seconds_before = time.perf_counter(), self.state.train_seconds

    def run(self) -> None:
        """Train to ``total_steps``, reporting on schedule; a stop request checkpoints and ends the run."""
        cfg, state, total = self.cfg, self.state, self.total_steps
        eval_every = cfg.train.eval_every or total
        ckpt_every = cfg.train.checkpoint_every or eval_every
        planner = EpochPlanner(self.train_rows, self.rows_per_step, cfg)
        reported_final = False
        while state.step < total:
            stepped, stop_requested = self.train_step(planner.take_step_rows(state))
            if not stepped:
                continue
            is_last = state.step >= total
            if stop_requested and not is_last:
                self.report(final=False, interrupted=True)
                if self.rank == 0:
                    say(f"stop requested: checkpoint saved at step {state.step}/{total}")
                reported_final = True
                break
            is_report = state.step % eval_every == 0 or state.step % ckpt_every == 0 or is_last
            if state.step % cfg.train.log_every == 0 or is_last or (is_report and self.objective.log_at_reports):
                self.log_progress()
            if is_report:
                self.report_eval(is_last)
                reported_final = is_last
        if not reported_final:
            self.report(final=True)  # resumed a finished run: report the restored model again, without training
        close_metric_writers(self.writers)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config`` = {cfg: Config dict, objective: a name in
    :data:`dpo_ray.objective.OBJECTIVES` (default ``dpo``), model_path, tokenizer_path, pad_id, has_eval}."""
    WorkerLoop(loop_config).run()
