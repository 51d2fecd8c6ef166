#!/usr/bin/env python
"""Peak memory and speed of DPO training steps per token budget (``train.micro_batch_tokens``), one process, no Ray.

    .venv/bin/python benchmarks/step_memory.py                        # budgets none, 1024, 512; 20 steps each
    .venv/bin/python benchmarks/step_memory.py --budgets 0,512 --steps 50

The CPU benchmark's model and pairs (``benchmarks/compare_trl.py``: the Llama-shaped 20.1M-parameter model, vocab
8,192, HH pairs of up to 512 tokens, built once in ``--work-dir``), 8 pairs per step drawn as the training loop draws
them (:func:`dpo_ray.epochs.plan_epoch`, length buckets, seed 42), AdamW. A step is the loop's own pieces:
:func:`dpo_ray.epochs.plan_micro_batches` cuts it, :meth:`dpo_ray.dpo.DPOObjective.compute_micro` scores each
forward, ``backward`` accumulates. Each budget runs in a fresh subprocess (RSS peaks only grow), one after the
other, and prints its peak RSS (``ru_maxrss``), the RSS before the first step (imports, model, rows) and the mean
seconds per step. The precomputed reference values are zeros: they change the loss, not the memory or the time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def read_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def tokenize_pairs(tokenizer, train_file: str) -> list:
    """PairRows of the benchmark's explicit pairs (responses end with EOS, as the data stage makes them)."""
    from dpo_ray.dpo import PairRow

    rows = []
    with open(train_file) as f:
        for i, line in enumerate(f):
            d = json.loads(line)
            ids = [tokenizer(d[k], add_special_tokens=False)["input_ids"] for k in ("prompt", "chosen", "rejected")]
            rows.append(PairRow(str(i), ids[0], ids[1] + [tokenizer.eos_token_id], ids[2] + [tokenizer.eos_token_id]))
    return rows


def measure(model_path: str, train_file: str, budget: int, steps: int, threads: int) -> dict:
    """One budget's steps in this process: peak RSS, RSS before training, seconds per step."""
    import torch

    from dpo_ray.config import build_config
    from dpo_ray.dpo import DPOObjective
    from dpo_ray.epochs import plan_epoch, plan_micro_batches
    from dpo_ray.modeling import build_policy, load_tokenizer

    torch.set_num_threads(threads)
    cfg = build_config(None, [f"model.name_or_path={model_path}", "dpo.beta=0.1", "train.learning_rate=0.001",
                              "train.batch_size=8"])
    tokenizer = load_tokenizer(model_path)
    rows = tokenize_pairs(tokenizer, train_file)
    device = torch.device("cpu")
    lm = build_policy(cfg, model_path, device, None)
    objective = DPOObjective(cfg, lm, tokenizer.pad_token_id, device)
    objective.attach(objective.scorer, model_path)
    optimizer = torch.optim.AdamW([p for p in objective.scorer.parameters() if p.requires_grad], lr=1e-3)
    plan = plan_epoch(rows, cfg.train.batch_size, cfg.train.seed, 0, bucketing=True)[:steps]
    before = read_rss_mb()
    start = time.perf_counter()
    forwards = 0
    for step in plan:
        step_rows = [rows[i] for i in step]
        optimizer.zero_grad(set_to_none=True)
        for micro in plan_micro_batches([r.num_tokens for r in step_rows], cfg.train.micro_batch_size, budget):
            weighted, _, _ = objective.compute_micro([step_rows[i] for i in micro], step_rows)
            weighted.backward()
            forwards += 1
        optimizer.step()
    seconds = time.perf_counter() - start
    return {"budget": budget, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "before_mb": before, "s_per_step": seconds / len(plan), "steps": len(plan), "forwards": forwards,
            "longest_pair": max(rows[i].num_tokens for step in plan for i in step)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="0,1024,512", help="train.micro_batch_tokens values (0: no budget)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch threads (a 2-CPU worker's)")
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench_trl"), help="compare_trl.py's inputs")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    if args.child:
        model_path, train_file, budget = args.child.rsplit("|", 2)
        print(json.dumps(measure(model_path, train_file, int(budget), args.steps, args.threads)))
        return
    from compare_trl import build_cpu_model, build_pairs, read_hh_rows

    hh = read_hh_rows()
    model_path = build_cpu_model(work, hh, seed=42)
    pairs = build_pairs(work / "llama", model_path, hh, 400, 16, 512)
    print(f"model {model_path}; {pairs.train_pairs} pairs from {pairs.train_file}; {args.steps} steps of 8 pairs, "
          f"{args.threads} torch threads, one subprocess per budget", flush=True)
    print(f"{'micro_batch_tokens':>18} {'forwards':>9} {'peak RSS':>10} {'RSS before':>11} {'s/step':>7}")
    for budget in (int(b) for b in args.budgets.split(",")):
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                              "--child", f"{model_path}|{pairs.train_file}|{budget}"],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{budget or 'none':>18} {r['forwards']:>9} {r['peak_mb']:>7.0f} MB {r['before_mb']:>8.0f} MB "
              f"{r['s_per_step']:>7.2f}   (longest pair {r['longest_pair']} tokens)", flush=True)


if __name__ == "__main__":
    main()
