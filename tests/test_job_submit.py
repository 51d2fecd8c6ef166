"""`ray job submit` for real: a head from `ray start --head`, a submitted train job, the head stopped after.

The head runs with ``--block`` in its own process group, so stopping it ends only its processes (a plain
``ray stop`` would also end the test session's shared Ray instance). Ray 2.60 turns token
authentication on for the head and writes the token to ``~/.ray/auth_token``, where ``ray job submit``
finds it; the test checks that a client without the token is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
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
    return subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         f"--temp-dir={tmp_path / 'ray'}", "--disable-usage-stats"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def stop_head(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def wait_for_job_server(address: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True)
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
        env["RAY_AUTH_MODE"] = "token"  # clients send the token from ~/.ray/auth_token only in token mode
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "workflows/train.py",
             "--set", f"model.name_or_path={model_copy}", "--set", f"data.train={data}",
             "--set", f"output_dir={out}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
             "--set", "scaling.num_workers=1", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
             "--set", "data.eval_fraction=0.25", "--set", "data.max_length=256"],
            capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path,
        )
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "SUCCEEDED" in log, log[-4000:]
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
