"""Run a tiny sweep on a one-machine autoscaling Ray cluster; print one JSON line with what happened.

    python tests/autoscaling_sweep.py OUTPUT_DIR MODEL_DIR DATA_FILE

Started by ``tests/test_autoscaling.py`` in a subprocess, so the test session's own Ray instance is not
touched. The cluster is the shape ``ray.cluster_utils.AutoscalingCluster(head_resources={"CPU": 1},
worker_node_types={"cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
"max_workers": 2}})`` would build, started without that class because, in Ray 2.60:

* ``AutoscalingCluster.start()`` and ``.shutdown()`` run ``ray stop --force``, which kills EVERY Ray
  process on the machine (other users' clusters and the test session's instance included);
* its config template ``fake_multi_node/example.yaml`` is not shipped in the wheel (FileNotFoundError).

So this script starts the head with ``ray start --head --autoscaling-config=...`` on free ports, with the
same fake multi-node provider (loaded as an ``external`` provider, which needs no template), and at the
end stops only the processes it started: it makes itself a child subreaper, so every Ray process of its
cluster stays its descendant, and terminates those by pid.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HEAD_CPUS = 1
WORKER_NODE_TYPES = {
    "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
}
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (the daemons ``ray start`` leaves behind) are re-parented to this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def find_free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def build_autoscaling_config(gcs_address: str) -> dict:
    """The cluster config AutoscalingCluster generates, with the provider loaded as an external module."""
    node_types = json.loads(json.dumps(WORKER_NODE_TYPES))
    node_types["ray.head.default"] = {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "dpo-ray-autoscaling-test",
        "max_workers": sum(t["max_workers"] for t in WORKER_NODE_TYPES.values()),
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": gcs_address,  # worker nodes join this head, not whatever listens on 6379
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,  # nodes stay up until the end of the script, so they can be counted
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def start_head(config_path: Path, port: int, temp_dir: Path) -> None:
    """``ray start --head`` with the autoscaler (fake multi-node provider) on ports nobody else uses."""
    ray_cli = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray_cli), "start", "--head",
        f"--port={port}",
        f"--num-cpus={HEAD_CPUS}",
        f"--autoscaling-config={config_path}",
        f"--dashboard-port={find_free_port()}",
        f"--ray-client-server-port={find_free_port()}",
        f"--dashboard-agent-listen-port={find_free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    env.pop("RAY_ADDRESS", None)
    # With RAY_AUTH_MODE=token set (see main), `ray start` refuses to make the token itself; on a fresh
    # machine no earlier Ray instance has written ~/.ray/auth_token yet.
    subprocess.check_call([str(ray_cli), "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL)
    subprocess.check_call(cmd, env=env, stdout=sys.stderr)


def stop_descendants(timeout_s: float = 20.0) -> int:
    """SIGTERM, then SIGKILL, every process this script started (directly or through ``ray start``)."""
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True)
    _, alive = psutil.wait_procs(signal_each(procs, "terminate"), timeout=timeout_s)
    psutil.wait_procs(signal_each(alive, "kill"), timeout=5)
    # Daemons whose parents died meanwhile were re-parented to us: reap them too.
    late = me.children(recursive=True)
    psutil.wait_procs(signal_each(late, "kill"), timeout=5)
    return len(procs) + len(late)


def signal_each(procs: list, method: str) -> list:
    """Call ``terminate`` or ``kill`` on each process (those already gone are skipped); returns ``procs``."""
    import psutil

    for p in procs:
        try:
            getattr(p, method)()
        except psutil.NoSuchProcess:
            pass
    return procs


def count_alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def watch_nodes(stop: threading.Event, seen: list[int]) -> None:
    """Record the largest number of alive nodes while the sweep runs."""
    while not stop.is_set():
        try:
            seen.append(count_alive_nodes())
        except Exception:
            pass
        stop.wait(1.0)


def build_sweep_config(output_dir: Path, model_dir: str, data_file: str):
    """Trials whose single worker wants 2 CPUs: the 1-CPU head can never run one. They train in a Ray Train worker
    group (``sweep.train_in_trial`` off), so this also covers that path of a sweep; the other sweep tests train
    their one-worker trials in the trial's own process."""
    from dpo_ray.config import config_from_dict

    return config_from_dict({
        "model": {"name_or_path": model_dir},
        "data": {"train": data_file, "max_length": 256, "eval_fraction": 0.1, "max_invalid_fraction": 0.5},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 2, "eval_every": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2.0, "max_failures": 0, "allow_autoscale": True},
        "sweep": {"num_samples": 1, "max_concurrent_trials": 1, "asha": False, "seed": 3, "train_in_trial": False},
        "output_dir": str(output_dir),
    })


def run(output_dir: Path, model_dir: str, data_file: str) -> dict:
    import ray

    from dpo_ray.cluster import init_ray
    from dpo_ray.sweep import run_sweep

    port = find_free_port()
    gcs_address = f"{ray.util.get_node_ip_address()}:{port}"
    work = Path(tempfile.mkdtemp(prefix="dpo-as-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    config_path = work / "autoscaling.json"
    config_path.write_text(json.dumps(build_autoscaling_config(gcs_address)))
    stop, seen = threading.Event(), []
    try:
        start_head(config_path, port, work / "ray")
        os.environ["RAY_ADDRESS"] = gcs_address
        init_ray()
        nodes_at_start = count_alive_nodes()
        watcher = threading.Thread(target=watch_nodes, args=(stop, seen), daemon=True)
        watcher.start()
        summary = run_sweep(build_sweep_config(output_dir, model_dir, data_file))
        stop.set()
        watcher.join(timeout=5)
        return {
            "nodes_at_start": nodes_at_start,
            "max_alive_nodes": max(seen + [count_alive_nodes()]),
            "alive_nodes_after": count_alive_nodes(),
            "statuses": summary["statuses"],
            "interrupted": summary["interrupted"],
            "best_trial": (summary.get("best") or {}).get("trial_id"),
            "wall_seconds": summary["wall_seconds"],
        }
    finally:
        stop.set()
        ray.shutdown()
        stopped = stop_descendants()
        print(f"[autoscaling_sweep] stopped {stopped} processes of the test cluster", file=sys.stderr, flush=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    output_dir, model_dir, data_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    # `ray start` enables token auth (token in ~/.ray/auth_token); a driver given an explicit address sends
    # the token only when the mode is set, and Ray reads the mode once, when it is first imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    become_subreaper()
    # SIGTERM (e.g. the test timing out) still runs the finally block that stops the cluster.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    result = run(output_dir, model_dir, data_file)
    print("AUTOSCALING_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
