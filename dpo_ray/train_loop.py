"""The DPO training function each Ray Train worker runs.

``train_loop_per_worker(loop_config)`` takes the resolved :class:`~dpo_ray.config.Config` (as a dict)
plus the model and tokenizer paths, trains with DDP or FSDP, evaluates on its eval shard (reduced so
that each held-out pair counts once), and reports metrics with a checkpoint through
``ray.train.report``. Running it again under the same run name continues from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

import ray.train
import ray.train.torch

from dpo_ray.batching import order_by_length_buckets
from dpo_ray.checkpointing import (
    TrainState,
    load_training_state,
    open_run_checkpoints,
    save_training_state,
)
from dpo_ray.config import Config, config_from_dict
from dpo_ray.interrupt import StopPoller
from dpo_ray.losses import (
    LossType,
    compute_dpo_loss,
    compute_pair_accuracy,
    compute_pair_accuracy_strict,
)
from dpo_ray.modeling import (
    PairLogProbs,
    disabled_adapter,
    enable_activation_checkpointing,
    load_causal_lm,
)
from dpo_ray.precision import (
    PrecisionRecipe,
    count_cpu_threads,
    in_eval_mode,
    prepare_for_training,
    resolve_config_precision,
)

logger = logging.getLogger("dpo_ray")


CHECKPOINT_SCORE = "eval_accuracy"  # the checkpoints kept are the most accurate on held-out pairs


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient was NaN or infinite; the message names the step and the batch's rows."""


@dataclass
class PairRow:
    row_id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    def as_pair(self):
        return self.prompt, self.chosen, self.rejected


# ------------------------------------------------------------------------------------ data


def collect_shard_rows(shard) -> list[PairRow]:
    """All rows of this worker's shard, in shard order (the shard is deterministic, see DataConfig)."""
    rows: list[PairRow] = []
    if shard is None:
        return rows
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy", prefetch_batches=0):
        has_ref = "ref_chosen_logps" in batch
        for i in range(len(batch["row_id"])):
            rows.append(
                PairRow(
                    row_id=str(batch["row_id"][i]),
                    prompt=[int(t) for t in batch["prompt_ids"][i]],
                    chosen=[int(t) for t in batch["chosen_ids"][i]],
                    rejected=[int(t) for t in batch["rejected_ids"][i]],
                    ref_chosen=float(batch["ref_chosen_logps"][i]) if has_ref else 0.0,
                    ref_rejected=float(batch["ref_rejected_logps"][i]) if has_ref else 0.0,
                )
            )
    return rows


def plan_epoch(rows: Sequence[PairRow], pairs_per_step: int, seed: int, epoch: int, bucketing: bool,
               shuffle: bool = True) -> list[list[int]]:
    """Batches (lists of row indices) of one epoch; the same on every run for the same seed and epoch.

    ``shuffle=False`` keeps the rows' own order (consecutive ``pairs_per_step`` rows per step, no bucketing).
    """
    if not shuffle:
        return [list(range(i, min(i + pairs_per_step, len(rows)))) for i in range(0, len(rows), pairs_per_step)]
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    if bucketing:
        return order_by_length_buckets([r.num_tokens for r in rows], pairs_per_step, gen)
    perm = torch.randperm(len(rows), generator=gen).tolist()
    return [perm[i : i + pairs_per_step] for i in range(0, len(perm), pairs_per_step)]


class EpochPlanner:
    """The rows of each optimizer step, epoch after epoch: the seeded :func:`plan_epoch` of ``state.epoch``,
    batch ``state.batch_in_epoch``. It moves ``state`` on to the next epoch when one is used up; the
    training loop counts ``batch_in_epoch`` up. Shared by the DPO and SFT loops, so both resume alike."""

    def __init__(self, rows: Sequence, rows_per_step: int, cfg: Config):
        self.rows, self.rows_per_step, self.cfg = rows, rows_per_step, cfg
        self.plan: list[list[int]] = []
        self.planned_epoch = -1

    def take_step_rows(self, state: TrainState) -> list:
        """Rows of the next step (``rows_per_step`` of them, fewer at an epoch's end)."""
        while True:
            if self.planned_epoch != state.epoch:
                self.plan = plan_epoch(self.rows, self.rows_per_step, self.cfg.train.seed, state.epoch,
                                       self.cfg.train.length_bucketing, self.cfg.train.shuffle)
                self.planned_epoch = state.epoch
                if not self.plan:
                    raise ValueError("no training rows in this worker's shard")
            if state.batch_in_epoch < len(self.plan):
                return [self.rows[i] for i in self.plan[state.batch_in_epoch]]
            state.epoch += 1
            state.batch_in_epoch = 0


def split_micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


# ------------------------------------------------------------------------------------ model


def build_policy(cfg: Config, model_path: str, device: torch.device, ckpt_dir: Path | None):
    """Policy LM with LoRA and checkpoint weights, ready to train: weights in the run's precision recipe
    (:func:`~dpo_ray.precision.resolve_config_precision`, the same as the reference's), train mode, dropout
    off unless ``train.disable_dropout=false``.

    Train mode matters beyond dropout: transformers recomputes activations (``model.gradient_checkpointing``)
    only in training mode, and ``from_pretrained`` returns the model in eval mode.
    """
    lm = load_causal_lm(
        model_path,
        dtype=resolve_config_precision(cfg, device).weights_dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    if cfg.model.lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if ckpt_dir is not None and (ckpt_dir / "adapter").exists():
            lm = PeftModel.from_pretrained(lm, str(ckpt_dir / "adapter"), is_trainable=True)
        else:
            lora = cfg.model.lora
            lm = get_peft_model(
                lm,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
    elif ckpt_dir is not None:
        from safetensors.torch import load_file

        state = {}
        for f in sorted((ckpt_dir / "model").glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = lm.load_state_dict(state, strict=False)
        tied = {k for k in missing if "lm_head" in k and getattr(lm.config, "tie_word_embeddings", False)}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing}, unexpected {unexpected}")
    return prepare_for_training(lm.to(device), cfg.train.disable_dropout)


def build_reference(cfg: Config, model_path: str, device: torch.device):
    """A frozen copy of the starting policy for ``dpo.reference=model``: the policy's weights dtype, eval mode."""
    ref = load_causal_lm(
        model_path,
        dtype=resolve_config_precision(cfg, device).weights_dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        device=device,
    )
    ref.eval()
    ref.requires_grad_(False)
    return ref


def wrap_model(cfg: Config, scorer: PairLogProbs) -> torch.nn.Module:
    """DDP (default) or FSDP through Ray Train's prepare_model; a no-op for a single worker."""
    if cfg.train.strategy == "fsdp":
        from functools import partial

        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        layer_cls = {type(layer) for layer in scorer.lm.get_decoder().layers} if hasattr(scorer.lm, "get_decoder") else set()
        policy = partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls) if layer_cls else None
        kwargs: dict[str, Any] = {"auto_wrap_policy": policy, "use_orig_params": True}
        return ray.train.torch.prepare_model(scorer, parallel_strategy="fsdp", parallel_strategy_kwargs=kwargs)
    return ray.train.torch.prepare_model(scorer, parallel_strategy="ddp")


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)


def build_scheduler(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=max(total_steps, 1))


def is_fsdp_module(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an FSDP1 ``FullyShardedDataParallel`` (what Ray Train's ``prepare_model(
    parallel_strategy="fsdp")`` returns), whose parameters on each rank are only shards."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch build without distributed support has no FSDP either
        return False
    return isinstance(model, FullyShardedDataParallel)


