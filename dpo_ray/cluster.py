"""Starting or joining Ray, and checking up front that the cluster can hold the job."""

from __future__ import annotations

import logging
import os

from dpo_ray.config import Config, ConfigError

logger = logging.getLogger("dpo_ray")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local instance.

    Ray 2.60 enables token authentication for local instances by itself; a client of a remote cluster
    finds the token in ``~/.ray/auth_token`` or through RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # bars flood job logs
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_ADDRESS"):
        enable_token_auth_when_available()
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


def enable_token_auth_when_available() -> None:
    """Send the cluster token when one is at hand (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]).

    Ray 2.60 turns token mode on by itself for a new local instance, but not for a client that joins an
    existing cluster by explicit address; without it such a client is refused by a token-auth cluster.
    An explicit RAY_AUTH_MODE is left as it is.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: RAY_AUTH_MODE=token must be set by hand
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def check_cluster_resources(cfg: Config) -> None:
    """Fail within seconds when the cluster can never provide the workers, instead of waiting forever.

    Ray Train retries worker-group start-up indefinitely while resources are missing. Unless
    ``scaling.allow_autoscale`` says an autoscaler will add nodes, we compare with what the cluster has.
    """
    import ray

    if cfg.scaling.allow_autoscale or cfg.scaling.num_workers == 0:
        return
    total = ray.cluster_resources()
    workers = cfg.scaling.num_workers
    need_cpus = workers * cfg.scaling.cpus_per_worker
    have_cpus = total.get("CPU", 0.0)
    if cfg.scaling.use_gpu:
        need_gpus = workers * cfg.scaling.gpus_per_worker
        have_gpus = total.get("GPU", 0.0)
        if have_gpus < need_gpus:
            raise ConfigError(
                f"config key 'scaling.use_gpu': {workers} workers need {need_gpus:g} GPUs but the cluster has "
                f"{have_gpus:g} and no autoscaler was declared (set scaling.use_gpu=false, or "
                f"scaling.allow_autoscale=true on an autoscaling cluster)"
            )
    if have_cpus < need_cpus:
        raise ConfigError(
            f"config key 'scaling.num_workers': {workers} workers x {cfg.scaling.cpus_per_worker:g} CPUs need "
            f"{need_cpus:g} CPUs but the cluster has {have_cpus:g} (lower scaling.num_workers or "
            f"scaling.cpus_per_worker, or set scaling.allow_autoscale=true on an autoscaling cluster)"
        )
