#!/usr/bin/env python
"""dpo-ray against TRL 1.16's DPOTrainer: same model, pairs, batch, steps, optimizer and learning rate.

    .venv/bin/python benchmarks/compare_trl.py                 # CPU comparison (about 15 min on 2 cores)
    .venv/bin/python benchmarks/compare_trl.py --vocab 8192,151936 --sweep-trials 4   # + Qwen2.5's head, sweep cost
    .venv/bin/python benchmarks/compare_trl.py --pairs 32 --steps 2 --quiet-wait 0     # quick smoke run
    .venv/bin/python benchmarks/compare_trl.py --gpu           # Qwen2.5-0.5B/1.5B-shaped models, bf16, one GPU

Each side runs in its own subprocess, one after the other; this process only prepares the inputs and
watches the subprocess tree. What it prints, per side:

* whole job: seconds from the start of the subprocess to the end of its run (data prep, reference pass,
  training, final checkpoint and model export; for dpo-ray also Ray start-up), and pairs/s, tokens/s over it;
* training only: pairs/s over the framework's own training time (dpo-ray ``train_seconds``, TRL
  ``train_runtime``; TRL's includes its per-step reference forward, dpo-ray's reference pass is in data prep);
* peak memory: the largest sum, over the subprocess and all its descendants (for dpo-ray: the driver, Ray's
  GCS, raylet, agents (and the dashboard, where the run starts it), idle workers, Ray Data actors and the Ray
  Train workers), of their resident set sizes (RSS), sampled every 0.2 s; the same sum of PSS (shared pages split
  between the processes that map them, sampled every 2 s); and the peak RSS of the training process(es) alone;
* the per-step DPO losses: step 1 (computed before any update: ln 2 for both) and the mean over each
  quarter of the run;
* the issue's targets for the case (``--vocab`` 8,192 and 151,936: :data:`VOCAB_TARGETS`).

``--vocab N[,N...]`` runs one comparison per output-head size (8,192: the Llama-shaped model; any other N: the
same body under a tied Qwen2-style head of N rows). ``--sweep-trials K`` adds, on the first case, a K-trial
``workflows/sweep.py`` against a single run with a trial's settings (:func:`print_sweep_cost`).

The inputs are built once in the work dir: a random-init Llama-shaped model with a tokenizer trained on the
HH sample (``dpo_ray.tiny_model``; the head cases reuse that tokenizer), and the pairs as explicit
prompt/chosen/rejected JSONL. The pairs are the first N rows of ``data/hh_rlhf_harmless_1800.jsonl.gz`` whose
prompt + longer response fit ``--max-length`` and that both frameworks tokenize to the same token ids, so both
train on exactly the same tokens.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HH_DATA = REPO / "data" / "hh_rlhf_harmless_1800.jsonl.gz"
PYTHON = sys.executable
LN2 = math.log(2.0)

# ~22M parameters (embeddings included), Llama-shaped (GQA, SwiGLU, RMSNorm, RoPE, untied head).
CPU_MODEL = dict(architecture="llama", vocab_size=8192, hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2,
                 intermediate_size=1152, max_position_embeddings=1024)

# Shapes of Qwen2.5-0.5B and Qwen2.5-1.5B (their config.json), random init.
QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM

MFU_FORMULA = (
    "MFU = sum over trained sequences s of T_s * (6 * N + 12 * n_layers * hidden * T_s)  /  elapsed  /  peak bf16 "
    "FLOP/s. N = policy parameters that take part in matmuls (all parameters, minus the input embedding table when "
    "it is not tied to the output head); T_s = tokens of sequence s, where a pair counts as the two sequences "
    "[prompt|chosen] and [prompt|rejected] without padding (the same work basis for both frameworks, although dpo-ray "
    "runs the prompt once); 12*L*H*T per token is the attention score/value work (forward + backward, causal "
    "mask not halved). Policy only: the reference forward and gradient-checkpointing recomputation are not "
    "counted. Peak: H100 SXM / H200 989 TFLOP/s."
)


# ---------------------------------------------------------------------------------------------- machine state


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float, max_wait: float, label: str) -> dict:
    """Poll the 1-minute load average until it is below ``threshold`` (at most ``max_wait`` seconds)."""
    start = time.time()
    first = load1()
    while load1() >= threshold and time.time() - start < max_wait:
        print(f"[bench] waiting for a quiet machine before {label}: load {load1():.2f} >= {threshold}", flush=True)
        time.sleep(20)
    now = load1()
    waited = time.time() - start
    if now >= threshold:
        print(f"[bench] WARNING: load {now:.2f} still >= {threshold} after {waited:.0f} s; timings are not clean",
              flush=True)
    return {"load_before_wait": first, "load_at_start": now, "waited_s": round(waited, 1), "quiet": now < threshold}


# ---------------------------------------------------------------------------------------------- inputs


def read_hh_rows() -> list[dict]:
    with gzip.open(HH_DATA, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build_cpu_model(work: Path, rows: list[dict], seed: int) -> str:
    from dpo_ray.config import TinyModelSettings
    from dpo_ray.tiny_model import make_tiny_model

    settings = TinyModelSettings(**CPU_MODEL, tokenizer_texts=len(rows))
    texts = [r["chosen"] + r["rejected"] for r in rows]
    return make_tiny_model(work / "model", texts, settings, seed=seed)


def build_head_model(work: Path, vocab: int, rows: list[dict], seed: int) -> str:
    """A random-init Qwen2 with a ``vocab``-row tied head on :data:`CPU_MODEL`'s body (fp32 files).

    The tokenizer is the one the 8,192 case trains (same texts, same size), so both cases train on the same token
    ids and differ only in the head; rows past the tokenizer's ids are never a label, as Qwen2.5's padding rows
    (151,665 tokens, 151,936 rows), but every softmax runs over all of them.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dpo_ray.tiny_model import train_tokenizer

    out = work / f"model-qwen2-head-{vocab}"
    if (out / "config.json").exists():
        return str(out)
    tokenizer = train_tokenizer([r["chosen"] + r["rejected"] for r in rows], CPU_MODEL["vocab_size"])
    if vocab < len(tokenizer):
        raise SystemExit(f"error: --vocab {vocab} is below the tokenizer's {len(tokenizer)} tokens")
    config = Qwen2Config(hidden_size=CPU_MODEL["hidden_size"], num_hidden_layers=CPU_MODEL["num_layers"],
                         num_attention_heads=CPU_MODEL["num_heads"], num_key_value_heads=CPU_MODEL["num_kv_heads"],
                         intermediate_size=CPU_MODEL["intermediate_size"], vocab_size=vocab, tie_word_embeddings=True,
                         max_position_embeddings=CPU_MODEL["max_position_embeddings"], rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return save_model_dir(model, tokenizer, out)


def save_model_dir(model, tokenizer, out: Path) -> str:
    """Write model and tokenizer to ``out`` atomically (a temporary sibling, then a rename)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def build_cpu_cases(work: Path, vocabs: list[int], rows: list[dict], seed: int) -> list[tuple[str, str]]:
    """(label, model dir) per ``--vocab`` size: 8,192 is the Llama-shaped model of earlier results, any other size
    the same body under a Qwen2-style tied head of that many rows."""
    cases = []
    for vocab in vocabs:
        if vocab == CPU_MODEL["vocab_size"]:
            cases.append(("llama", build_cpu_model(work, rows, seed)))
        else:
            cases.append((f"qwen2-head-{vocab}", build_head_model(work, vocab, rows, seed)))
    return cases


def build_gpu_model(work: Path, name: str, rows: list[dict], seed: int) -> str:
    """A random-init Qwen2 model with the shape of ``name`` and a locally trained BPE tokenizer (bf16 files)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dpo_ray.tiny_model import train_tokenizer

    out = work / f"model-{name}"
    if (out / "config.json").exists():
        return str(out)
    tokenizer = train_tokenizer([r["chosen"] + r["rejected"] for r in rows], 32000)
    config = Qwen2Config(**QWEN_SHAPES[name], max_position_embeddings=32768, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return save_model_dir(model, tokenizer, out)


@dataclass
class PairSet:
    train_file: str
    eval_file: str
    train_pairs: int
    eval_pairs: int
    seq_tokens: int  # sum over train pairs of (P + C) + (P + R): both sequences, no padding
    shared_tokens: int  # sum of P + C + R: what a prefix-shared row holds
    seq_lengths: list[int] = field(default_factory=list)  # every [prompt|response] length, for FLOPs
    scanned: int = 0
    skipped: dict = field(default_factory=dict)
    max_seq: int = 0
    mean_prompt: float = 0.0
    mean_response: float = 0.0


def build_pairs(work: Path, model_path: str, rows: list[dict], n_train: int, n_eval: int, max_length: int) -> PairSet:
    """The first ``n_train`` (+ ``n_eval``) usable HH rows as explicit pairs, tokenized identically by both.

    The prompt text starts with the BOS token's text, so TRL (which tokenizes ``prompt + response`` as one string,
    with no special tokens added by this tokenizer) and dpo-ray (prompt and responses separately, BOS in front of
    the prompt unless already there, EOS after each response; TRL appends the EOS text) produce the same ids.
    Rows where the two would differ (tokens merging across the prompt/response boundary) or that exceed
    ``max_length`` are skipped, so no truncation happens on either side.
    """
    from transformers import AutoTokenizer

    from dpo_ray.data.formats import InvalidRow, normalize_implicit

    tok = AutoTokenizer.from_pretrained(model_path)
    bos, eos = tok.bos_token, tok.eos_token
    selected, skipped = [], {"invalid": 0, "too_long": 0, "token_boundary": 0}
    scanned = 0
    for row in rows:
        if len(selected) >= n_train + n_eval:
            break
        scanned += 1
        try:
            pair, _rule = normalize_implicit(row)  # (text pair, the rule that split it)
        except InvalidRow:
            skipped["invalid"] += 1
            continue
        prompt = bos + pair.prompt
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(pair.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        r = tok(pair.rejected, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) + max(len(c), len(r)) > max_length:
            skipped["too_long"] += 1
            continue
        pc = tok(prompt + pair.chosen + eos)["input_ids"]
        pr = tok(prompt + pair.rejected + eos)["input_ids"]
        if pc != p + c or pr != p + r or tok(prompt)["input_ids"] != p:
            skipped["token_boundary"] += 1
            continue
        selected.append(({"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected}, len(p), len(c), len(r)))
    if len(selected) < n_train + n_eval:
        raise SystemExit(f"only {len(selected)} usable pairs in {HH_DATA.name}; ask for fewer")
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = selected[:n_train], selected[n_train:]
    for name, part in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(data_dir / name, "w", encoding="utf-8") as f:
            for rec, *_ in part:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    lengths = [n for _, p, c, r in train for n in (p + c, p + r)]
    return PairSet(
        train_file=str(data_dir / "train.jsonl"), eval_file=str(data_dir / "eval.jsonl"),
        train_pairs=len(train), eval_pairs=len(held_out), seq_tokens=sum(lengths),
        shared_tokens=sum(p + c + r for _, p, c, r in train), seq_lengths=lengths, scanned=scanned, skipped=skipped,
        max_seq=max(lengths), mean_prompt=sum(p for _, p, _, _ in train) / len(train),
        mean_response=sum(c + r for _, _, c, r in train) / (2 * len(train)),
    )


# ---------------------------------------------------------------------------------------------- memory monitor


class TreeMonitor(threading.Thread):
    """Samples the memory of a process and all its descendants.

    Every ``interval`` s: RSS of every process in the tree (summed) and of the training processes (summed);
    every ``pss_every`` samples: PSS of every process (summed). The tree is re-listed every ``rescan_every``
    samples (listing walks all of /proc). With ``gpu``, the GPU memory of the tree's processes from nvidia-smi.
    """

    def __init__(self, root_pid: int, is_train, interval: float = 0.2, pss_every: int = 10, rescan_every: int = 5,
                 gpu: bool = False):
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.is_train = is_train
        self.interval, self.pss_every, self.rescan_every, self.gpu = interval, pss_every, rescan_every, gpu
        self.stop_event = threading.Event()
        self.procs: dict[int, psutil.Process] = {root_pid: self.root}
        self.peak_rss = self.peak_pss = self.peak_train_rss = self.peak_gpu = 0
        self.peak_one_train_rss = 0  # the largest single training process (each Ray Train worker on its own)
        self.peak_rss_at = self.peak_pss_at = 0.0
        self.peak_rss_breakdown: list[tuple[str, int]] = []
        self.per_process_peak: dict[int, tuple[str, int]] = {}
        self.samples = 0
        self.cpu_seconds = 0.0  # this sampling thread's own CPU time
        self.tree_cpu: dict[int, float] = {}  # last user+system seconds seen per process of the tree
        self.t0 = time.time()

    def _rescan(self) -> None:
        try:
            for child in self.root.children(recursive=True):
                self.procs.setdefault(child.pid, child)
        except psutil.Error:
            pass

    @staticmethod
    def _title(proc: psutil.Process) -> str:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            return "?"
        if not cmd:
            return proc.name() if proc.is_running() else "?"
        first = cmd[0]
        if first.startswith("ray::"):
            return first.split(" ")[0]
        text = " ".join(Path(c).name if i < 2 else c for i, c in enumerate(cmd[:3]))
        return text[:70]

    def _gpu_used(self, pids: set[int]) -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0
        total = 0
        for line in out.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
                total += int(float(parts[1])) * 2**20
        return total

    def run(self) -> None:
        cpu0 = time.thread_time()
        titles: dict[int, str] = {}
        while not self.stop_event.is_set():
            rescan = self.samples % self.rescan_every == 0
            if rescan:
                self._rescan()
            total = train = 0
            breakdown = []
            do_pss = self.samples % self.pss_every == 0
            pss_total = 0
            for pid, proc in list(self.procs.items()):
                try:
                    rss = proc.memory_info().rss
                    if rescan or pid not in titles:  # Ray renames a worker when it takes on a task or actor
                        titles[pid] = self._title(proc)
                    if rescan or pid == self.root.pid:
                        t = proc.cpu_times()
                        self.tree_cpu[pid] = t.user + t.system
                    if do_pss:
                        pss_total += proc.memory_full_info().pss
                except psutil.Error:
                    self.procs.pop(pid, None)
                    continue
                title = titles[pid]
                total += rss
                breakdown.append((f"{pid} {title}", rss))
                if self.is_train(proc, title, self.root.pid):
                    train += rss
                    self.peak_one_train_rss = max(self.peak_one_train_rss, rss)
                prev = self.per_process_peak.get(pid)
                if prev is None or rss > prev[1]:
                    self.per_process_peak[pid] = (title, rss)
            now = time.time() - self.t0
            if total > self.peak_rss:
                self.peak_rss, self.peak_rss_at, self.peak_rss_breakdown = total, now, breakdown
            if do_pss and pss_total > self.peak_pss:
                self.peak_pss, self.peak_pss_at = pss_total, now
            self.peak_train_rss = max(self.peak_train_rss, train)
            if self.gpu and self.samples % self.pss_every == 0:
                self.peak_gpu = max(self.peak_gpu, self._gpu_used(set(self.procs)))
            self.samples += 1
            self.stop_event.wait(self.interval)
        self.cpu_seconds = time.thread_time() - cpu0

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    @property
    def tree_cpu_seconds(self) -> float:
        return sum(self.tree_cpu.values())


# ---------------------------------------------------------------------------------------------- running a side


@dataclass
class RunOutput:
    name: str
    returncode: int
    start: float  # wall-clock time the subprocess was started
    exit_s: float  # seconds from start to exit
    log_file: str
    monitor: TreeMonitor
    load: dict
    load_after: float


def run_side(name: str, cmd: list[str], env: dict, log_file: Path, is_train, gpu: bool, timeout: float, load: dict,
             interval: float) -> RunOutput:
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    with open(log_file, "w") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        monitor = TreeMonitor(proc.pid, is_train, interval=interval, gpu=gpu)
        monitor.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)  # our own process group only
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            monitor.stop()
            raise
        exit_s = time.time() - start
        monitor.stop()
    if returncode != 0:
        tail = Path(log_file).read_text(errors="replace")[-4000:]
        raise SystemExit(f"[bench] {name} failed with exit code {returncode}; last output:\n{tail}")
    return RunOutput(name, returncode, start, exit_s, str(log_file), monitor, load, load1())


def save_monitor(out: RunOutput, run_dir: Path) -> None:
    m = out.monitor
    (run_dir / "memory.json").write_text(json.dumps({
        "peak_rss_mb": m.peak_rss / 2**20, "peak_rss_at_s": m.peak_rss_at, "peak_pss_mb": m.peak_pss / 2**20,
        "peak_pss_at_s": m.peak_pss_at, "peak_train_rss_mb": m.peak_train_rss / 2**20, "samples": m.samples,
        "monitor_cpu_s": m.cpu_seconds, "tree_cpu_s": m.tree_cpu_seconds, "exit_s": out.exit_s, "load": out.load,
        "load_after": out.load_after,
        "at_peak_mb": sorted(([n, v / 2**20] for n, v in m.peak_rss_breakdown), key=lambda x: -x[1]),
        "per_process_peak_mb": sorted(([f"{pid} {t}", v / 2**20] for pid, (t, v) in m.per_process_peak.items()),
                                      key=lambda x: -x[1]),
    }, indent=1))


def base_env(run_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(run_dir / "hf_datasets_cache"), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def dpo_ray_overrides(args, model_path: str, pairs: PairSet, run_dir: Path, gpu: bool,
                      cpus_per_worker: float | None = None) -> list[str]:
    sets = {
        "model.name_or_path": model_path,
        "data.train": pairs.train_file,
        "data.eval": pairs.eval_file,
        "data.format": "explicit",
        "data.max_length": args.max_length,
        "data.cache_dir": str(run_dir / "cache"),  # fresh: tokenization and the reference pass run in this job
        "dpo.beta": 0.1,
        "dpo.loss_type": "sigmoid",
        "dpo.reference": "precomputed",
        "train.batch_size": args.batch_size,
        "train.micro_batch_size": args.micro_batch_size,
        "train.max_steps": args.steps,
        "train.epochs": 1,
        "train.learning_rate": args.lr,
        "train.optimizer": "adamw",
        "train.fused_optimizer": True,  # as TRL's adamw_torch_fused (_trl_worker.py)
        "train.lr_schedule": "linear",
        "train.seed": args.seed,
        "train.log_every": 1,
        "scaling.num_workers": args.workers,
        "scaling.cpus_per_worker": args.cpus_per_worker if cpus_per_worker is None else cpus_per_worker,
        "scaling.use_gpu": gpu,
        "output_dir": str(run_dir / "out"),
        "run_name": "bench",
    }
    out = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()]
    return out + list(args.dpo_ray_set)


def is_training_process(proc, title: str, root_pid: int) -> bool:
    """A Ray Train worker, or a sweep trial's own process, which trains there with one worker (``ImplicitFunc``,
    Tune's actor for a function trainable)."""
    return "RayTrainWorker" in title or "ImplicitFunc" in title


def is_driver(proc, title: str, root_pid: int) -> bool:
    return proc.pid == root_pid  # scaling.num_workers=0: Ray Train runs the loop in the driver


def is_trl_process(proc, title: str, root_pid: int) -> bool:
    return proc.pid == root_pid  # TRL trains in the process we started


def new_run_dir(work: Path, label: str) -> Path:
    run_dir = work / "runs" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    return run_dir


def launch_dpo_ray(args, label: str, command: str, sets: list[str], run_dir: Path, gpu: bool) -> tuple:
    """``_dpo_ray_worker.py`` (train or sweep) in a fresh local Ray instance, watched by a :class:`TreeMonitor`.

    Returns (run output, the worker's result JSON, its phase marks in seconds since the subprocess started, cmd).
    """
    result_file = run_dir / "result.json"
    env = base_env(run_dir)
    env["RAY_ADDRESS"] = "local"  # a fresh local Ray instance: never join another job's cluster
    cmd = [PYTHON, str(REPO / "benchmarks" / "_dpo_ray_worker.py"), str(result_file), "--command", command]
    if args.dpo_ray_init:
        cmd += ["--ray-init", args.dpo_ray_init]
    cmd += ["--"] + [a for kv in sets for a in ("--set", kv)]
    load = (wait_for_quiet(args.quiet_load, args.quiet_wait, label) if args.quiet_wait > 0
            else {"load_at_start": load1()})
    out = run_side(label, cmd, env, run_dir / "output.log", is_driver if args.workers == 0 else is_training_process,
                   gpu, args.timeout, load, args.sample_interval)
    save_monitor(out, run_dir)
    result = json.loads(result_file.read_text())
    marks = {k: v - out.start for k, v in result["marks"].items()}
    return out, result, marks, cmd


def run_dpo_ray(args, model_path: str, pairs: PairSet, work: Path, gpu: bool, label: str = "dpo-ray",
                cpus_per_worker: float | None = None) -> dict:
    """One ``workflows/train.py`` run; its timings, memory and losses."""
    run_dir = new_run_dir(work, label)
    sets = dpo_ray_overrides(args, model_path, pairs, run_dir, gpu, cpus_per_worker)
    out, result, marks, cmd = launch_dpo_ray(args, label, "train", sets, run_dir, gpu)
    summary = result["summary"]
    losses = read_tensorboard_losses(run_dir / "out" / "tensorboard") or read_progress_losses(Path(out.log_file))
    return {"name": "dpo-ray", "run": out, "marks": marks, "job_s": marks["run_done"], "summary": summary,
            "train_s": float(summary["train_seconds"]), "losses": losses, "steps": summary["steps"],
            "worker_peak_mb": summary.get("peak_memory_mb"), "cmd": cmd}


def read_tensorboard_losses(tb_dir: Path) -> list[float]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    values: dict[int, float] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            for ev in acc.Scalars("train/loss"):
                values[ev.step] = ev.value
    return [values[k] for k in sorted(values)]


PROGRESS = re.compile(r"\[dpo-ray\] step (\d+)/\d+ \| loss ([0-9.]+)")


def read_progress_losses(log_file: Path) -> list[float]:
    values = {int(m.group(1)): float(m.group(2)) for m in PROGRESS.finditer(log_file.read_text(errors="replace"))}
    return [values[k] for k in sorted(values)]


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def run_trl(args, model_path: str, pairs: PairSet, work: Path, gpu: bool) -> dict:
    run_dir = work / "runs" / f"trl-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    spec = {
        "model_path": model_path, "train_file": pairs.train_file, "output_dir": str(run_dir / "out"),
        "batch_size": args.batch_size, "max_length": args.max_length, "max_steps": args.steps,
        "learning_rate": args.lr, "seed": args.seed, "beta": 0.1, "gpu": gpu,
        "result_file": str(run_dir / "result.json"),
        "extra": {k: yaml_value(v) for k, v in (kv.split("=", 1) for kv in args.trl_set)},
    }
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [PYTHON, str(REPO / "benchmarks" / "_trl_worker.py"), str(run_dir / "spec.json")]
    load = (wait_for_quiet(args.quiet_load, args.quiet_wait, "TRL") if args.quiet_wait > 0
            else {"load_at_start": load1()})
    out = run_side("TRL", cmd, base_env(run_dir), run_dir / "output.log", is_trl_process, gpu, args.timeout, load,
                   args.sample_interval)
    save_monitor(out, run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    marks = {k: v - out.start for k, v in result["marks"].items()}
    return {"name": "TRL", "run": out, "marks": marks, "job_s": marks["save_done"], "result": result,
            "train_s": float(result["train_metrics"]["train_runtime"]), "losses": result["losses"],
            "steps": result["global_step"], "worker_peak_mb": result["ru_maxrss_mb"], "cmd": cmd}


# ---------------------------------------------------------------------------------------------- sweep cost

SWEEP_TRIAL_CPUS = 0.25  # dpo-ray's sweep.trial_cpus default: each trial's own function holds this share


def count_ray_cpus() -> float:
    """The CPUs a local Ray instance would see here (cgroup-aware, as Ray counts them)."""
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except Exception:
        return float(os.cpu_count() or 1)


def sweep_cpus_per_worker(args) -> float:
    """CPUs per Ray Train worker of a trial (and of the single run it is compared with): ``--sweep-cpus-per-worker``,
    or what one trial can hold next to its own function's share."""
    if args.sweep_cpus_per_worker:
        return args.sweep_cpus_per_worker
    return (count_ray_cpus() - SWEEP_TRIAL_CPUS) / max(args.workers, 1)


def sweep_overrides(args, k: int) -> list[str]:
    """The sweep section for a cost measurement: K trials that differ only in beta (cost does not depend on it),
    every one trained to the end (no ASHA), ``--sweep-concurrent`` at once, the single run's learning rate."""
    return [f"sweep.num_samples={k}", f"sweep.max_concurrent_trials={args.sweep_concurrent}",
            f"sweep.workers_per_trial={args.workers}", "sweep.asha=false", "sweep.beta_min=0.05", "sweep.beta_max=0.5",
            f"sweep.lr_min={args.lr}", f"sweep.lr_max={args.lr}", f"sweep.trial_cpus={SWEEP_TRIAL_CPUS}"]


def run_dpo_ray_sweep(args, model_path: str, pairs: PairSet, work: Path, cpus_per_worker: float) -> dict:
    """One ``workflows/sweep.py`` run of ``--sweep-trials`` trials, each the single run's settings."""
    run_dir = new_run_dir(work, "dpo-ray-sweep")
    sets = dpo_ray_overrides(args, model_path, pairs, run_dir, False, cpus_per_worker) + sweep_overrides(
        args, args.sweep_trials)
    out, result, marks, cmd = launch_dpo_ray(args, "dpo-ray sweep", "sweep", sets, run_dir, False)
    return {"name": "dpo-ray sweep", "run": out, "marks": marks, "job_s": marks["run_done"],
            "summary": result["summary"], "cmd": cmd}


def span_s(marks: dict, start: str, end: str) -> float:
    return marks[end] - marks[start] if start in marks and end in marks else float("nan")


def compute_sweep_cost(k: int, single: dict, sweep: dict) -> dict:
    """The sweep's whole job against K copies of the single run (see :func:`print_sweep_cost`).

    ``single`` / ``sweep``: :func:`run_dpo_ray` / :func:`run_dpo_ray_sweep` results. The yardsticks:
    K separate runs (K x job); K runs that would share one reference pass (K x (job - ref) + ref); and the target,
    1.15 x K x (one run's training loop) + one reference pass.
    """
    job, ref = single["job_s"], span_s(single["marks"], "reference_start", "reference_done")
    train, fit = single["train_s"], span_s(single["marks"], "fit_start", "fit_done")
    sweep_job = sweep["job_s"]
    shared_ref = k * (job - ref) + ref
    bound = 1.15 * k * train + ref
    return {
        "k": k, "single_job_s": job, "single_ref_s": ref, "single_train_s": train, "single_fit_s": fit,
        "sweep_job_s": sweep_job, "sweep_ref_s": span_s(sweep["marks"], "reference_start", "reference_done"),
        "k_separate_s": k * job, "k_shared_ref_s": shared_ref, "target_bound_s": bound,
        "vs_separate": sweep_job / (k * job), "vs_shared_ref": sweep_job / shared_ref,
        "overhead_factor": (sweep_job - ref) / (k * train),  # the target: <= 1.15
        "target_met": sweep_job <= bound,
    }


def print_sweep_cost(args, cost: dict, single: dict, sweep: dict, cpus_per_worker: float, model_label: str) -> None:
    """The sweep-cost lines: what a K-trial sweep costs next to K single runs and next to the target."""
    k, summ = cost["k"], sweep["summary"]
    sm, wm = single["run"].monitor, sweep["run"].monitor
    statuses = ", ".join(f"{n} {c}" for n, c in (summ.get("statuses") or {}).items())
    print()
    print(f"=== sweep cost: {k} trials vs {k} single runs + one reference pass: {model_label} ===")
    in_trial = args.workers == 1 and "sweep.train_in_trial=false" not in args.dpo_ray_set
    where = ("trained in the trial's own process (sweep.train_in_trial)" if in_trial
             else f"a Ray Train worker group (+ {SWEEP_TRIAL_CPUS:g} CPU for the trial's own function)")
    print(f"each trial = the single run: {args.workers} worker(s) x {cpus_per_worker:g} CPU, {where}, {args.steps} "
          f"steps x batch {args.batch_size}; no ASHA, {args.sweep_concurrent} trial(s) at once; the single run "
          f"trains in a Ray Train worker")
    print(f"  single run, whole job           {cost['single_job_s']:8.1f} s  = reference pass "
          f"{cost['single_ref_s']:.1f} + training loop {cost['single_train_s']:.1f} "
          f"(trainer.fit {cost['single_fit_s']:.1f}) + the rest; "
          f"peak RSS tree {mb(sm.peak_rss)}, training proc. {mb(sm.peak_one_train_rss)}")
    print(f"  sweep, whole job                {cost['sweep_job_s']:8.1f} s  = its reference pass "
          f"{cost['sweep_ref_s']:.1f} ({summ.get('reference_passes')} pass(es)); trials' training loops "
          f"{summ.get('trial_train_seconds_sum')} s, trials incl. start-up {summ.get('trial_seconds_sum')} s (sums); "
          f"trials: {statuses}; peak RSS tree {mb(wm.peak_rss)}, training proc. {mb(wm.peak_one_train_rss)}")
    print(f"  {k} separate single runs         {cost['k_separate_s']:8.1f} s  = {k} x job; "
          f"sweep / that {cost['vs_separate']:.2f}x")
    print(f"  {k} runs sharing one ref. pass   {cost['k_shared_ref_s']:8.1f} s  = {k} x (job - ref) + ref; "
          f"sweep / that {cost['vs_shared_ref']:.2f}x")
    verdict = "MET" if cost["target_met"] else "MISSED"
    note = "" if k >= 4 else " (the target is for K >= 4)"
    print(f"  target: sweep <= 1.15 x {k} x training loop + ref = {cost['target_bound_s']:.1f} s: {verdict}; "
          f"(sweep - ref) / ({k} x training loop) = {cost['overhead_factor']:.2f} (<= 1.15){note}")


# ---------------------------------------------------------------------------------------------- report


def quarter_means(losses: list[float]) -> list[float]:
    n = len(losses)
    if n < 4:
        return [sum(losses) / n] * 4 if n else []
    bounds = [round(i * n / 4) for i in range(5)]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB"


def flops_per_job(pairs: PairSet, n_matmul_params: int, n_layers: int, hidden: int, steps: int, batch: int) -> float:
    """Model FLOPs of training the policy on the trained pairs (see MFU_FORMULA)."""
    per_epoch = sum(t * (6 * n_matmul_params + 12 * n_layers * hidden * t) for t in pairs.seq_lengths)
    return per_epoch * (steps * batch) / pairs.train_pairs


def model_facts(model_path: str) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    h, L, V, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h
    if getattr(cfg, "model_type", "") == "qwen2":
        per_layer += h + 2 * kv  # q, k, v biases
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    total = L * per_layer + h + V * h * (1 if tied else 2)
    matmul = total - (0 if tied else V * h)
    return {"params": total, "matmul_params": matmul, "layers": L, "hidden": h, "vocab": V,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "intermediate": inter, "tied": tied,
            "type": cfg.model_type}


def print_report(args, sides: list[dict], pairs: PairSet, facts: dict, gpu_peak: float | None,
                 model_label: str) -> dict:
    trained_pairs = args.steps * args.batch_size
    epoch_frac = trained_pairs / pairs.train_pairs
    tokens = pairs.seq_tokens * epoch_frac
    rows = {}
    for s in sides:
        m: TreeMonitor = s["run"].monitor
        r = {
            "job_s": s["job_s"],
            "exit_s": s["run"].exit_s,
            "train_s": s["train_s"],
            "job_pairs_s": trained_pairs / s["job_s"],
            "job_tokens_s": tokens / s["job_s"],
            "train_pairs_s": trained_pairs / s["train_s"],
            "peak_rss": m.peak_rss,
            "peak_pss": m.peak_pss,
            "peak_train_rss": m.peak_train_rss,
            "peak_one_train_rss": m.peak_one_train_rss,
            "self_reported_mb": s["worker_peak_mb"],
            "steps": s["steps"],
            "losses": s["losses"],
            "samples": m.samples,
            "monitor_cpu_s": m.cpu_seconds,
            "load": s["run"].load,
            "load_after": s["run"].load_after,
            "peak_gpu": m.peak_gpu,
            "cpu_s": m.tree_cpu_seconds,
        }
        if gpu_peak:
            flops = flops_per_job(pairs, facts["matmul_params"], facts["layers"], facts["hidden"], args.steps,
                                  args.batch_size)
            r["mfu_job"] = flops / s["job_s"] / (gpu_peak * 1e12)
            r["mfu_train"] = flops / s["train_s"] / (gpu_peak * 1e12)
        rows[s["name"]] = r

    d, t = rows["dpo-ray"], rows["TRL"]
    w = 26
    print()
    print(f"=== dpo-ray vs TRL {_trl_version()} DPOTrainer: {model_label} ===")
    print(f"pairs: {pairs.train_pairs} train (+{pairs.eval_pairs} eval for dpo-ray's end-of-run evaluation), "
          f"first usable rows of {HH_DATA.name}; max_length {args.max_length}; "
          f"longest sequence {pairs.max_seq} tokens; "
          f"mean prompt {pairs.mean_prompt:.0f}, mean response {pairs.mean_response:.0f} tokens")
    print(f"skipped while selecting ({pairs.scanned} rows scanned): {pairs.skipped}")
    print(f"steps {args.steps} x batch {args.batch_size} = {trained_pairs} pairs ({epoch_frac:g} epoch); fused AdamW, "
          f"lr {args.lr:g} linear decay, no warmup, grad-norm clip 1.0, sigmoid loss, beta 0.1, seed {args.seed}")
    print(f"tokens per epoch: {pairs.seq_tokens:,} = sum of (prompt+chosen) + (prompt+rejected), no padding "
          f"(used for tokens/s of both; a prefix-shared row holds {pairs.shared_tokens:,})")
    where = ("the loop in the driver (scaling.num_workers=0, Ray Train's local mode)" if args.workers == 0
             else f"{args.workers} Ray Train worker(s)")
    print(f"dpo-ray: {where} x {args.cpus_per_worker:g} CPU, micro_batch_size {args.micro_batch_size}, "
          f"micro_batch_tokens auto (512 on CPU), idle Ray workers 0, "
          f"precomputed reference, prefix sharing, length bucketing, response-only logits (library defaults)"
          + (f"; extra --set {list(args.dpo_ray_set)}" if args.dpo_ray_set else ""))
    gc = sides[1]["result"].get("gradient_checkpointing")
    print("TRL: DPOConfig defaults except batch/max_length/max_steps/lr/optim adamw_torch_fused/logging_steps 1/"
          f"report_to none/{'bf16' if gpu_peak else 'bf16 off'}/seed; reference = second model copy "
          f"({sides[1]['result'].get('ref_model')}), gradient_checkpointing={gc}"
          + (f"; extra {list(args.trl_set)}" if args.trl_set else ""))
    print()

    def line(label, fd, ft, ratio=None):
        rs = f"{ratio:8.2f}x" if ratio is not None else ""
        print(f"{label:<{w}} {fd:>18} {ft:>18} {rs:>10}")

    line("", "dpo-ray", "TRL", None)
    print(f"{'':<{w}} {'':>18} {'':>18} {'dpo-ray/TRL':>10}")
    line("whole job, s", f"{d['job_s']:.1f}", f"{t['job_s']:.1f}", d["job_s"] / t["job_s"])
    line("  process exit, s", f"{d['exit_s']:.1f}", f"{t['exit_s']:.1f}", d["exit_s"] / t["exit_s"])
    line("whole job, pairs/s", f"{d['job_pairs_s']:.2f}", f"{t['job_pairs_s']:.2f}",
         d["job_pairs_s"] / t["job_pairs_s"])
    line("whole job, tokens/s", f"{d['job_tokens_s']:,.0f}", f"{t['job_tokens_s']:,.0f}",
         d["job_tokens_s"] / t["job_tokens_s"])
    line("training only, s", f"{d['train_s']:.1f}", f"{t['train_s']:.1f}", d["train_s"] / t["train_s"])
    line("training only, pairs/s", f"{d['train_pairs_s']:.2f}", f"{t['train_pairs_s']:.2f}",
         d["train_pairs_s"] / t["train_pairs_s"])
    line("CPU time, process tree, s", f"{d['cpu_s']:.0f}", f"{t['cpu_s']:.0f}", d["cpu_s"] / t["cpu_s"])
    line("peak RSS, process tree", mb(d["peak_rss"]), mb(t["peak_rss"]), d["peak_rss"] / t["peak_rss"])
    line("peak PSS, process tree", mb(d["peak_pss"]), mb(t["peak_pss"]), d["peak_pss"] / t["peak_pss"])
    line("peak RSS, training proc.", mb(d["peak_train_rss"]), mb(t["peak_train_rss"]),
         d["peak_train_rss"] / t["peak_train_rss"])
    if args.workers > 1:
        line("  largest single worker", mb(d["peak_one_train_rss"]), mb(t["peak_one_train_rss"]),
             d["peak_one_train_rss"] / t["peak_one_train_rss"])
    line("  self-reported ru_maxrss", f"{d['self_reported_mb']:,.0f} MB", f"{t['self_reported_mb']:,.0f} MB", None)
    if gpu_peak:
        line("peak GPU memory (smi)", mb(d["peak_gpu"]), mb(t["peak_gpu"]),
             d["peak_gpu"] / t["peak_gpu"] if t["peak_gpu"] else None)
        line("MFU, whole job", f"{100 * d['mfu_job']:.1f}%", f"{100 * t['mfu_job']:.1f}%", d["mfu_job"] / t["mfu_job"])
        line("MFU, training only", f"{100 * d['mfu_train']:.1f}%", f"{100 * t['mfu_train']:.1f}%",
             d["mfu_train"] / t["mfu_train"])
    line("optimizer steps", str(d["steps"]), str(t["steps"]), None)
    line("load avg at start / end", f"{d['load']['load_at_start']:.2f} / {d['load_after']:.2f}",
         f"{t['load']['load_at_start']:.2f} / {t['load_after']:.2f}", None)
    print()
    print("Where the time goes (s since the subprocess started):")
    dm, tm = sides[0]["marks"], sides[1]["marks"]

    def span(m, a, b):
        return f"{m[b] - m[a]:6.1f}" if a in m and b in m else "   n/a"

    print(f"  dpo-ray: imports {span(dm, 'process_start', 'imports_done')}"
          f" | Ray start {span(dm, 'ray_init_start', 'ray_init_done')}"
          f" | read+tokenize+split {span(dm, 'prepare_data_start', 'reference_start')}"
          f" | reference pass {span(dm, 'reference_start', 'reference_done')}"
          f" | to Ray datasets {span(dm, 'reference_done', 'prepare_data_done')}"
          f" | trainer.fit {span(dm, 'fit_start', 'fit_done')} (of which training {d['train_s']:.1f})"
          f" | export+summary {span(dm, 'fit_done', 'run_done')} | Ray shutdown+exit {d['exit_s'] - d['job_s']:5.1f}")
    print(f"  TRL:     imports {span(tm, 'process_start', 'imports_done')} | tokenize + load policy and reference "
          f"{span(tm, 'trainer_init_start', 'trainer_init_done')}"
          f" | trainer.train {span(tm, 'trainer_init_done', 'train_done')}"
          f" (train_runtime {t['train_s']:.1f}) | save_model {span(tm, 'train_done', 'save_done')}"
          f" | exit {t['exit_s'] - t['job_s']:5.1f}")
    print()
    print("Peak memory, what is counted: RSS = resident pages of each process in the subprocess tree, summed at each "
          f"{args.sample_interval:g} s sample (shared pages - libtorch, Ray's object store - count once per process "
          "that maps them); PSS = the same with shared pages split among the processes, sampled every "
          f"{10 * args.sample_interval:g} s; training proc. = for dpo-ray the driver (--workers 0) or the Ray Train "
          "worker process(es), for TRL its one process. ru_maxrss = the training process's own peak RSS.")
    top = sorted(sides[0]["run"].monitor.peak_rss_breakdown, key=lambda x: -x[1])
    print("  dpo-ray processes at its RSS peak (t = %.1f s): " % sides[0]["run"].monitor.peak_rss_at
          + ", ".join(f"{n.split(' ', 1)[1]} {v / 2**20:.0f}" for n, v in top[:12])
          + (f", {len(top) - 12} more {sum(v for _, v in top[12:]) / 2**20:.0f}" if len(top) > 12 else "") + " (MB)")
    print()
    ld, lt = d["losses"], t["losses"]
    print("DPO loss per step (step 1 is computed before any update):")
    print(f"  step 1: dpo-ray {ld[0]:.6f}   TRL {lt[0]:.6f}   ln 2 = {LN2:.6f}" if ld and lt else "  (missing losses)")
    qd, qt = quarter_means(ld), quarter_means(lt)
    print(f"  {'mean over quarter':<22}" + "".join(f"{f'Q{i + 1}':>10}" for i in range(4)))
    print(f"  {'dpo-ray':<22}" + "".join(f"{v:10.4f}" for v in qd))
    print(f"  {'TRL':<22}" + "".join(f"{v:10.4f}" for v in qt))
    print(f"  last step: dpo-ray {ld[-1]:.4f}   TRL {lt[-1]:.4f}   ({len(ld)} and {len(lt)} logged steps)")
    print()
    print(f"monitor: {d['samples']} + {t['samples']} samples, {d['monitor_cpu_s'] + t['monitor_cpu_s']:.1f} CPU s "
          "in this process's sampling thread")
    if gpu_peak:
        print(MFU_FORMULA)
    targets = {**vocab_targets(facts["vocab"], d, t), **loss_checks(ld, lt, qd, qt)}
    print("targets: " + "; ".join(f"{k}: {'MET' if v else 'MISSED'}" for k, v in targets.items()))
    return {"rows": rows, "targets": targets}


# Issue 15's targets for the two CPU cases (dpo-ray / TRL); other vocabulary sizes get only the loss checks.
VOCAB_TARGETS = {
    8192: (("whole job >= 3x TRL's pairs/s", lambda d, t: d["job_pairs_s"] >= 3.0 * t["job_pairs_s"]),
           ("training process peak RSS <= 1.0x TRL", lambda d, t: d["peak_one_train_rss"] <= t["peak_one_train_rss"]),
           ("process tree peak RSS <= 1.0x TRL", lambda d, t: d["peak_rss"] <= t["peak_rss"])),
    151936: (("each training process peak RSS <= 0.35x TRL",
              lambda d, t: d["peak_one_train_rss"] <= 0.35 * t["peak_one_train_rss"]),
             ("process tree peak RSS <= 1.0x TRL", lambda d, t: d["peak_rss"] <= t["peak_rss"]),
             ("whole job >= 2x TRL's pairs/s", lambda d, t: d["job_pairs_s"] >= 2.0 * t["job_pairs_s"])),
}


def vocab_targets(vocab: int, d: dict, t: dict) -> dict[str, bool]:
    """The issue's targets for a model with ``vocab`` output rows, checked on the report rows of both sides."""
    return {name: bool(check(d, t)) for name, check in VOCAB_TARGETS.get(vocab, ())}


def loss_checks(ld: list[float], lt: list[float], qd: list[float], qt: list[float]) -> dict[str, bool]:
    """Both sides compute the same loss: ln 2 at step 1, and similar quarter means after (orders differ)."""
    return {
        "step-1 losses both ln 2 (|x - ln 2| < 1e-3)": bool(ld and lt and abs(ld[0] - LN2) < 1e-3
                                                            and abs(lt[0] - LN2) < 1e-3),
        "same trajectory (quarter means within 0.05)": bool(qd and qt
                                                            and max(abs(a - b) for a, b in zip(qd, qt)) < 0.05),
    }


def _trl_version() -> str:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:
        return "?"


def versions() -> str:
    from importlib.metadata import version

    parts = []
    for pkg in ("torch", "transformers", "ray", "trl", "accelerate", "datasets"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except Exception:
            parts.append(f"{pkg} missing")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench_trl"), help="model, data and runs go here")
    p.add_argument("--pairs", type=int, default=400, help="train pairs (one epoch unless --steps)")
    p.add_argument("--eval-pairs", type=int, default=16, help="held-out pairs for dpo-ray's end-of-run evaluation")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: one epoch, pairs / batch size)")
    p.add_argument("--lr", type=float, default=1e-3, help="a large step: random-init models barely move at 1e-6")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=0,
                   help="dpo-ray scaling.num_workers (0: the loop in the driver, one training process as TRL's)")
    p.add_argument("--cpus-per-worker", type=float, default=2.0, help="dpo-ray scaling.cpus_per_worker")
    p.add_argument("--micro-batch-size", type=int, default=8, help="dpo-ray train.micro_batch_size")
    p.add_argument("--dpo-ray-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dpo-ray --set override (repeatable); for experiments")
    p.add_argument("--dpo-ray-init", default="", metavar="JSON",
                   help="extra ray.init kwargs for the dpo-ray runs, e.g. '{\"object_store_memory\": 100000000}'; "
                        "for experiments")
    p.add_argument("--trl-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra DPOConfig argument for TRL (repeatable), e.g. gradient_checkpointing=false; "
                        "for experiments")
    p.add_argument("--only", choices=("both", "dpo-ray", "trl", "sweep"), default="both",
                   help="sides to run; sweep: only the sweep-cost runs (with --sweep-trials)")
    p.add_argument("--vocab", default=str(CPU_MODEL["vocab_size"]), metavar="N[,N...]",
                   help="output-head sizes to compare, one case each: 8192 is the Llama-shaped model of earlier "
                        "results; any other N (e.g. 151936, Qwen2.5's) puts a tied Qwen2-style head of N rows on the "
                        "same body (default: %(default)s)")
    p.add_argument("--sweep-trials", type=int, default=0, metavar="K",
                   help="also measure a K-trial sweep (workflows/sweep.py, no ASHA) against a single run with a "
                        "trial's settings, on the first --vocab case (the issue's target is for K >= 4); 0: don't")
    p.add_argument("--sweep-concurrent", type=int, default=1, help="sweep.max_concurrent_trials of that sweep")
    p.add_argument("--sweep-cpus-per-worker", type=float, default=0.0,
                   help="scaling.cpus_per_worker of the sweep's trials and of the single run they are compared with "
                        f"(0: Ray's CPU count minus the trial's own {SWEEP_TRIAL_CPUS:g}, over --workers)")
    p.add_argument("--quiet-load", type=float, default=0.8, help="wait until the 1-min load average is below this")
    p.add_argument("--quiet-wait", type=float, default=1200,
                   help="wait at most this long (s) before each run; 0: don't")
    p.add_argument("--sample-interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a side is killed")
    p.add_argument("--gpu", action="store_true", help="Qwen2.5-0.5B/1.5B-shaped models in bf16 on one GPU, with MFU")
    p.add_argument("--gpu-models", default="qwen2.5-0.5b,qwen2.5-1.5b", help="comma-separated, from: "
                   + ", ".join(QWEN_SHAPES))
    p.add_argument("--gpu-pairs", type=int, default=800, help="train pairs for --gpu")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="GPU peak dense bf16 TFLOP/s (default: by GPU name)")
    return p.parse_args(argv)


def check_gpu(args) -> float:
    """Peak bf16 TFLOP/s of the one visible GPU; exits with a message when there is no usable CUDA GPU."""
    try:
        import torch
    except ImportError:
        raise SystemExit("error: --gpu needs torch") from None
    if not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs a CUDA GPU, and torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}); run the CPU comparison without --gpu")
    name = torch.cuda.get_device_name(0)
    if args.peak_tflops:
        return args.peak_tflops
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    raise SystemExit(f"error: unknown peak bf16 FLOP/s for {name!r}; pass --peak-tflops")


def parse_vocabs(text: str) -> list[int]:
    """``--vocab 8192,151936`` -> [8192, 151936]; a bad entry exits naming it."""
    try:
        vocabs = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --vocab takes comma-separated integers, got {text!r}") from None
    if not vocabs or min(vocabs) < 1:
        raise SystemExit(f"error: --vocab needs at least one size >= 1, got {text!r}")
    return vocabs


def describe_model(label: str, facts: dict) -> str:
    if label == "llama":
        shape = "Llama-shaped"
    elif label.startswith("qwen2-head"):
        shape = f"tied Qwen2-style head of {facts['vocab']:,} rows on the Llama case's body"
    else:
        shape = f"{label}-shaped"
    return (f"{shape}: random-init {facts['type']}, {facts['params'] / 1e6:.1f}M parameters "
            f"({facts['layers']} layers, hidden {facts['hidden']}, {facts['heads']} heads / "
            f"{facts['kv_heads']} KV, MLP {facts['intermediate']}, vocab {facts['vocab']}, "
            f"{'tied' if facts['tied'] else 'untied'} head)")


def print_one_side(args, s: dict) -> None:
    """The short summary of a side that ran without the other (``--only``)."""
    m = s["run"].monitor
    print(f"[bench] {s['name']}: job {s['job_s']:.1f} s, exit {s['run'].exit_s:.1f} s, train {s['train_s']:.1f} s, "
          f"{args.steps * args.batch_size / s['job_s']:.2f} pairs/s whole job, peak RSS tree {mb(m.peak_rss)}, "
          f"PSS {mb(m.peak_pss)}, training proc. {mb(m.peak_train_rss)}, CPU {m.tree_cpu_seconds:.0f} s; marks "
          + json.dumps({k: round(v, 1) for k, v in s["marks"].items()}))
    print(f"[bench] losses: first {s['losses'][:1]}, quarters {[round(x, 4) for x in quarter_means(s['losses'])]}")


def run_case(args, work: Path, label: str, model_path: str, rows: list[dict], gpu_peak, first: bool) -> dict:
    """One model: dpo-ray and TRL side by side (as ``--only`` says), then the sweep cost on the first case."""
    facts = model_facts(model_path)
    model_label = describe_model(label, facts)
    print(f"[bench] model: {model_path}: {model_label}", flush=True)
    pairs = build_pairs(work / label, model_path, rows, args.pairs, args.eval_pairs, args.max_length)
    sides, report = [], {}
    if args.only in ("both", "dpo-ray"):
        sides.append(run_dpo_ray(args, model_path, pairs, work, args.gpu))
        print(f"[bench] dpo-ray: whole job {sides[-1]['job_s']:.1f} s", flush=True)
    if args.only in ("both", "trl"):
        sides.append(run_trl(args, model_path, pairs, work, args.gpu))
        print(f"[bench] TRL: whole job {sides[-1]['job_s']:.1f} s", flush=True)
    if len(sides) == 2:
        report = print_report(args, sides, pairs, facts, gpu_peak, model_label)
    elif sides:
        print_one_side(args, sides[0])
    if args.sweep_trials and first:
        # a sweep's trials each need a Ray Train worker group (dpo_ray.sweep.preflight.size_sweep): the single run
        # it is compared with gets one too
        sweep_args = argparse.Namespace(**{**vars(args), "workers": max(args.workers, 1)})
        cpus = sweep_cpus_per_worker(sweep_args)
        single = run_dpo_ray(sweep_args, model_path, pairs, work, False, label="dpo-ray-single", cpus_per_worker=cpus)
        print(f"[bench] single run for the sweep cost: whole job {single['job_s']:.1f} s", flush=True)
        sweep = run_dpo_ray_sweep(sweep_args, model_path, pairs, work, cpus)
        print(f"[bench] sweep: whole job {sweep['job_s']:.1f} s", flush=True)
        report["sweep_cost"] = compute_sweep_cost(args.sweep_trials, single, sweep)
        print_sweep_cost(sweep_args, report["sweep_cost"], single, sweep, cpus, model_label)
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    gpu_peak = check_gpu(args) if args.gpu else None
    if args.sweep_trials < 0 or (args.only == "sweep" and not args.sweep_trials):
        raise SystemExit("error: --only sweep needs --sweep-trials K (K >= 1; the target is for K >= 4)")
    if args.sweep_trials and args.gpu:
        raise SystemExit("error: --sweep-trials is a CPU measurement; run it without --gpu")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()}: "
          f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB; {versions()}", flush=True)
    print(f"[bench] command: {' '.join([Path(sys.executable).name] + sys.argv)}", flush=True)
    rows = read_hh_rows()
    if args.gpu:
        args.pairs = args.gpu_pairs
        args.workers, args.cpus_per_worker = 1, max(1.0, args.cpus_per_worker)
        specs = [(name, build_gpu_model(work, name, rows, args.seed)) for name in args.gpu_models.split(",")]
    else:
        specs = build_cpu_cases(work, parse_vocabs(args.vocab), rows, args.seed)
    args.steps = args.steps or math.ceil(args.pairs / args.batch_size)
    reports = {label: run_case(args, work, label, path, rows, gpu_peak, first=i == 0)
               for i, (label, path) in enumerate(specs)}
    (work / "last_results.json").write_text(json.dumps(reports, indent=2, default=str))


if __name__ == "__main__":
    main()
