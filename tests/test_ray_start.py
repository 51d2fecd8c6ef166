"""Ray's record of a ``ray start`` head, and placement groups of finished jobs: which are ours to touch.

Pure unit tests: no Ray instance is started here (the session's one from conftest.py is shared).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpo_ray.cluster import RUN_METADATA_KEY, build_job_metadata, choose_address_without_ray_address

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ray_record(tmp_path, monkeypatch):
    """Write Ray's local cluster record (``ray start`` writes it) under a temp dir Ray's lookup uses."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp dir: $RAY_TMPDIR/ray
    (tmp_path / "ray").mkdir()
    record = tmp_path / "ray" / "ray_current_cluster"

    def write(address: str):
        record.write_text(address)
        return record

    return write


def find_closed_port() -> int:
    """A local port nothing listens on (bound once, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_record_of_a_dead_head_starts_a_fresh_local_instance(ray_record, caplog):
    address = f"127.0.0.1:{find_closed_port()}"
    record = ray_record(address)
    with caplog.at_level(logging.WARNING, logger="dpo_ray"):
        assert choose_address_without_ray_address() == "local"  # ray.init(address="local") ignores the record
    [line] = [r.getMessage() for r in caplog.records]
    assert str(record) in line and address in line and "ray stop" in line


def test_a_record_of_a_live_head_is_joined_as_ray_does(ray_record, caplog):
    with socket.socket() as head:
        head.bind(("", 0))  # all interfaces, as a GCS listens: Ray dials the node IP for 127.0.0.1
        head.listen()
        ray_record(f"127.0.0.1:{head.getsockname()[1]}")
        with caplog.at_level(logging.WARNING, logger="dpo_ray"):
            assert choose_address_without_ray_address() is None  # Ray's own choice: the recorded head
    assert caplog.records == []


def test_no_record_leaves_the_choice_to_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert choose_address_without_ray_address() is None


def test_an_unparsable_record_starts_a_fresh_local_instance(ray_record, caplog):
    ray_record("not-an-address")
    with caplog.at_level(logging.WARNING, logger="dpo_ray"):
        assert choose_address_without_ray_address() == "local"
    assert "not-an-address" in caplog.records[0].getMessage()


def test_the_job_mark_is_the_resolved_output_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build_job_metadata("runs/a") == {RUN_METADATA_KEY: str(tmp_path / "runs" / "a")}
    assert build_job_metadata(None) == {}


# ------------------------------------------------------------------------------------ leaked placement groups


def group(group_id: str, job_id: str) -> SimpleNamespace:
    return SimpleNamespace(placement_group_id=group_id, creator_job_id=job_id, is_detached=False, state="CREATED")


def job(job_id: str, status: str, run: str | None):
    from dpo_ray.ray_compat import JobRecord

    return JobRecord(job_id=job_id, status=status, metadata={RUN_METADATA_KEY: run} if run else {})


JOBS = [
    job("01000000", "SUCCEEDED", None),  # another user's finished job: no dpo-ray mark
    job("02000000", "SUCCEEDED", "/runs/other"),  # a finished dpo-ray run in another directory
    job("03000000", "SUCCEEDED", "/runs/mine"),  # the interrupted run this one resumes
    job("04000000", "RUNNING", "/runs/mine"),  # this job
]
GROUPS = [group("a", "01000000"), group("b", "02000000"), group("c", "03000000"), group("d", "04000000")]


def test_only_finished_jobs_with_this_jobs_mark_have_leaked_groups():
    from dpo_ray.ray_compat import find_leaked_placement_groups, select_jobs_of_run

    ours = select_jobs_of_run(JOBS, "04000000")
    assert [j.job_id for j in ours] == ["03000000", "04000000"]
    assert find_leaked_placement_groups(GROUPS, ours) == ["c"]
    unmarked = [*JOBS[:3], job("04000000", "RUNNING", None)]  # this job has no mark: nothing is ours
    assert select_jobs_of_run(unmarked, "04000000") == []


def test_a_finished_jobs_group_without_our_mark_is_not_released(monkeypatch):
    import ray

    import dpo_ray.ray_compat as compat

    removed = []
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: "04000000",
                                                                            gcs_address="127.0.0.1:1"))
    monkeypatch.setattr(compat, "list_job_records", lambda: JOBS)
    monkeypatch.setattr(compat, "list_placement_groups", lambda **kwargs: GROUPS)
    monkeypatch.setattr(compat, "remove_placement_group_by_id", removed.append)
    assert compat.release_leaked_placement_groups() == 1
    assert removed == ["c"]  # not "a" (no mark) nor "b" (another directory's run)

    monkeypatch.setattr(compat, "list_job_records", lambda: [job(j.job_id, j.status, None) for j in JOBS])
    assert compat.release_leaked_placement_groups() == 0  # no job carries a mark: nothing is touched
    assert removed == ["c"]


def test_no_state_api_query_while_no_job_of_this_run_has_finished(monkeypatch):
    """A fresh local instance (maybe without a dashboard to answer State API queries) holds only this job."""
    import ray

    import dpo_ray.ray_compat as compat

    def no_query(**kwargs):
        raise AssertionError("the State API was queried")

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: "04000000",
                                                                            gcs_address="127.0.0.1:1"))
    monkeypatch.setattr(compat, "list_job_records", lambda: [JOBS[0], JOBS[3]])  # another user's, and this one
    monkeypatch.setattr(compat, "list_placement_groups", no_query)
    assert compat.release_leaked_placement_groups() == 0


# ------------------------------------------------------------------------------------ a lean local instance


class CapturedInit(Exception):
    """Raised where the command would start training: init_ray has run by then."""


@pytest.fixture
def fake_ray_init(tmp_path, monkeypatch):
    """``ray.init``'s keyword arguments, captured instead of starting Ray; no ``ray start`` record, no RAY_ADDRESS."""
    import ray

    calls: list[dict] = []
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no record of a `ray start` head
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


