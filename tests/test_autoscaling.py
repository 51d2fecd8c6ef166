"""A sweep on a one-machine autoscaling cluster: trials that need more than the head has get worker nodes.

The cluster runs in a subprocess (``tests/autoscaling_sweep.py``) with its own head and fake worker
nodes, so this session's shared Ray instance is not touched; the subprocess stops only the processes it
started, whatever happens.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "tests" / "autoscaling_sweep.py"
TIMEOUT_S = 420  # a cold run takes about 3 minutes on 2 shared cores


def write_pairs(rows: list[dict], path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:count]))
    return path


def run_helper(args: list[str], log_path: Path) -> str:
    """Run the helper; on timeout SIGTERM it (it then stops its cluster) before giving up."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(HELPER), *args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"autoscaling sweep did not finish in {TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
    output = log_path.read_text()
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_sweep_needing_more_than_the_head_adds_worker_nodes_and_finishes(tiny_model_dir, hh_rows, tmp_path):
    out = tmp_path / "sweep"
    data = write_pairs(hh_rows, tmp_path / "pairs.jsonl", 160)
    output = run_helper([str(out), tiny_model_dir, str(data)], tmp_path / "autoscaling.log")

    result = json.loads(next(line for line in output.splitlines() if line.startswith("AUTOSCALING_RESULT "))
                        .removeprefix("AUTOSCALING_RESULT "))
    assert result["nodes_at_start"] == 1  # only the 1-CPU head; each trial's worker wants 2 CPUs
    assert result["max_alive_nodes"] > 1 and result["alive_nodes_after"] > 1
    assert result["statuses"] == {"TERMINATED": 1} and not result["interrupted"]
    assert "stopped" in output and "processes of the test cluster" in output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and all(r["status"] == "TERMINATED" and r["final_model_dir"] for r in rows)
    assert result["best_trial"] in {r["trial_id"] for r in rows}
    assert (out / "best_model" / "config.json").exists()
