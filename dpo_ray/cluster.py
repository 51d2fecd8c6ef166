"""Starting or joining Ray, and checking up front that the cluster can hold the job."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from dpo_ray.config import AUTO, Config, ConfigError

_started_without_idle_workers = False  # start_local_ray started this process's instance with ray.idle_workers 0

logger = logging.getLogger("dpo_ray")

# Job metadata key that marks a driver job as a dpo-ray run; its value is the run's output directory.
# Only placement groups of finished jobs with this job's mark are ever released (ray_compat).
RUN_METADATA_KEY = "dpo_ray.output_dir"
RECORDED_HEAD_TIMEOUT_S = 2.0  # a live head answers a TCP connect at once; a remote one gets a little longer
# Environment of the workers of a local instance this run starts (its job's runtime_env; a value the driver's own
# environment sets for Ray Train wins, as Train propagates it). One node is never preempted: without this Ray Train
# starts a PreemptionWatcher actor per run (measured: one process and ~190 MB RSS less in a short local run).
LOCAL_INSTANCE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# ... and without the dashboard: Ray Train's state actor polls the State API every 30 s to mark runs whose controller
# died as aborted, for the dashboard's Train page (no dashboard, no page; each failed poll logs a traceback).
NO_DASHBOARD_ENV = {"RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0"}
NO_DASHBOARD_SETUP_HOOK = "dpo_ray.worker_setup.quiet_state_api_warnings"
_unserved_socket: socket.socket | None = None  # see reserve_unserved_address


def init_ray(num_cpus: int | None = None, run_dir: str | Path | None = None,
             include_dashboard: bool | str = AUTO, needs_state_api: bool = True, idle_workers: int | str = AUTO,
             runs_stages: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local instance.

    Without RAY_ADDRESS, Ray joins the head a ``ray start`` on this machine recorded; when that head no
    longer answers (it died without ``ray stop``), a fresh local instance starts instead (see
    :func:`choose_address_without_ray_address`). ``run_dir``: the run's output directory, stored in the
    job's metadata so a later run in the same directory can tell this job's leftovers from other users'.

    ``include_dashboard`` (``ray.include_dashboard``: true, false or auto) and ``needs_state_api`` (the command
    relies on Ray's State API, which only the dashboard serves; auto follows it) shape only a local instance this
    call starts (:func:`start_local_ray`); a cluster that is joined is used as it was started. So do ``idle_workers``
    (``ray.idle_workers``) and ``runs_stages`` (the command runs stage after stage of Ray tasks, as the demo does:
    auto keeps Ray's idle worker processes for them; see :func:`resolve_idle_workers`).

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
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":  # "local" always starts a fresh instance (ray.init's own meaning)
        enable_token_auth_when_available()
        ray.init(address=address, runtime_env=runtime_env, job_config=job_config, log_to_driver=True)
    else:
        address = address or choose_address_without_ray_address()
        if starts_local_instance(address):
            start_local_ray(address, num_cpus, runtime_env, job_config, include_dashboard, needs_state_api,
                            resolve_idle_workers(idle_workers, runs_stages))
        else:  # the live head a `ray start` on this machine recorded
            ray.init(address=address, num_cpus=num_cpus, runtime_env=runtime_env, job_config=job_config)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


# ------------------------------------------------------------------------------------ a lean local instance


def start_local_ray(address: str | None, num_cpus: int | None, runtime_env: dict, job_config,
                    include_dashboard: bool | str, needs_state_api: bool, idle_workers: int | None = None) -> None:
    """Start a local instance with only what the command needs: the dashboard only when ``ray.include_dashboard``
    resolves to true (:func:`resolve_include_dashboard`), :func:`build_local_runtime_env`'s environment, and at
    most ``idle_workers`` idle worker processes (None: Ray's default, one per CPU).

    The dashboard's head modules are about ten processes (measured on a short local train run: about 1 GB of the
    process tree's RSS, a few hundred MB of its PSS); a run that never queries the State API does not need them.
    """
    import ray

    dashboard = resolve_include_dashboard(include_dashboard, needs_state_api)
    if not dashboard:
        logger.info("starting a local Ray instance without the dashboard (ray.include_dashboard=%s; "
                    "--set ray.include_dashboard=true starts it)", str(include_dashboard).lower())
    global _started_without_idle_workers
    _started_without_idle_workers = idle_workers == 0
    system_config = {} if idle_workers is None else {"num_workers_soft_limit": idle_workers}
    ray.init(address=address, num_cpus=num_cpus, runtime_env=build_local_runtime_env(runtime_env, dashboard),
             job_config=job_config, include_dashboard=dashboard, _system_config=system_config)


def wait_for_idle_workers_to_exit(timeout_s: float = 15.0, poll_s: float = 0.25) -> float:
    """Seconds spent waiting, up to ``timeout_s``, until no idle Ray worker process of this process's own local
    instance (started with ``ray.idle_workers`` 0) is left; 0 for any other instance.

    The raylet stops an idle worker about a second after its last task, but the process takes several more seconds
    to exit (6 s for the data stage's parquet writers, measured), holding what it allocated: about 0.2 GB each.
    Training in the driver (``scaling.num_workers=0``) waits for them, so its peak does not stack on theirs.
    """
    if not _started_without_idle_workers:
        return 0.0
    import psutil

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            # a zombie (exited, not yet reaped) holds no memory
            idle = [p for p in psutil.Process().children(recursive=True)
                    if p.name().startswith("ray::IDLE") and p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            idle = [None]  # a process ended while it was listed: look again
        if not idle:
            break
        time.sleep(poll_s)
    return time.monotonic() - start


def resolve_idle_workers(setting: int | str, runs_stages: bool) -> int | None:
    """``ray.idle_workers`` as the raylet's ``num_workers_soft_limit`` (None: Ray's default, one per CPU).

    Ray keeps up to that many idle worker processes for later tasks, and each keeps what its tasks imported and
    allocated: after the data stage of a train run, the two that tokenized held 514 and 392 MB RSS, through all of
    training (measured on the CPU benchmark). auto: none for a single run (train, sft), whose later Ray tasks are
    few; Ray's default for commands that run stage after stage of tasks (demo, iterate, sweep), which reuse them.
    """
    if setting == AUTO:
        return None if runs_stages else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f"config key 'ray.idle_workers': must be a number >= 0 or auto; got {setting!r}")
    return setting


def starts_local_instance(address: str | None) -> bool:
    """True when ``ray.init(address=address)`` starts a new local instance rather than joining one.

    ``"local"`` always starts one; None does unless a ``ray start`` on this machine recorded a head (a live
    one: :func:`choose_address_without_ray_address` turns a dead record into ``"local"``).
    """
    if address == "local":
        return True
    if address is not None:
        return False
    from ray._private.utils import read_ray_address

    return not read_ray_address()


def resolve_include_dashboard(setting: bool | str, needs_state_api: bool) -> bool:
    """``ray.include_dashboard`` as a bool: auto starts the dashboard only for a command that relies on the State API
    (the sweep); false for such a command is refused, naming the key."""
    if setting == AUTO:
        return needs_state_api
    if not isinstance(setting, bool):
        raise ConfigError(f"config key 'ray.include_dashboard': must be true, false or auto; got {setting!r}")
    if not setting and needs_state_api:
        raise ConfigError("config key 'ray.include_dashboard': false, but this command relies on Ray's State API, "
                          "which only the dashboard serves (a sweep frees the placement groups of trials ASHA "
                          "stopped through it; without it later trials wait for CPUs forever); use auto or true")
    return setting


def build_local_runtime_env(runtime_env: dict, include_dashboard: bool) -> dict:
    """The job's runtime_env for a local instance this run starts: :data:`LOCAL_INSTANCE_ENV`, and without the
    dashboard what keeps Ray's own State API users quiet and on this instance.

    Without the dashboard nothing of this instance serves the State API, yet Ray 2.60 still advertises the
    dashboard's configured address (127.0.0.1:8265 by default), where another instance's dashboard may answer
    for its own cluster: Ray Train's PlacementGroupCleaner would then find no controller of this run there and
    remove the run's worker group. RAY_API_SERVER_ADDRESS, which Ray's State API clients read first, points them at
    a port that refuses every connection instead (:func:`reserve_unserved_address`), so each query fails at once;
    :data:`NO_DASHBOARD_ENV` and :data:`NO_DASHBOARD_SETUP_HOOK` keep those failures out of the log.
    """
    env_vars = {**runtime_env.get("env_vars", {}), **LOCAL_INSTANCE_ENV}
    if include_dashboard:
        return {**runtime_env, "env_vars": env_vars}
    env_vars.update(NO_DASHBOARD_ENV, RAY_API_SERVER_ADDRESS=reserve_unserved_address())
    return {**runtime_env, "env_vars": env_vars, "worker_process_setup_hook": NO_DASHBOARD_SETUP_HOOK}


def reserve_unserved_address() -> str:
    """``http://127.0.0.1:PORT`` that refuses every connection while this process lives: a loopback port bound by
    this process (so nothing else can take it) and never listened on. A local instance ends with its driver."""
    global _unserved_socket
    if _unserved_socket is None:
        _unserved_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _unserved_socket.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{_unserved_socket.getsockname()[1]}"


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
