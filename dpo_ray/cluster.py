"""Starting or joining Ray, and checking up front that the cluster can hold the job."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from dpo_ray.config import Config, ConfigError

logger = logging.getLogger("dpo_ray")

# Job metadata key that marks a driver job as a dpo-ray run; its value is the run's output directory.
# Only placement groups of finished jobs with this job's mark are ever released (ray_compat).
RUN_METADATA_KEY = "dpo_ray.output_dir"
RECORDED_HEAD_TIMEOUT_S = 2.0  # a live head answers a TCP connect at once; a remote one gets a little longer


def init_ray(num_cpus: int | None = None, run_dir: str | Path | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local instance.

    Without RAY_ADDRESS, Ray joins the head a ``ray start`` on this machine recorded; when that head no
    longer answers (it died without ``ray stop``), a fresh local instance starts instead (see
    :func:`choose_address_without_ray_address`). ``run_dir``: the run's output directory, stored in the
    job's metadata so a later run in the same directory can tell this job's leftovers from other users'.

    Ray 2.60 enables token authentication for local instances by itself; a client of a remote cluster
    finds the token in ``~/.ray/auth_token`` or through RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # bars flood job logs
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    job_config = ray.job_config.JobConfig(metadata=build_job_metadata(run_dir))
    if os.environ.get("RAY_ADDRESS"):
        enable_token_auth_when_available()
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, job_config=job_config,
                 log_to_driver=True)
    else:
        ray.init(address=choose_address_without_ray_address(), num_cpus=num_cpus, runtime_env=runtime_env,
                 job_config=job_config)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


def build_job_metadata(run_dir: str | Path | None) -> dict[str, str]:
    """The driver job's metadata: the dpo-ray mark with the run's resolved output directory, or nothing."""
    if run_dir is None:
        return {}
    return {RUN_METADATA_KEY: str(Path(run_dir).expanduser().resolve())}


# ------------------------------------------------------------------------------------ the recorded head


def choose_address_without_ray_address(timeout_s: float = RECORDED_HEAD_TIMEOUT_S) -> str | None:
    """``ray.init``'s address when RAY_ADDRESS is unset: None (Ray's own choice) or ``"local"``.

    None lets Ray join the head recorded by the last ``ray start`` on this machine, or start a local
    instance when there is no record. A head that died without ``ray stop`` leaves its record behind, and
    Ray then retries the dead address for minutes; ``"local"`` makes Ray 2.60 ignore the record
    (``services.canonicalize_bootstrap_address``) and start a fresh instance.
    """
    dead = find_unreachable_recorded_head(timeout_s)
    if dead is None:
        return None
    record, address = dead
    logger.warning("the Ray head recorded in %s (%s) does not answer: starting a fresh local Ray instance "
                   "instead (set RAY_ADDRESS to join a cluster; delete that file, or run `ray stop`, to clear "
                   "the record)", record, address)
    return "local"


def find_unreachable_recorded_head(timeout_s: float = RECORDED_HEAD_TIMEOUT_S) -> tuple[str, str] | None:
    """(record file, address) when the head recorded by ``ray start`` refuses connections; else None.

    Ray's own helpers find the record (``$RAY_TMPDIR`` or ``$TMPDIR``, else /tmp, then
    ``ray/ray_current_cluster``), so this reads the same file ``ray.init`` would.
    """
    from ray._common.utils import get_ray_address_file
    from ray._private.services import canonicalize_bootstrap_address
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    if not address:
        return None
    try:
        target = canonicalize_bootstrap_address(address)  # what ray.init dials: localhost becomes the node's IP
    except ValueError:
        target = None  # Ray could not connect to it either
    if target and accepts_connection(target, timeout_s):
        return None
    return get_ray_address_file(None), address


def accepts_connection(address: str, timeout_s: float) -> bool:
    """True when ``host:port`` accepts a TCP connection within ``timeout_s`` (a GCS that is up does)."""
    from ray._common.network_utils import parse_address

    parsed = parse_address(address)
    if parsed is None or not parsed[1].isdigit():
        return False  # no head can be at an address Ray cannot parse
    try:
        with socket.create_connection((parsed[0], int(parsed[1])), timeout=timeout_s):
            return True
    except OSError:
        return False


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
