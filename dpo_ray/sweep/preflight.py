"""Checks before a sweep starts: its size from the cluster, enough CPUs for its trials, and a resume with the
config it started with."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import ray
import yaml

from dpo_ray.cluster import check_cluster_resources
from dpo_ray.config import AUTO, HOSTING_SECTIONS, Config, ConfigError, derive_config
from dpo_ray.sweep.space import count_trials

logger = logging.getLogger("dpo_ray")

SWEEP_CONFIG_FILE = "sweep_config.yaml"  # the config the sweep started with; a resume must match it
# Trials at once on an autoscaling cluster: its present size says nothing about what it can grow to, so auto
# cannot size from it (set sweep.max_concurrent_trials to run more at once there).
AUTOSCALE_CONCURRENT_TRIALS = 2
SLACK = 1e-9  # resource sums are floats (0.25 CPU shares)


@dataclass(frozen=True)
class SweepSizing:
    """Trials at once and Ray Train workers per trial, and the one line that says why."""

    concurrent_trials: int
    workers_per_trial: int
    reason: str


def size_sweep(cfg: Config) -> Config:
    """The sweep's config with its ``auto`` settings sized from the cluster's resources (logged), then checked.

    Resolved once on the driver, before any trial is built; values the user set are kept as they are, and
    ones the cluster cannot hold fail here with the key to change.
    """
    if cfg.sweep.workers_per_trial == AUTO and cfg.scaling.num_workers == 0:  # what auto would size from
        raise ConfigError("config key 'scaling.num_workers': 0 (training in the driver) cannot serve a sweep: each "
                          "trial needs a Ray Train worker group, as Ray 2.60 refuses ray.train calls inside a Tune "
                          "trial; set sweep.workers_per_trial=1 or more")
    resources = ray.cluster_resources()
    sized = size_sweep_config(cfg, resources)
    check_cluster_resources(sized)
    if not sized.scaling.allow_autoscale:
        check_sweep_fits(sized, resources)
    return sized


def size_sweep_config(cfg: Config, resources: dict[str, float]) -> Config:
    """``cfg`` with the sizing :func:`choose_sweep_sizing` picks for ``resources`` written in, and logged."""
    sizing = choose_sweep_sizing(cfg, resources)
    logger.info("sweep sizing: %s", sizing.reason)
    return derive_config(cfg, {"sweep.max_concurrent_trials": sizing.concurrent_trials,
                               "sweep.workers_per_trial": sizing.workers_per_trial,
                               "scaling.num_workers": sizing.workers_per_trial})


def choose_sweep_sizing(cfg: Config, resources: dict[str, float]) -> SweepSizing:
    """Settle ``sweep.max_concurrent_trials`` and ``sweep.workers_per_trial`` from ``resources``
    (``ray.cluster_resources()``); values that are not ``auto`` are kept.

    Auto workers: ``scaling.num_workers``, or fewer (dividing ``train.batch_size``) when one trial with that many
    cannot fit. Auto concurrency: as many trials as can all hold their workers at once (at least 1, at most the
    number of trials), so no started trial waits for a core another trial holds.
    """
    if cfg.scaling.allow_autoscale:
        return choose_autoscale_sizing(cfg, resources)
    workers, why_workers = choose_workers_per_trial(cfg, resources)
    concurrent, why = choose_concurrent_trials(cfg, workers, resources)
    return SweepSizing(concurrent, workers, f"{concurrent} trial(s) at once ({why}), {workers} worker(s) per trial "
                       f"({why_workers})")


def choose_autoscale_sizing(cfg: Config, resources: dict[str, float]) -> SweepSizing:
    """On an autoscaling cluster the present resources bound nothing: auto keeps the configured workers and
    runs :data:`AUTOSCALE_CONCURRENT_TRIALS` trials at once."""
    sweep = cfg.sweep
    workers = cfg.scaling.num_workers if sweep.workers_per_trial == AUTO else sweep.workers_per_trial
    concurrent = (min(AUTOSCALE_CONCURRENT_TRIALS, count_trials(cfg)) if sweep.max_concurrent_trials == AUTO
                  else sweep.max_concurrent_trials)
    return SweepSizing(concurrent, workers, f"{concurrent} trial(s) at once, {workers} worker(s) each (autoscaling "
                       f"cluster: its present {describe_resources(cfg, resources)} do not bound the sweep)")


def choose_concurrent_trials(cfg: Config, workers: int, resources: dict[str, float]) -> tuple[int, str]:
    """Trials at once and why: as set, or as many as can all hold ``workers`` workers at once."""
    if cfg.sweep.max_concurrent_trials != AUTO:
        return cfg.sweep.max_concurrent_trials, "sweep.max_concurrent_trials as set"
    trials, fit = count_trials(cfg), count_fitting_trials(cfg, workers, resources)
    need, have = describe_trial_need(cfg, workers), describe_resources(cfg, resources)
    if fit >= trials:
        return trials, f"auto: all {trials} trials fit at once"
    if fit >= 1:
        return fit, f"auto: {fit} trial(s) x {need} fit in {have}"
    return 1, f"auto: not even 1 trial of {need} fits in {have}"  # check_sweep_fits says what to change


def choose_workers_per_trial(cfg: Config, resources: dict[str, float]) -> tuple[int, str]:
    """Workers per trial and why: as set, or ``scaling.num_workers`` lowered until one trial fits."""
    if cfg.sweep.workers_per_trial != AUTO:
        return cfg.sweep.workers_per_trial, "sweep.workers_per_trial as set"
    wanted = cfg.scaling.num_workers
    if count_fitting_trials(cfg, wanted, resources) >= 1:
        return wanted, f"auto: scaling.num_workers={wanted}"
    for workers in range(wanted - 1, 0, -1):
        if cfg.train.batch_size % workers == 0 and count_fitting_trials(cfg, workers, resources) >= 1:
            return workers, (f"auto: scaling.num_workers={wanted} would need {describe_trial_need(cfg, wanted)} "
                             f"per trial, the cluster has {describe_resources(cfg, resources)}")
    return wanted, f"auto: scaling.num_workers={wanted}; not even 1 worker fits"  # check_sweep_fits says so


def trains_in_trial(cfg: Config, workers: int | str | None = None) -> bool:
    """Whether trials of ``workers`` workers (default: ``sweep.workers_per_trial``) train in the Tune trial's own
    process (:mod:`dpo_ray.sweep.trial`): one DDP worker with ``sweep.train_in_trial`` on. FSDP trials keep Ray
    Train, which wraps the model as a single run's."""
    workers = cfg.sweep.workers_per_trial if workers is None else workers
    return cfg.sweep.train_in_trial and workers == 1 and cfg.train.strategy == "ddp"


