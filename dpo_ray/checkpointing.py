"""Checkpoint layout, atomic writes and safe loading.

A checkpoint directory holds:
    model/            the policy as a Hugging Face directory (safetensors) with its tokenizer, or
    adapter/          the LoRA adapter (peft format) when training with LoRA; the base model is
                      ``model.name_or_path`` and is not copied into every checkpoint
    optimizer.pt      optimizer state dict   (loaded with ``torch.load(weights_only=True)``)
    scheduler.pt      LR scheduler state dict (likewise)
    rng.pt            torch CPU (and CUDA) RNG states and Python's ``random`` state
    state.json        step, epoch, position in the epoch, metrics
    COMPLETE          written last; a directory without it is a half-written checkpoint
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

COMPLETE_MARKER = "COMPLETE"


@dataclass
class TrainState:
    """Where training stands; enough to continue exactly where it stopped."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch the next batch comes from
    batch_in_epoch: int = 0  # batches of that epoch already consumed
    pairs_seen: int = 0  # pairs across all workers
    tokens_seen: int = 0
    nonfinite_skips: int = 0
    skipped_row_ids: list[str] = field(default_factory=list)
    train_seconds: float = 0.0  # time spent in training steps, summed over resumes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def make_staging_dir(prefix: str = "dpo-ckpt-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def mark_complete(ckpt_dir: Path) -> None:
    """Write the marker last: only now does the directory count as a checkpoint."""
    (ckpt_dir / COMPLETE_MARKER).write_text("ok\n")


def is_complete(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE_MARKER).exists() and (Path(ckpt_dir) / "state.json").exists()


def save_training_state(ckpt_dir: Path, optimizer, scheduler, state: TrainState, metrics: dict[str, Any]) -> None:
    torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt_dir / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
           "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, ckpt_dir / "rng.pt")
    (ckpt_dir / "state.json").write_text(json.dumps({"state": state.to_json(), "metrics": metrics}, indent=2))


def load_state(ckpt_dir: Path) -> TrainState:
    data = json.loads((Path(ckpt_dir) / "state.json").read_text())
    return TrainState.from_json(data["state"])


def load_training_state(ckpt_dir: Path, optimizer, scheduler) -> TrainState:
    """Restore optimizer, scheduler and RNG states; nothing untrusted is unpickled (weights_only)."""
    ckpt_dir = Path(ckpt_dir)
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True, map_location="cpu"))
    rng = torch.load(ckpt_dir / "rng.pt", weights_only=True, map_location="cpu")
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return load_state(ckpt_dir)


def copy_model_dir(src: Path, dst: Path) -> Path:
    """Copy a model directory to ``dst`` atomically (temporary sibling, then rename)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst
