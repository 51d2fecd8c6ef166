#!/usr/bin/env python
"""Iterative DPO+NLL against Preferred-FT and one-round DPO at the same budget, over seeds, with the wall time.

    .venv/bin/python benchmarks/iterate_seeds.py                      # 3 seeds, configs/iterate.yaml, 3 rounds
    .venv/bin/python benchmarks/iterate_seeds.py --seeds 3 -- --iterate steps_per_round=200

Runs ``workflows/iterate.py --seeds N`` (one process; the seeds run as parallel Ray tasks where the cores allow, one
after the other on 2 cores), then prints each method's final greedy task accuracy per seed, their mean and
spread, and the targets of issue 17: after the last round iterative DPO+NLL beats Preferred-FT by at least 5
points in the mean and in every seed, and beats one-round DPO; the whole comparison within 30 minutes.
Arguments after ``--`` go to ``workflows/iterate.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("sft", "iterative_dpo", "preferred_ft", "one_round_dpo", "one_round_dpo_no_nll")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "bench_iterate"))
    parser.add_argument("--margin", type=float, default=0.05, help="points iterative DPO must beat Preferred-FT by")
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("rest", nargs="*", help="arguments for workflows/iterate.py (after --)")
    args = parser.parse_args()

    command = [sys.executable, str(REPO / "workflows" / "iterate.py"), "--seeds", str(args.seeds),
               "--set", f"output_dir={args.output_dir}", *args.rest]
    print("[bench] " + " ".join(command), flush=True)
    start = time.perf_counter()
    log = Path(args.output_dir) / "iterate.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}).returncode
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"[bench] iterate.py exited {code}; log: {log}")
    report = json.loads((Path(args.output_dir) / "seeds.json").read_text())
    per_seed = report["per_seed"]
    load = os.getloadavg()[0]
    print(f"\n[bench] {args.seeds} seeds ({report['seeds']}) in {wall / 60:.1f} min wall on {os.cpu_count()} CPUs "
          f"(1-min load at the end {load:.2f}); log: {log}\n")
    print(f"{'greedy task accuracy':24s} " + " ".join(f"seed {s:<4d}" for s in report["seeds"]) + "    mean  ± std")
    for method in METHODS:
        key = f"task_accuracy_{method}"
        if key not in report["metrics"]:
            continue
        stats = report["metrics"][key]
        print(f"{method:24s} " + " ".join(f"{v:9.3f}" for v in stats["values"])
              + f"  {stats['mean']:6.3f} {stats['std']:6.3f}")
    for method in METHODS[1:]:
        key = f"kl_sft_{method}"
        if key in report["metrics"]:
            print(f"KL(.||SFT) {method:24s} mean {report['metrics'][key]['mean']:.3f}")

    gaps = [s["task_accuracy_iterative_dpo"] - s["task_accuracy_preferred_ft"] for s in per_seed]
    one_round = [s["task_accuracy_iterative_dpo"] - s["task_accuracy_one_round_dpo"] for s in per_seed
                 if s.get("task_accuracy_one_round_dpo") is not None]
    mean_gap = sum(gaps) / len(gaps)
    print("\ntargets:")
    print(f"  iterative DPO+NLL - Preferred-FT >= {args.margin:.2f} in the mean ({mean_gap:+.3f}) and in each seed "
          f"({', '.join(f'{g:+.3f}' for g in gaps)}): "
          f"{'MET' if mean_gap >= args.margin and min(gaps) >= args.margin else 'MISSED'}")
    if one_round:
        print(f"  iterative DPO+NLL > one-round DPO+NLL in the mean ({sum(one_round) / len(one_round):+.3f}; per seed "
              f"{', '.join(f'{g:+.3f}' for g in one_round)}): {'MET' if sum(one_round) > 0 else 'MISSED'}")
    print(f"  whole comparison <= {args.budget_minutes:.0f} min: {wall / 60:.1f} min: "
          f"{'MET' if wall <= args.budget_minutes * 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
