"""Checks before a sweep starts: enough CPUs for its trials, and a resume with the config it started with."""

from __future__ import annotations

from typing import Any

import ray
import yaml

from dpo_ray.cluster import check_cluster_resources
from dpo_ray.config import Config, ConfigError
from dpo_ray.sweep.space import count_trials

SWEEP_CONFIG_FILE = "sweep_config.yaml"  # the config the sweep started with; a resume must match it


def check_sweep_resources(cfg: Config) -> None:
    """Fail up front when concurrent trials could never all get their workers.

    Each running trial holds ``sweep.trial_cpus`` for its own function; if the trials' shares leave less
    than one trial's workers need, every trial waits for workers forever.
    """
    check_cluster_resources(cfg)
    if cfg.scaling.allow_autoscale:
        return
    have = ray.cluster_resources().get("CPU", 0.0)
    concurrent = min(cfg.sweep.max_concurrent_trials, count_trials(cfg))
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    need = concurrent * cfg.sweep.trial_cpus + workers
    if need > have + 1e-9:
        raise ConfigError(
            f"config key 'sweep.max_concurrent_trials': {concurrent} concurrent trials x {cfg.sweep.trial_cpus:g} CPUs "
            f"plus one trial's workers ({workers:g} CPUs) need {need:g} CPUs but the cluster has {have:g} "
            f"(lower sweep.max_concurrent_trials, sweep.trial_cpus or scaling.num_workers)"
        )


def check_resume_matches(cfg: Config) -> None:
    """A resumed sweep must use the config it started with; otherwise trials would mix settings."""
    path = cfg.resolved_output_dir() / SWEEP_CONFIG_FILE
    if not path.exists():
        return
    saved = flatten_dict(yaml.safe_load(path.read_text()) or {})
    now = flatten_dict(cfg.to_dict())
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
