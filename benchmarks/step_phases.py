#!/usr/bin/env python
"""Where a DPO step's memory peaks, phase by phase, with and without each of the head and optimizer savings.

    .venv/bin/python benchmarks/step_phases.py                    # vocab 151,936 (Qwen2.5's tied head), 4 variants
    .venv/bin/python benchmarks/step_phases.py --vocab 8192 --steps 12

The model is ``benchmarks/compare_trl.py``'s (the Llama-shaped body; any vocabulary but 8,192 gets a Qwen2-style tied
head of that many rows) on its HH pairs, built once in ``--work-dir``. Each variant trains ``--steps`` steps of 8
pairs in a fresh subprocess, one after the other, as the training loop runs them (length buckets, seed 42, the
CPU's 512-token budget per forward, grad-norm clip 1.0), no Ray. A sampling thread reads the process's RSS every
0.5 ms and keeps the peak of each phase: ``fwd`` (forward passes), ``bwd1`` (the step's first backward, the weights
hold no ``.grad`` yet), ``bwdn`` (later backwards, which accumulate into ``.grad``), ``step`` (the optimizer) and
``between`` (after the step: weights, gradients and optimizer state at rest). The variants:

* ``all``: the library defaults (the linear head, sparse tied-embedding gradients, fused AdamW);
* ``for-loop AdamW``: ``train.fused_optimizer=false``;
* ``module head``: the head called as a module under ``torch.utils.checkpoint`` (what FSDP uses), so autograd makes
  one [V, H] weight gradient per chunk, and the tied embedding's gradient is dense;
* ``module head + for-loop AdamW``: both, i.e. the code before these savings.

RSS includes what glibc keeps of freed memory: the ``between`` row shows it (a few hundred MB after the first steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PHASES = ("fwd", "bwd1", "bwdn", "step", "between")
VARIANTS = {  # name -> (linear head, fused AdamW)
    "all": (True, True),
    "for-loop AdamW": (True, False),
    "module head": (False, True),
    "module head + for-loop AdamW": (False, False),
}


def measure(model_path: str, train_file: str, variant: str, steps: int, threads: int) -> dict:
    """One variant's steps in this process: the peak RSS of each phase, seconds per step."""
    import torch
    from step_memory import read_rss_mb, tokenize_pairs

    from dpo_ray.config import build_config
    from dpo_ray.dpo import DPOObjective
    from dpo_ray.epochs import plan_epoch, plan_micro_batches
    from dpo_ray.modeling import PairLogProbs, build_policy, load_tokenizer
    from dpo_ray.optim import build_optimizer

    linear_head, fused = VARIANTS[variant]
    phase, peaks = ["load"], {}

    def sample() -> None:
        while True:
            rss, name = read_rss_mb(), phase[0]
            peaks[name] = max(peaks.get(name, 0.0), rss)
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    torch.set_num_threads(threads)
    cfg = build_config(None, [f"model.name_or_path={model_path}", "dpo.beta=0.1", "train.learning_rate=0.001",
                              "train.batch_size=8", f"train.fused_optimizer={str(fused).lower()}"])
    tokenizer = load_tokenizer(model_path)
    rows = tokenize_pairs(tokenizer, train_file)
    device = torch.device("cpu")
    lm = build_policy(cfg, model_path, device, None)
    objective = DPOObjective(cfg, lm, tokenizer.pad_token_id, device)
    if not linear_head:
        objective.scorer = PairLogProbs(lm, cfg.train.prefix_sharing, cfg.train.logits_chunk_size,
                                        cfg.train.response_only_logits, fused_linear_head=False)
    objective.attach(objective.scorer, model_path)
    params = [p for p in objective.scorer.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    plan = plan_epoch(rows, cfg.train.batch_size, cfg.train.seed, 0, bucketing=True)[:steps]
    start = time.perf_counter()
    for step in plan:
        step_rows = [rows[i] for i in step]
        optimizer.zero_grad(set_to_none=True)
        for m, micro in enumerate(plan_micro_batches([r.num_tokens for r in step_rows], 8, 512)):
            phase[0] = "fwd"
            weighted, _, _ = objective.compute_micro([step_rows[i] for i in micro], step_rows)
            phase[0] = "bwd1" if m == 0 else "bwdn"
            weighted.backward()
        phase[0] = "step"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        phase[0] = "between"
    seconds = time.perf_counter() - start
    time.sleep(0.01)
    return {"variant": variant, "peaks": {k: peaks.get(k, 0.0) for k in PHASES}, "s_per_step": seconds / len(plan),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936, help="output-head rows (8192: the Llama-shaped model)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads (a 2-CPU worker's)")
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench_trl"), help="compare_trl.py's inputs")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        model_path, train_file, variant = args.child.split("|")
        print(json.dumps(measure(model_path, train_file, variant, args.steps, args.threads)))
        return
    from compare_trl import build_cpu_cases, build_pairs, read_hh_rows

    work = Path(args.work_dir)
    hh = read_hh_rows()
    label, model_path = build_cpu_cases(work, [args.vocab], hh, seed=42)[0]
    pairs = build_pairs(work / label, model_path, hh, 128, 16, 512)
    print(f"model {model_path}; {args.steps} steps of 8 of its {pairs.train_pairs} pairs, {args.threads} torch "
          "threads, one subprocess per variant; peak RSS (MB) of each phase")
    print(f"{'variant':<28}" + "".join(f"{name:>9}" for name in PHASES) + f"{'peak':>9}{'s/step':>8}")
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                              "--child", f"{model_path}|{pairs.train_file}|{variant}"],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:<28}" + "".join(f"{r['peaks'][name]:>9.0f}" for name in PHASES)
              + f"{r['peak_mb']:>9.0f}{r['s_per_step']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
