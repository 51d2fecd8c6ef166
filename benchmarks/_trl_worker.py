"""TRL side of benchmarks/compare_trl.py: one DPOTrainer run, as a user of TRL 1.16 would write it.

Run by compare_trl.py in its own process (so that its memory is measured on its own):

    python benchmarks/_trl_worker.py SPEC.json

SPEC.json holds the settings that must match dpo-ray (model directory, train file, batch size, max_length,
steps, learning rate, seed, precision) and where to write the result JSON. Everything else is DPOConfig's
default: a reference model loaded as a second copy of the policy, gradient checkpointing on, the sigmoid
loss with beta 0.1, a final checkpoint at the last step.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # first thing: the parent compares this with the moment it started the process

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    marks = {"process_start": T_PROCESS}

    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    marks["imports_done"] = time.time()
    if spec.get("num_threads"):
        torch.set_num_threads(int(spec["num_threads"]))

    use_gpu = bool(spec.get("gpu"))
    extra = dict(spec.get("extra") or {})  # experiments only (--trl-set); empty in the comparison
    args = DPOConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_length=spec["max_length"],
        max_steps=spec["max_steps"],
        learning_rate=spec["learning_rate"],
        optim="adamw_torch_fused",  # transformers' default with torch >= 2.8, and dpo-ray's (train.fused_optimizer)
        logging_steps=1,
        report_to="none",
        bf16=use_gpu,  # TRL's default is bf16=True; CPUs here have no fast bf16 matmuls, so fp32 on CPU
        fp16=False,
        seed=spec["seed"],
        beta=spec.get("beta", 0.1),
        disable_tqdm=True,
        **extra,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    train = load_dataset("json", data_files=spec["train_file"], split="train")

    marks["trainer_init_start"] = time.time()
    # The model is passed as a path, the usual way: TRL loads the policy and, as ref_model is None, a second
    # copy of it as the frozen reference (fp32 weights; bf16 autocast on GPU).
    trainer = DPOTrainer(model=spec["model_path"], args=args, train_dataset=train, processing_class=tokenizer)
    marks["trainer_init_done"] = time.time()  # dataset tokenized, policy and reference loaded

    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    train_output = trainer.train()
    marks["train_done"] = time.time()
    trainer.save_model(os.path.join(spec["output_dir"], "final_model"))
    marks["save_done"] = time.time()

    losses = {}
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            losses[int(entry["step"])] = float(entry["loss"])
    result = {
        "marks": marks,
        "losses": [losses[k] for k in sorted(losses)],
        "loss_steps": sorted(losses),
        "train_metrics": dict(train_output.metrics),
        "global_step": trainer.state.global_step,
        "num_train_rows": len(trainer.train_dataset),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
        "policy_params": sum(p.numel() for p in trainer.model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    if use_gpu:
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    with open(spec["result_file"], "w") as f:
        json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
