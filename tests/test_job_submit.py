"""`ray job submit` for real: a head from `ray start --head`, a submitted train job, the head stopped after.

The head runs with ``--block`` in its own process group, so stopping it ends only its processes (a plain
``ray stop`` would also end the test session's shared Ray instance). Ray 2.60 turns token
authentication on for the head and writes the token to ``~/.ray/auth_token``, where ``ray job submit``
finds it; the test checks that a client without the token is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(tmp_path: Path, dashboard_port: int) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # as if started from the activated virtualenv: the job's `python` is the one with dpo-ray installed
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         # every fixed default port gets a free one, so the test's shared Ray instance never collides
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
         f"--object-manager-port={free_port()}",
         f"--temp-dir={tempfile.mkdtemp(prefix='rj-', dir='/tmp')}",  # socket paths must stay < 108 bytes
         "--disable-usage-stats"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def stop_head(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def client_env() -> dict[str, str]:
    """The test's environment for Ray clients: token mode on (they then send ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    return env


def wait_for_job_server(address: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True,
                               env=client_env())
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"job server at {address} did not come up: {probe.stderr[-2000:]}")


@pytest.mark.slow
def test_ray_job_submit_runs_train_and_writes_the_summary(tmp_path, tiny_model_dir, short_hh_rows):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in short_hh_rows[:64]))
    out = tmp_path / "job-out"
    model_copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_copy)
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    head = start_head(tmp_path, port)
    try:
        wait_for_job_server(address)
        env = client_env()
        cmd = [
            RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "workflows/train.py",
             "--set", f"model.name_or_path={model_copy}", "--set", f"data.train={data}",
             "--set", f"output_dir={out}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
             "--set", "scaling.num_workers=1", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
             "--set", "data.eval_fraction=0.25", "--set", "data.max_length=256",
        ]
        for _ in range(10):  # the job agent comes up a little after the dashboard answers
            submit = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(3)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", log)
        assert job_id, log[-4000:]
        probe = ("from ray.job_submission import JobSubmissionClient; "
                 f"print(JobSubmissionClient('{address}').get_job_status('{job_id.group(1)}'))")
        status = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
        assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2
        assert Path(summary["final_model_dir"], "config.json").exists()

        # Token authentication is on: a client that presents a wrong token is refused.
        refused = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True,
                                 env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, timeout=60)
        assert refused.returncode != 0
    finally:
        stop_head(head)
    assert head.poll() is not None