def needs_state_api(cfg: Config) -> bool:
    """Whether the sweep may need Ray's State API (so a local instance's dashboard): to free the placement groups
    of Ray Train worker groups whose trials ASHA stopped. Trials that train in their own process leave none;
    ``auto`` workers count as ``scaling.num_workers``, which sizing can only lower."""
    workers = cfg.scaling.num_workers if cfg.sweep.workers_per_trial == AUTO else cfg.sweep.workers_per_trial
    return not trains_in_trial(cfg, workers)


def count_trial_cpus(cfg: Config, workers: int) -> float:
    """CPUs one trial of ``workers`` workers holds: its workers' and ``sweep.trial_cpus`` for its own function,
    or only the worker's when it trains in its own process."""
    if trains_in_trial(cfg, workers):
        return cfg.scaling.cpus_per_worker
    return cfg.sweep.trial_cpus + max(workers, 1) * cfg.scaling.cpus_per_worker


def count_fitting_trials(cfg: Config, workers: int, resources: dict[str, float]) -> int:
    """How many trials with ``workers`` workers each the cluster can run at once (:func:`count_trial_cpus`, and
    the workers' GPUs). (0 workers is refused by :func:`size_sweep`; it is counted as 1 here so that the sizing
    can still say what would fit.)
    """
    fit = math.floor((resources.get("CPU", 0.0) + SLACK) / count_trial_cpus(cfg, workers))
    if cfg.scaling.use_gpu and workers > 0:
        fit = min(fit, math.floor((resources.get("GPU", 0.0) + SLACK) / (workers * cfg.scaling.gpus_per_worker)))
    return fit