def clip_gradients(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total norm ``max_norm``; returns the total norm before clipping.

    Under FSDP each rank holds a shard of every gradient, and ``torch.nn.utils.clip_grad_norm_`` would clip
    each rank by the norm of its own shard; ``FullyShardedDataParallel.clip_grad_norm_`` all-reduces the
    shards' norms into the global one. DDP (gradients already all-reduced, identical on every rank) and
    single-process models clip locally. ``max_norm <= 0`` only measures the norm.
    """
    if is_fsdp_module(model):
        return model.clip_grad_norm_(max_norm if max_norm > 0 else float("inf"))
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


# ------------------------------------------------------------------------------------ distributed helpers


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max_many(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    return all_reduce_max_many([value], device)[0]


# ------------------------------------------------------------------------------------ the step


class DPOStepper:
    """Computes the DPO loss of a micro-batch: policy forward, reference log-probs, loss.

    Policy and reference passes run under the same precision recipe (weights dtype and autocast), which
    the precomputed reference pass (:class:`dpo_ray.data.reference.ReferenceScorer`) uses too.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, scorer: PairLogProbs, ref_lm, pad_id: int, device):
        self.cfg = cfg
        self.model = model  # wrapped (DDP/FSDP) scorer used for training forward passes
        self.scorer = scorer  # unwrapped, for eval and adapter-off reference passes
        self.ref_lm = ref_lm
        # built once: a PairLogProbs checks its model's output head when it is made
        self.ref_scorer = (PairLogProbs(ref_lm, cfg.train.prefix_sharing, cfg.train.logits_chunk_size,
                                        cfg.train.response_only_logits).eval() if ref_lm is not None else None)
        self.pad_id = pad_id
        self.device = device
        self.recipe: PrecisionRecipe = resolve_config_precision(cfg, device)
        self.loss_type = LossType(cfg.dpo.loss_type)

    def reference_logps(self, rows: Sequence[PairRow], batch) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self.cfg.dpo.reference
        if mode == "precomputed":
            chosen = torch.tensor([r.ref_chosen for r in rows], dtype=torch.float32, device=self.device)
            rejected = torch.tensor([r.ref_rejected for r in rows], dtype=torch.float32, device=self.device)
            return chosen, rejected
        with torch.no_grad(), self.recipe.autocast():
            if mode == "adapter":
                with disabled_adapter(self.scorer.lm):
                    chosen, rejected = self.scorer(batch)
            else:
                chosen, rejected = self.ref_scorer(batch)
        return chosen.float(), rejected.float()

    def compute(self, rows: Sequence[PairRow], model: torch.nn.Module | None = None):
        """Loss output and the policy log-probs of ``rows`` (one micro-batch)."""
        # the scorer's resolved layout, padded as the precomputed reference pass pads it
        batch = self.scorer.build_batch([r.as_pair() for r in rows], self.pad_id, self.device)
        ref_chosen, ref_rejected = self.reference_logps(rows, batch)
        with self.recipe.autocast():
            chosen, rejected = (model or self.model)(batch)
        out = compute_dpo_loss(
            chosen.float(),
            rejected.float(),
            ref_chosen,
            ref_rejected,
            beta=self.cfg.dpo.beta,
            loss_type=self.loss_type,
            label_smoothing=self.cfg.dpo.label_smoothing,
            rpo_alpha=self.cfg.dpo.rpo_alpha,
            chosen_token_counts=batch["chosen_lengths"],
            rejected_token_counts=batch["rejected_lengths"],
        )
        return out, chosen.detach().float(), rejected.detach().float()


EVAL_KEYS = ("acc", "acc_strict", "loss", "margin", "chosen_reward", "rejected_reward", "logps_chosen", "logps_rejected", "count")


def evaluate(stepper: DPOStepper, rows: Sequence[PairRow], micro_batch_size: int) -> dict[str, float]:
    """Held-out metrics over all workers' eval shards; each pair counts exactly once.

    Every worker runs the same number of forward passes (shorter shards repeat their last batch with
    weight 0), so FSDP's collectives stay matched.
    """
    order = sorted(range(len(rows)), key=lambda i: (rows[i].num_tokens, rows[i].row_id))  # whatever the shard order
    batches = split_micro_batches(order, micro_batch_size)
    n_batches = int(all_reduce_max(float(len(batches)), stepper.device))
    sums = dict.fromkeys(EVAL_KEYS, 0.0)
    model = stepper.model if stepper.cfg.train.strategy == "fsdp" else stepper.scorer
    with torch.no_grad(), in_eval_mode(model):  # every submodule gets its own mode back, dropout included
        for b in range(n_batches):
            real = b < len(batches)
            idx = batches[b] if real else (batches[-1] if batches else [])
            if not idx:
                continue  # this worker has no eval rows at all (only possible without FSDP)
            batch_rows = [rows[i] for i in idx]
            out, chosen, rejected = stepper.compute(batch_rows, model=model)
            if not real:
                continue
            margins = out.chosen_rewards - out.rejected_rewards
            sums["acc"] += compute_pair_accuracy(margins).sum().item()
            sums["acc_strict"] += compute_pair_accuracy_strict(margins).sum().item()
            sums["loss"] += out.losses.sum().item()
            sums["margin"] += margins.sum().item()
            sums["chosen_reward"] += out.chosen_rewards.sum().item()
            sums["rejected_reward"] += out.rejected_rewards.sum().item()
            sums["logps_chosen"] += chosen.sum().item()
            sums["logps_rejected"] += rejected.sum().item()
            sums["count"] += len(idx)
    total = dict(zip(EVAL_KEYS, all_reduce_sum([sums[k] for k in EVAL_KEYS], stepper.device)))
    n = max(total["count"], 1.0)
    return {
        "eval_accuracy": total["acc"] / n,
        "eval_accuracy_strict": total["acc_strict"] / n,
        "eval_loss": total["loss"] / n,
        "eval_reward_margin": total["margin"] / n,
        "eval_rewards_chosen": total["chosen_reward"] / n,
        "eval_rewards_rejected": total["rejected_reward"] / n,
        "eval_logps_chosen": total["logps_chosen"] / n,
        "eval_logps_rejected": total["logps_rejected"] / n,
        "eval_pairs": int(total["count"]),
    }