def run_command_until_training(monkeypatch, command: str, argv: list[str]) -> None:
    """Run ``dpo-ray <command>`` up to the library call that would train (init_ray has run by then)."""
    import dpo_ray.cli as cli

    def stop(*args, **kwargs):
        raise CapturedInit

    monkeypatch.setattr(cli, {"train": "run_dpo", "sft": "run_sft", "sweep": "run_sweep"}[command], stop)
    with pytest.raises(CapturedInit):
        cli.COMMANDS[command](argv)


def test_a_local_train_run_starts_ray_without_the_dashboard_by_default(fake_ray_init, monkeypatch, tmp_path):
    run_command_until_training(monkeypatch, "train", [f"--set=output_dir={tmp_path / 'out'}"])
    [kwargs] = fake_ray_init
    assert kwargs["include_dashboard"] is False
    env = kwargs["runtime_env"]["env_vars"]
    # Ray's State API clients are pointed at a port of this process that refuses connections, never at another
    # instance's dashboard; Ray Train's state actor does not poll it; its cleaner's warnings are quieted
    assert env["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
    assert env["RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION"] == "0"
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # one local node is never preempted
    assert kwargs["runtime_env"]["worker_process_setup_hook"] == "dpo_ray.worker_setup.quiet_state_api_warnings"
    assert kwargs["job_config"].metadata == {RUN_METADATA_KEY: str(tmp_path / "out")}
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the driver's own environment is left alone
    assert kwargs["_system_config"] == {"num_workers_soft_limit": 0}  # no idle worker outlives the data stage


def test_the_refusing_port_refuses_connections():
    from dpo_ray.cluster import reserve_unserved_address

    port = int(reserve_unserved_address().rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_local_sweep_keeps_the_dashboard_and_refuses_to_run_without_it(fake_ray_init, monkeypatch, tmp_path, capsys):
    run_command_until_training(monkeypatch, "sweep", [f"--set=output_dir={tmp_path}"])
    [kwargs] = fake_ray_init
    assert kwargs["include_dashboard"] is True
    assert "RAY_API_SERVER_ADDRESS" not in kwargs["runtime_env"]["env_vars"]
    assert "worker_process_setup_hook" not in kwargs["runtime_env"]
    assert kwargs["_system_config"] == {}  # trials reuse Ray's idle workers: its default

    import dpo_ray.cli as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main_sweep([f"--set=output_dir={tmp_path}", "--set=ray.include_dashboard=false"])
    assert exit_info.value.code == 2
    assert "'ray.include_dashboard'" in capsys.readouterr().err
    assert len(fake_ray_init) == 1  # refused before Ray starts


def test_a_sweep_whose_trials_train_in_their_own_process_starts_no_dashboard(fake_ray_init, monkeypatch, tmp_path):
    run_command_until_training(monkeypatch, "sweep", [f"--set=output_dir={tmp_path}", "--set=scaling.num_workers=1"])
    [kwargs] = fake_ray_init
    assert kwargs["include_dashboard"] is False  # no Ray Train worker group, so no placement group to free
    assert "RAY_API_SERVER_ADDRESS" in kwargs["runtime_env"]["env_vars"]


def test_the_key_can_ask_for_the_dashboard_on_a_local_train_run(fake_ray_init, monkeypatch, tmp_path):
    run_command_until_training(monkeypatch, "sft", [f"--set=output_dir={tmp_path}", "--set=ray.include_dashboard=true",
                                                    "--set=ray.idle_workers=3"])
    [kwargs] = fake_ray_init
    assert kwargs["include_dashboard"] is True
    assert kwargs["_system_config"] == {"num_workers_soft_limit": 3}
    assert kwargs["runtime_env"]["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_joining_a_cluster_leaves_it_as_it_was_started(fake_ray_init, monkeypatch, tmp_path):
    import dpo_ray.cluster as cluster

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setattr(cluster, "enable_token_auth_when_available", lambda: None)
    run_command_until_training(monkeypatch, "train", [f"--set=output_dir={tmp_path}"])
    [kwargs] = fake_ray_init
    assert kwargs["address"] == "ray://head:10001"
    assert "include_dashboard" not in kwargs and "_system_config" not in kwargs
    assert set(kwargs["runtime_env"]["env_vars"]) == {"RAY_DATA_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM"}


def test_a_negative_idle_worker_count_is_refused_naming_the_key():
    from dpo_ray.cluster import resolve_idle_workers
    from dpo_ray.config import ConfigError

    assert resolve_idle_workers("auto", runs_stages=True) is None and resolve_idle_workers("auto", False) == 0
    with pytest.raises(ConfigError, match="'ray.idle_workers'"):
        resolve_idle_workers(-1, runs_stages=False)


def test_training_in_the_driver_waits_for_exiting_idle_workers():
    """A process titled as an idle Ray worker (as Ray titles them) is waited for until it exits; nothing is waited
    for on an instance this process did not start with ``ray.idle_workers`` 0. In a fresh process: this one's
    descendants include the test session's Ray instance and its idle workers."""
    import subprocess
    import sys

    code = """
import json, subprocess, sys
import dpo_ray.cluster as cluster
child = subprocess.Popen([sys.executable, "-c", "import sys, time, ray._raylet; ray._raylet.setproctitle('ray::IDLE'); "
                          "print('titled', flush=True); time.sleep(2.0)"], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "titled"
not_ours = cluster.wait_for_idle_workers_to_exit()
cluster._started_without_idle_workers = True
waited = cluster.wait_for_idle_workers_to_exit(timeout_s=20)
exited = child.poll() is not None
print(json.dumps([not_ours, waited, exited, cluster.wait_for_idle_workers_to_exit(timeout_s=20)]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    not_ours, waited, exited, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert not_ours == 0.0  # not our lean local instance: no wait
    assert 0.5 < waited < 15 and exited  # waited for the titled process to exit
    assert after < 0.1  # none left: no wait
