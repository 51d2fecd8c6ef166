#!/usr/bin/env python
"""Peak memory of the log-prob head step: the old chunked loop against the fused head, per vocabulary size.

    .venv/bin/python benchmarks/head_memory.py                         # 8192 tokens, hidden 1024, chunk 1024
    .venv/bin/python benchmarks/head_memory.py --transform softcap     # with Gemma 2's final soft-capping
    .venv/bin/python benchmarks/head_memory.py --real --tokens 2048 --vocabs 4096,32768   # real tensors, RSS

One step is what a DPO step does at the head: ``N`` hidden states (requiring grad) -> the token log-probs of
their targets through ``lm_head`` (plus the family's logit transform) -> a weighted sum (per-token weights,
as DPO's per-pair sigmoid makes them) -> backward, which fills the head weight's and the hidden states'
gradients. Both sides compute the same numbers (tests/test_fused_head.py); they differ in what stays alive:

* old: ``dpo_ray.losses`` before the fused head: every chunk's fp32 ``[chunk, V]`` logits (and the
  transform's intermediates) stay saved for the backward, so the peak grows with tokens x vocabulary;
* fused: :func:`dpo_ray.losses.compute_token_logps_chunked`: each chunk under non-reentrant
  ``torch.utils.checkpoint``, so one chunk's logits exist at a time, in the forward and the backward.

Two ways of measuring, both printed as the peak *beyond* what exists before the step (the head weight, the
hidden states, the targets):

* default: torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``) counts the bytes of every live
  tensor storage, on fake tensors (``FakeTensorMode``): no arithmetic runs, so any size takes a second.
  The head weight's gradient (``V x H``, the same on both sides) is inside the peak; its size is printed.
* ``--real``: real tensors, each (side, vocabulary) in a fresh subprocess, peak RSS (``ru_maxrss``) minus the
  RSS before the step: what the allocator really held, on CPU (``--device cuda``: ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dpo_ray.families import LogitTransform  # noqa: E402
from dpo_ray.losses import compute_token_logps_chunked  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from test_fused_head import old_token_logps  # noqa: E402  (the pre-fused loop, kept once, beside its test)

MIB = 2**20
TRANSFORMS = {"none": LogitTransform(), "softcap": LogitTransform((("softcap", 30.0),))}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


SIDES = {"old": old_token_logps, "fused": compute_token_logps_chunked}


def build_step_inputs(args, vocab: int, device: str):
    """(head callable, head weight [V, H], hidden [N, H] requiring grad, targets [N], weights [N]).

    The head is ``F.linear`` on the weight, not an ``nn.Linear``: MemTracker refuses a module called more than
    once per step, and the fused head calls it once per chunk (twice with the recompute); same tensors either way.
    """
    dtype = DTYPES[args.dtype]
    weight = (torch.randn(vocab, args.hidden, dtype=dtype, device=device) * args.hidden**-0.5).requires_grad_()
    transform = TRANSFORMS[args.transform]
    hidden = torch.randn(args.tokens, args.hidden, dtype=dtype, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (args.tokens,), device=device)
    weights = torch.randn(args.tokens, device=device)
    return (lambda h: transform(F.linear(h, weight))), weight, hidden, targets, weights


def run_step(side: str, head, hidden, targets, weights, chunk: int) -> None:
    (SIDES[side](hidden, targets, head, chunk) * weights).sum().backward()


def measure_tracked(args, side: str, vocab: int) -> int:
    """Peak bytes beyond the step's inputs, from MemTracker on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        head, weight, hidden, targets, weights = build_step_inputs(args, vocab, "cpu")
        tracker = MemTracker()
        tracker.track_external(weight, hidden, targets, weights)
        with tracker:
            before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
            run_step(side, head, hidden, targets, weights, args.chunk)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - before


def measure_real_here(args, side: str, vocab: int) -> int:
    """Peak bytes beyond the step's inputs, really allocated (run in a fresh process: RSS peaks only grow)."""
    torch.manual_seed(0)
    head, _, hidden, targets, weights = build_step_inputs(args, vocab, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_step(side, head, hidden, targets, weights, args.chunk)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # a tiny step first: the first torch.utils.checkpoint call imports torch._dynamo (about 70 MiB, once per process)
    run_step(side, head, hidden[:2].detach().requires_grad_(), targets[:2], weights[:2], args.chunk)
    before = read_rss_bytes()
    run_step(side, head, hidden, targets, weights, args.chunk)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def read_rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_real(args, side: str, vocab: int) -> int:
    """Run :func:`measure_real_here` in a subprocess with the same arguments."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{side}:{vocab}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="response tokens in the step (N)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (H)")
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk (train.logits_chunk_size)")
    p.add_argument("--vocabs", default="4096,32768,152064", help="comma-separated vocabulary sizes")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="head weight and hidden dtype")
    p.add_argument("--transform", choices=list(TRANSFORMS), default="none", help="logit transform after the head")
    p.add_argument("--real", action="store_true", help="real tensors, peak RSS per subprocess (slow at large sizes)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="with --real: where the step runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not (args.real and torch.cuda.is_available()):
        p.error("--device cuda needs --real and a CUDA device")
    return args


def print_table(args, vocabs: list[int]) -> None:
    how = "real tensors, peak RSS" if args.real else "MemTracker on fake tensors"
    if args.real and args.device == "cuda":
        how = "real tensors, CUDA max_memory_allocated"
    itemsize = DTYPES[args.dtype].itemsize
    print(f"tokens {args.tokens}, hidden {args.hidden}, chunk {args.chunk}, {args.dtype}, transform {args.transform}; "
          f"peak MiB beyond the inputs ({how})")
    print(f"{'vocab':>7} {'old':>10} {'fused':>10} {'old/fused':>9} {'chunk logits':>12} {'weight grad':>11}")
    measure = measure_real if args.real else measure_tracked
    for vocab in vocabs:
        old, fused = (measure(args, side, vocab) for side in ("old", "fused"))
        chunk_logits = min(args.chunk, args.tokens) * vocab * 4  # one fp32 [chunk, V]
        print(f"{vocab:>7} {old / MIB:>10.1f} {fused / MIB:>10.1f} {old / fused:>9.1f} "
              f"{chunk_logits / MIB:>12.1f} {vocab * args.hidden * itemsize / MIB:>11.1f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        side, vocab = args.child.split(":")
        print(json.dumps({"peak": measure_real_here(args, side, int(vocab))}))
        return
    print_table(args, [int(v) for v in args.vocabs.split(",")])


if __name__ == "__main__":
    main()