# ------------------------------------------------------------------------------------ checkpoints


def gather_model_state(model: torch.nn.Module, cfg: Config) -> dict[str, torch.Tensor] | None:
    """Full state dict of the LM for saving (all ranks must call this under FSDP); None off rank 0."""
    if cfg.train.strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            state = model.state_dict()
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        return state if ray.train.get_context().get_world_rank() == 0 else None
    return None


def save_policy(lm, tokenizer_path: str, out_dir: Path, cfg: Config, state_dict=None, merge_lora: bool = False) -> None:
    """The policy as a Hugging Face directory (safetensors) with its tokenizer; LoRA as an adapter or merged."""
    from transformers import AutoTokenizer

    if cfg.model.lora.enabled:
        lm.save_pretrained(str(out_dir / "adapter"))
        if merge_lora:
            import copy

            merged = copy.deepcopy(lm).merge_and_unload()
            merged.save_pretrained(str(out_dir / "model"), safe_serialization=True)
        else:
            return
    else:
        lm.save_pretrained(str(out_dir / "model"), safe_serialization=True, state_dict=state_dict)
    tok = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    tok.save_pretrained(str(out_dir / "model"))


# ------------------------------------------------------------------------------------ the loop


def say(message: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver and the job log.

    Not ``print``: Ray Train patches print into its logger, and the line then shows up twice.
    """
    sys.stdout.write(f"[dpo-ray] {message}\n")
    sys.stdout.flush()


def format_progress(step: int, total: int, metrics: dict[str, float], pairs_per_s: float, eta_s: float) -> str:
    eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
    return (
        f"step {step}/{total} | loss {metrics['loss']:.4f} | acc {metrics['acc']:.3f} | "
        f"margin {metrics['margin']:.4f} | {pairs_per_s:.1f} pairs/s | ETA {eta}"
    )


def open_metric_writers(cfg: Config, rank: int):
    """TensorBoard on rank 0 (and MLflow when installed and MLFLOW_TRACKING_URI is set)."""
    if rank != 0:
        return []
    writers = []
    try:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(log_dir=str(Path(cfg.resolved_output_dir()) / "tensorboard" / cfg.run_name)))
    except Exception as exc:  # tensorboard missing: the metrics still go to Ray and the log
        logger.warning("TensorBoard logging off: %s", exc)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            import mlflow

            mlflow.set_experiment(cfg.run_name)
            mlflow.start_run(run_name=cfg.run_name)
            writers.append(mlflow)
        except ImportError:
            logger.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed")
    return writers


def log_metrics(writers, metrics: dict[str, float], step: int) -> None:
    for w in writers:
        if hasattr(w, "add_scalar"):
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    w.add_scalar(k, v, step)
            w.flush()
        else:
            w.log_metrics({k.replace("/", "_"): v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def count_steps(cfg: Config, num_rows: int, world: int) -> tuple[int, int]:
    """(rows per worker per optimizer step, total optimizer steps): ``train.max_steps``, else
    ``train.epochs`` passes over this worker's ``num_rows``."""
    per_step = max(1, cfg.train.batch_size // max(world, 1))
    return per_step, cfg.train.max_steps or cfg.train.epochs * math.ceil(num_rows / per_step)


def build_optimization(cfg: Config, params: list, total_steps: int,
                       ckpt_dir: Path | None) -> tuple[torch.optim.Optimizer, Any, TrainState]:
    """Optimizer, LR scheduler and training state, restored from ``ckpt_dir`` when resuming."""
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    state = load_training_state(ckpt_dir, optimizer, scheduler) if ckpt_dir is not None else TrainState()
    return optimizer, scheduler, state


def set_up_worker(cfg: Config) -> tuple[int, int, torch.device]:
    """Quiet Ray Train's metric logs, size torch's threads to the worker's CPUs, seed; (rank, world, device)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one progress line per interval, not Ray's dicts
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(count_cpu_threads(cfg.scaling.cpus_per_worker))  # as the reference actors
    seed_everything(cfg.train.seed)
    return ctx.get_world_rank(), ctx.get_world_size(), device


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config`` = {cfg: Config dict, model_path, tokenizer_path, pad_id}."""
    cfg = config_from_dict(loop_config["cfg"])
    model_path, tokenizer_path, pad_id = loop_config["model_path"], loop_config["tokenizer_path"], loop_config["pad_id"]
    rank, world, device = set_up_worker(cfg)

    train_rows = collect_shard_rows(ray.train.get_dataset_shard(f"train_{rank}"))  # cut on the driver
    eval_rows = collect_shard_rows(ray.train.get_dataset_shard(f"eval_{rank}"))
    pairs_per_step, total_steps = count_steps(cfg, len(train_rows), world)

    checkpoints = open_run_checkpoints(cfg, score_attribute=CHECKPOINT_SCORE)
    ckpt_dir = checkpoints.find_latest()
    lm = build_policy(cfg, model_path, device, ckpt_dir)
    scorer = PairLogProbs(lm, cfg.train.prefix_sharing, cfg.train.logits_chunk_size, cfg.train.response_only_logits)
    model = wrap_model(cfg, scorer)
    ref_lm = build_reference(cfg, model_path, device) if cfg.dpo.reference == "model" else None
    stepper = DPOStepper(cfg, model, scorer, ref_lm, pad_id, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, state = build_optimization(cfg, params, total_steps, ckpt_dir)
    if ckpt_dir is not None and rank == 0:
        say(f"resuming from checkpoint at step {state.step}/{total_steps}")

    writers = open_metric_writers(cfg, rank)
    poller = StopPoller(cfg.run_name)
    eval_every = cfg.train.eval_every or total_steps
    ckpt_every = cfg.train.checkpoint_every or eval_every
    window = dict.fromkeys(("loss", "acc", "margin", "count"), 0.0)
    last_train: dict[str, float] = {}
    segment_start = time.perf_counter()
    seconds_before = state.train_seconds

    def write_checkpoint(final: bool):
        def write(directory: Path) -> None:
            save_policy(lm, tokenizer_path, directory, cfg, state_dict=full_state, merge_lora=final)
            save_training_state(directory, optimizer, scheduler, state, metrics)

        return write

    planner = EpochPlanner(train_rows, pairs_per_step, cfg)
    reported_final = False
    while state.step < total_steps:
        step_rows = planner.take_step_rows(state)
        micro = split_micro_batches(list(range(len(step_rows))), cfg.train.micro_batch_size)
        optimizer.zero_grad(set_to_none=True)
        step_loss = step_acc = step_margin = 0.0
        finite = True
        for m_i, idx in enumerate(micro):
            rows = [step_rows[i] for i in idx]
            sync = m_i == len(micro) - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()):
                out, _, _ = stepper.compute(rows)
                finite = finite and bool(torch.isfinite(out.loss).item())
                (out.loss * (len(idx) / len(step_rows))).backward()
            margins = out.chosen_rewards - out.rejected_rewards
            step_loss += out.loss.item() * len(idx)
            step_acc += compute_pair_accuracy(margins).sum().item()
            step_margin += margins.sum().item()
        grad_norm = clip_gradients(model, params, cfg.train.max_grad_norm)
        finite = finite and bool(torch.isfinite(grad_norm).item())
        nonfinite_flag, stop_flag = all_reduce_max_many([0.0 if finite else 1.0, float(poller.poll())], device)
        any_nonfinite, stop_requested = nonfinite_flag > 0, stop_flag > 0
        state.batch_in_epoch += 1
        if any_nonfinite:
            optimizer.zero_grad(set_to_none=True)
            ids = [r.row_id for r in step_rows]
            if not cfg.train.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {state.step + 1} (worker {rank}); rows in the batch: "
                    f"{', '.join(ids)}. Set train.skip_nonfinite=true to skip such batches."
                )
            state.nonfinite_skips += 1
            state.skipped_row_ids.extend(ids[:20])
            logger.warning("skipping a non-finite batch at step %d: rows %s", state.step + 1, ids)
            continue
        optimizer.step()
        scheduler.step()
        state.step += 1
        step_tokens = sum(r.num_tokens for r in step_rows)
        n_pairs, n_tokens = all_reduce_sum([len(step_rows), step_tokens], device)
        state.pairs_seen += int(n_pairs)
        state.tokens_seen += int(n_tokens)
        window["loss"] += step_loss
        window["acc"] += step_acc
        window["margin"] += step_margin
        window["count"] += len(step_rows)

        is_last = state.step >= total_steps
        if stop_requested and not is_last:
            state.train_seconds = seconds_before + time.perf_counter() - segment_start
            metrics = build_report_metrics(cfg, state, last_train, evaluate(stepper, eval_rows, cfg.train.micro_batch_size))
            metrics["interrupted"] = True
            full_state = gather_model_state(model, cfg)
            checkpoints.report(metrics, write_checkpoint(final=False))
            if rank == 0:
                say(f"stop requested: checkpoint saved at step {state.step}/{total_steps}")
            reported_final = True
            break
        if state.step % cfg.train.log_every == 0 or is_last:
            loss_s, acc_s, margin_s, count = all_reduce_sum([window["loss"], window["acc"], window["margin"], window["count"]], device)
            n = max(count, 1.0)
            last_train = {"loss": loss_s / n, "acc": acc_s / n, "margin": margin_s / n}
            window = dict.fromkeys(window, 0.0)
            state.train_seconds = seconds_before + time.perf_counter() - segment_start
            pps = state.pairs_seen / max(state.train_seconds, 1e-9)
            if rank == 0:
                eta = (total_steps - state.step) * state.train_seconds / max(state.step, 1)
                say(format_progress(state.step, total_steps, last_train, pps, eta))
                log_metrics(writers, {"train/loss": last_train["loss"], "train/accuracy": last_train["acc"],
                                      "train/margin": last_train["margin"], "train/pairs_per_second": pps,
                                      "train/lr": scheduler.get_last_lr()[0]}, state.step)
        if state.step % eval_every == 0 or state.step % ckpt_every == 0 or is_last:
            state.train_seconds = seconds_before + time.perf_counter() - segment_start
            metrics = build_report_metrics(cfg, state, last_train, evaluate(stepper, eval_rows, cfg.train.micro_batch_size))
            full_state = gather_model_state(model, cfg)
            checkpoints.report(metrics, write_checkpoint(final=is_last))
            reported_final = is_last
            log_metrics(writers, {k: v for k, v in metrics.items() if k.startswith("eval_")}, state.step)
            if rank == 0:
                say(f"eval at step {state.step}: accuracy {metrics['eval_accuracy']:.4f} "
                      f"(strict {metrics['eval_accuracy_strict']:.4f}), loss {metrics['eval_loss']:.4f}, "
                      f"margin {metrics['eval_reward_margin']:.4f}")
            segment_start = time.perf_counter()
            seconds_before = state.train_seconds

    if not reported_final:
        # Resumed a finished run: evaluate the restored policy and report it again, without training.
        metrics = build_report_metrics(cfg, state, last_train, evaluate(stepper, eval_rows, cfg.train.micro_batch_size))
        full_state = gather_model_state(model, cfg)
        checkpoints.report(metrics, write_checkpoint(final=True))
    for w in writers:
        if hasattr(w, "close"):
            w.close()


def build_report_metrics(cfg: Config, state: TrainState, train: dict[str, float], evals: dict[str, float]) -> dict[str, Any]:
    pps = state.pairs_seen / max(state.train_seconds, 1e-9)
    return {
        **evals,
        "step": state.step,
        "epoch": state.epoch,
        "train_loss": train.get("loss", float("nan")),
        "train_accuracy": train.get("acc", float("nan")),
        "train_reward_margin": train.get("margin", float("nan")),
        "pairs_seen": state.pairs_seen,
        "tokens_seen": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "pairs_per_second": pps,
        "tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
        "nonfinite_skips": state.nonfinite_skips,
        "skipped_row_ids": list(state.skipped_row_ids),
        "peak_memory_mb": peak_memory_mb(),
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this worker process (and peak CUDA memory when on GPU)."""
    import resource

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if torch.cuda.is_available():
        return max(rss_mb, torch.cuda.max_memory_allocated() / 2**20)
    return rss_mb
