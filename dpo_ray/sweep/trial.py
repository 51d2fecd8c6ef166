"""One trial: the Tune function trainable that trains one DPO run on what the driver prepared once.

A one-worker trial (the default on a small machine; :func:`~dpo_ray.sweep.preflight.trains_in_trial`) trains
in the trial's own process: the same :class:`~dpo_ray.train_loop.WorkerLoop` as a Ray Train worker runs, with
:class:`TrialRuntime` in place of Ray Train. That saves each trial a Ray Train controller, a worker and a dataset
actor, and their start-up (Ray 2.60 refuses ``ray.train`` calls inside a Tune trial, so Ray Train's local mode
cannot stand in). Trials with more workers build a ``TorchTrainer`` as a single run does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from dataclasses import dataclass
from typing import Any

import torch
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback

from dpo_ray.checkpointing import LocalModeCheckpoints, build_checkpoint_config, resolve_run_dir
from dpo_ray.config import Config
from dpo_ray.data.pipeline import PreparedData, prepare_data
from dpo_ray.sweep.preflight import trains_in_trial
from dpo_ray.sweep.space import build_trial_config
from dpo_ray.train_loop import RayTrainRuntime, WorkerLoop
from dpo_ray.trainer import (
    build_loop_config,
    finish_run,
    pad_token_id,
    prepare_model_path,
    run_dpo,
    split_for_workers,
    write_resolved_config,
    write_training_plot,
)


@dataclass
class SharedInputs:
    """What the driver prepares once and hands to every trial."""

    model_path: str
    prepared: PreparedData


def prepare_shared_inputs(cfg: Config) -> SharedInputs:
    """Model path and prepared data, once on the driver, for all trials (the reference pass runs here)."""
    model_path = prepare_model_path(cfg)
    ref_path = cfg.resolve_reference_path(model_path) if cfg.dpo.reference == "precomputed" else None
    prepared = prepare_data(cfg, tokenizer_path=model_path, reference_model_path=ref_path)
    return SharedInputs(model_path=model_path, prepared=prepared)


class TrialCheckpoints(LocalModeCheckpoints):
    """A trial's checkpoints, kept as in Ray Train's local mode (``<storage_path>/<trial id>``, where a resumed
    trial finds its latest); each report goes to Tune with the checkpoint's path, as ``TuneReportCallback``
    forwards a worker group's."""

    def __init__(self, run_dir: str, checkpoint_config):
        super().__init__(run_dir, checkpoint_config)
        self.last_metrics: dict[str, Any] = {}
        self.last_path: str | None = None

    def send(self, metrics: dict[str, Any], path: str) -> None:
        self.last_metrics, self.last_path = metrics, path
        tune.report({**metrics, "checkpoint_path": path})


@dataclass
class TrialRuntime(RayTrainRuntime):
    """The worker loop's runtime in a Tune trial's own process: rank 0 of 1, the trial's device, the driver's
    datasets as they are, no DDP, :class:`TrialCheckpoints`."""

    datasets: dict[str, Any]  # "train_0", "eval_0": materialized Ray datasets

    def locate(self, cfg: Config) -> tuple[int, int, torch.device]:
        # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU, so it is device 0 here
        return 0, 1, torch.device("cuda", 0) if cfg.scaling.use_gpu else torch.device("cpu")

    def read_shard(self, name: str):
        return self.datasets[name]

    def wrap_model(self, cfg: Config, module: torch.nn.Module, lm: torch.nn.Module) -> torch.nn.Module:
        return module  # one process: no gradients to synchronize

    def open_checkpoints(self, cfg: Config, score_attribute: str | None) -> TrialCheckpoints:
        return TrialCheckpoints(resolve_run_dir(cfg), build_checkpoint_config(cfg, score_attribute))


@dataclass
class TrialResult:
    """What :func:`~dpo_ray.trainer.finish_run` reads of a run's result: its last metrics and checkpoint."""

    metrics: dict[str, Any]
    checkpoint: Checkpoint | None


def train_in_trial(cfg: Config, shared: SharedInputs) -> dict[str, Any]:
    """Train ``cfg`` in this trial's process and write the same outputs as :func:`~dpo_ray.trainer.run_dpo`
    (config, metrics, checkpoints, ``training.png``, ``final_model``, ``summary.json``); the summary."""
    start = time.perf_counter()
    write_resolved_config(cfg)
    prepared = shared.prepared
    runtime = TrialRuntime(split_for_workers({"train": prepared.train, "eval": prepared.eval}, 1))
    pad_id = pad_token_id(shared.model_path, cfg)
    loop = WorkerLoop(build_loop_config(cfg, "dpo", shared.model_path, pad_id, has_eval=True), runtime)
    loop.run()
    ckpts = loop.checkpoints  # the TrialCheckpoints the runtime opened
    checkpoint = Checkpoint(path=ckpts.last_path, filesystem=ckpts.filesystem) if ckpts.last_path else None
    write_training_plot(cfg)
    return finish_run(cfg, TrialResult(ckpts.last_metrics, checkpoint), prepared, time.perf_counter() - start)


def release_freed_memory() -> None:
    """Collect the finished trial's objects and hand glibc's freed heap back to the OS.

    The trial's model, gradients and optimizer state are all freed when it returns, but glibc keeps the freed
    memory in the process: without this, a reused trial process peaked about 350 MB higher with each trial
    (1.0, 1.4, 1.7, 2.1 GB over four 20M-parameter trials, no tensor left alive); with it, at about 1.1 GB in
    each. A no-op where the C library has no ``malloc_trim``.
    """
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def run_trial(config: dict[str, Any], base_config: dict[str, Any], sweep_output_dir: str, cache_dir: str,
              shared: SharedInputs) -> None:
    """Tune function trainable: train one DPO run with the sampled values (``config``, nested) and report to Tune.

    Each evaluation reaches Tune as a report (from :class:`TrialCheckpoints`, or from rank 0's
    ``ray.train.report`` through ``TuneReportCallback``). An exception here marks the trial ERROR; the sweep goes on.
    """
    trial_id = tune.get_context().get_trial_id()
    cfg = build_trial_config(base_config, config, trial_id, sweep_output_dir, cache_dir)
    if trains_in_trial(cfg):
        try:
            train_in_trial(cfg, shared)
        finally:
            release_freed_memory()  # the next trial runs in this process (reuse_actors)
    else:
        run_dpo(cfg, callbacks=[TuneReportCallback()], prepared=shared.prepared, model_path=shared.model_path)


def build_trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial holds: the whole worker's CPUs (and GPU) when it trains in its own process, else a sliver
    (``sweep.trial_cpus``) for its function while its Ray Train workers hold theirs."""
    if not trains_in_trial(cfg):
        return {"CPU": cfg.sweep.trial_cpus}
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return resources


def build_trainable(cfg: Config, shared: SharedInputs):
    """The trial function with the shared inputs in the object store and the trial's resources."""
    fn = tune.with_parameters(
        run_trial,
        base_config=cfg.to_dict(),
        sweep_output_dir=str(cfg.resolved_output_dir()),
        cache_dir=str(cfg.resolved_cache_dir()),
        shared=shared,
    )
    return tune.with_resources(fn, build_trial_resources(cfg))
