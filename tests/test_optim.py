"""The optimizer's learning-rate schedules: transformers' formulas, without importing transformers' trainer code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dpo_ray.optim import LrSchedule

HF_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def trace_lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", list(HF_NAMES))
@pytest.mark.parametrize(("warmup", "total"), [(0, 50), (5, 50), (3, 3), (0, 1), (10, 7)])
def test_each_schedule_gives_the_learning_rates_of_transformers_get_scheduler(name, warmup, total):
    from transformers import get_scheduler

    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    hf_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ours = LrSchedule(name).build(ours_opt, warmup, total)
    hf = get_scheduler(HF_NAMES[name], hf_opt, num_warmup_steps=warmup, num_training_steps=total)
    assert trace_lrs(ours, ours_opt, total + 3) == trace_lrs(hf, hf_opt, total + 3)  # exactly: the same formulas
    ours.load_state_dict(hf.state_dict())  # a checkpoint written with transformers' scheduler still resumes
    assert ours.get_last_lr() == hf.get_last_lr()


def test_the_worker_loop_does_not_import_peft():
    """transformers' schedules import peft (seconds in every Ray worker); only LoRA runs need it."""
    code = "import sys, dpo_ray.train_loop; print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