def describe_trial_need(cfg: Config, workers: int) -> str:
    if trains_in_trial(cfg, workers):
        need = f"{cfg.scaling.cpus_per_worker:g} CPUs (one worker, in the trial's process)"
    else:
        need = f"({cfg.sweep.trial_cpus:g} + {workers} x {cfg.scaling.cpus_per_worker:g}) CPUs"
    if cfg.scaling.use_gpu:
        need += f" and {workers * cfg.scaling.gpus_per_worker:g} GPUs"
    return need


def describe_resources(cfg: Config, resources: dict[str, float]) -> str:
    have = f"{resources.get('CPU', 0.0):g} CPUs"
    return have + (f" and {resources.get('GPU', 0.0):g} GPUs" if cfg.scaling.use_gpu else "")


def check_sweep_fits(cfg: Config, resources: dict[str, float]) -> None:
    """Raise when trials could wait for workers forever: each running trial holds ``sweep.trial_cpus`` for its
    own function, and if their shares leave less than one trial's workers need, no trial gets its workers.

    ``cfg`` is sized (:func:`size_sweep`): no ``auto`` left.
    """
    if AUTO in (cfg.sweep.max_concurrent_trials, cfg.sweep.workers_per_trial):
        raise ValueError("check_sweep_fits needs a sized config (size_sweep); it got auto values")
    have = resources.get("CPU", 0.0)
    if trains_in_trial(cfg):  # a trial holds all it needs, so trials that do not fit at once wait their turn
        if cfg.scaling.cpus_per_worker > have + SLACK:
            raise ConfigError(f"config key 'scaling.cpus_per_worker': one trial needs {cfg.scaling.cpus_per_worker:g} "
                              f"CPUs but the cluster has {have:g}")
        return
    concurrent = min(cfg.sweep.max_concurrent_trials, count_trials(cfg))
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if cfg.sweep.trial_cpus + workers > have + SLACK:
        raise ConfigError(
            f"config key 'sweep.workers_per_trial': one trial needs {cfg.sweep.trial_cpus + workers:g} CPUs "
            f"({cfg.sweep.trial_cpus:g} for itself + {cfg.scaling.num_workers} workers x "
            f"{cfg.scaling.cpus_per_worker:g}) but the cluster has {have:g} (lower sweep.workers_per_trial, "
            f"scaling.cpus_per_worker or sweep.trial_cpus)"
        )
    need = concurrent * cfg.sweep.trial_cpus + workers
    if need > have + SLACK:
        raise ConfigError(
            f"config key 'sweep.max_concurrent_trials': {concurrent} concurrent trials x {cfg.sweep.trial_cpus:g} CPUs "
            f"plus one trial's workers ({workers:g} CPUs) need {need:g} CPUs but the cluster has {have:g} "
            f"(lower sweep.max_concurrent_trials or sweep.trial_cpus, or leave it auto)"
        )


def check_resume_matches(cfg: Config) -> None:
    """A resumed sweep must use the config it started with; otherwise trials would mix settings."""
    path = cfg.resolved_output_dir() / SWEEP_CONFIG_FILE
    if not path.exists():
        return
    saved = flatten_dict({k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items()
                          if k not in HOSTING_SECTIONS})
    now = flatten_dict(cfg.to_result_dict())
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"config key '{differ[0]}': {cfg.resolved_output_dir()} holds a sweep started with a different config "
            f"(differs at: {', '.join(differ)}); run the same config to resume it, or use a new output_dir"
        )


def flatten_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"section.key": value}."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten_dict(v, key + "."))
        else:
            flat[key] = v
    return flat
