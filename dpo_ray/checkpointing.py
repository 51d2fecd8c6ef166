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

Checkpoints live where Ray Train puts them, ``<storage_path>/<run_name>/checkpoint_<time>``, kept by
:func:`build_checkpoint_config`. :func:`open_run_checkpoints` gives a training loop the checkpoints of its
run: through Ray Train with workers, or kept by this module in Ray Train's local mode
(``scaling.num_workers=0``), where Ray holds reported checkpoints only in memory.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "state.json"

logger = logging.getLogger("dpo_ray")


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


def save_training_state(ckpt_dir: Path, optimizer, scheduler, state: TrainState, metrics: dict[str, Any]) -> None:
    torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt_dir / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
           "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, ckpt_dir / "rng.pt")
    (ckpt_dir / STATE_FILE).write_text(json.dumps({"state": state.to_json(), "metrics": metrics}, indent=2))


def load_state(ckpt_dir: Path) -> TrainState:
    data = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
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


# ------------------------------------------------------------------------------------ a run's checkpoints


def build_checkpoint_config(cfg, score_attribute: str | None):
    """Ray Train's ``CheckpointConfig`` for a run: the ``train.keep_checkpoints`` best by ``score_attribute``
    (higher is better), or the newest when it is None. Ray always keeps the latest one as well."""
    from ray.train import CheckpointConfig

    if score_attribute is None:
        return CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)
    return CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=score_attribute,
                            checkpoint_score_order="max")


class RayTrainCheckpoints:
    """A run's checkpoints through Ray Train: reported with the metrics, then persisted and pruned by Ray."""

    def find_latest(self) -> Path | None:
        """The newest completely written checkpoint of this run, as a local directory, or None.

        Ray hands back the latest registered checkpoint. If that one lacks the COMPLETE marker (a crash
        while it was written), the newest complete sibling in the run's storage is used instead, so a
        half-written checkpoint never stops a resume or sends it back to step 0.
        """
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        if has_complete_marker(ckpt.filesystem, ckpt.path):  # checked in storage: nothing is copied first
            return fetch_checkpoint(ckpt.filesystem, ckpt.path)
        logger.warning("checkpoint %s is incomplete (no COMPLETE marker); looking for an earlier one", ckpt.path)
        run_dir = ckpt.path.rstrip("/").rsplit("/", 1)[0]
        return fetch_checkpoint(ckpt.filesystem, find_complete_checkpoint(ckpt.filesystem, run_dir, skip=ckpt.path))

    def report(self, metrics: dict[str, Any], write_fn: Callable[[Path], None]) -> None:
        """Every rank reports (it is a barrier); rank 0 attaches a checkpoint written by ``write_fn(dir)``."""
        import ray.train
        from ray.train import Checkpoint

        if ray.train.get_context().get_world_rank() == 0:
            staging = make_staging_dir()
            try:
                write_fn(staging)
                mark_complete(staging)
                # Ray 2.60's synchronous upload keeps the local copy unless told: without this every checkpoint
                # (a whole model) stays behind in the temp dir for as long as the machine lives.
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(staging)),
                                 delete_local_checkpoint_after_upload=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint=None)


class LocalModeCheckpoints(RayTrainCheckpoints):
    """A run's checkpoints in Ray Train's local mode, kept where Ray Train would keep them.

    Local mode runs the loop in the driver and holds reported checkpoints only in memory, so on its own
    nothing would survive the process. This writes each checkpoint to ``<run_dir>/checkpoint_<time>``
    (COMPLETE last), prunes like :func:`build_checkpoint_config`, and resumes from the newest complete one.
    ``run_dir`` is a local path or any URI pyarrow opens, as Ray's ``storage_path``.
    """

    def __init__(self, run_dir: str, checkpoint_config):
        import pyarrow.fs as pafs

        self.filesystem, self.run_dir = pafs.FileSystem.from_uri(run_dir)
        self.config = checkpoint_config

    def find_latest(self) -> Path | None:
        return fetch_checkpoint(self.filesystem, find_complete_checkpoint(self.filesystem, self.run_dir))

    def report(self, metrics: dict[str, Any], write_fn: Callable[[Path], None]) -> None:
        staging = make_staging_dir()
        try:
            write_fn(staging)
            path = self.persist(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.prune(keep=path)
        self.send(metrics, path)

    def send(self, metrics: dict[str, Any], path: str) -> None:
        """Hand the metrics and the persisted checkpoint at ``path`` to Ray Train (it keeps them for the result)."""
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint(path=path, filesystem=self.filesystem))

    def persist(self, staging: Path) -> str:
        """Copy a written checkpoint into the run directory, then write its COMPLETE marker."""
        import pyarrow.fs as pafs

        # Named by time, as Ray names them, so that names sort oldest first.
        path = f"{self.run_dir}/checkpoint_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}"
        self.filesystem.create_dir(path)
        pafs.copy_files(str(staging), path, destination_filesystem=self.filesystem)
        with self.filesystem.open_output_stream(f"{path}/{COMPLETE_MARKER}") as f:
            f.write(b"ok\n")
        return path

    def prune(self, keep: str) -> None:
        """Delete all but the ``num_to_keep`` best complete checkpoints and ``keep`` (the newest)."""
        attr = self.config.checkpoint_score_attribute
        scored = []
        for index, path in enumerate(list_checkpoint_dirs(self.filesystem, self.run_dir)):  # oldest first
            if not has_complete_marker(self.filesystem, path):
                continue
            metrics = read_state_json(self.filesystem, path).get("metrics", {})
            score = metrics.get(attr, float("-inf")) if attr else index
            scored.append((score if score == score else float("-inf"), index, path))  # NaN ranks last
        scored.sort()
        for _, _, path in scored[: max(len(scored) - self.config.num_to_keep, 0)]:
            if path != keep:
                self.filesystem.delete_dir(path)


def open_run_checkpoints(cfg, score_attribute: str | None) -> RayTrainCheckpoints:
    """The checkpoints of ``cfg``'s run, for its training loop (``score_attribute`` as in the trainer's config)."""
    if cfg.scaling.num_workers == 0:
        return LocalModeCheckpoints(resolve_run_dir(cfg), build_checkpoint_config(cfg, score_attribute))
    return RayTrainCheckpoints()


def resolve_run_dir(cfg) -> str:
    """Where the run's checkpoints live, as Ray Train keeps a run's: ``<storage_path>/<run_name>``."""
    return f"{cfg.resolved_storage_path().rstrip('/')}/{cfg.run_name}"


def list_checkpoint_dirs(filesystem, run_dir: str) -> list[str]:
    """``checkpoint_*`` directories under ``run_dir``, oldest first (Ray names them by time)."""
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def has_complete_marker(filesystem, path: str) -> bool:
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info([f"{path}/{COMPLETE_MARKER}", f"{path}/{STATE_FILE}"])
    return all(i.type == pafs.FileType.File for i in infos)


def read_state_json(filesystem, path: str) -> dict[str, Any]:
    with filesystem.open_input_stream(f"{path}/{STATE_FILE}") as f:
        return json.loads(f.read())


def find_complete_checkpoint(filesystem, run_dir: str, skip: str | None = None) -> str | None:
    """The newest ``checkpoint_*`` in ``run_dir`` with its COMPLETE marker (other than ``skip``), or None."""
    for path in reversed(list_checkpoint_dirs(filesystem, run_dir)):
        if skip is not None and path.rstrip("/") == skip.rstrip("/"):
            continue
        if has_complete_marker(filesystem, path):
            if skip is not None:
                logger.warning("resuming from the earlier complete checkpoint %s", path)
            return path
    return None


def fetch_checkpoint(filesystem, path: str | None) -> Path | None:
    """A stored checkpoint as a local directory (downloaded unless it is on this machine's disk)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    if path is None:
        return None
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(path)
    return Path(Checkpoint(path=path, filesystem=filesystem).to_directory())


def list_checkpoint_models(storage_path: str, run_name: str) -> list[tuple[int, str]]:
    """(step, local model directory) of each complete checkpoint a run kept, by step (SFT and DPO runs alike)."""
    import pyarrow.fs as pafs

    filesystem, run_dir = pafs.FileSystem.from_uri(f"{storage_path.rstrip('/')}/{run_name}")
    found = []
    for path in list_checkpoint_dirs(filesystem, run_dir):
        if has_complete_marker(filesystem, path):
            local = fetch_checkpoint(filesystem, path) / "model"
            if (local / "config.json").exists():
                found.append((read_state_json(filesystem, path)["state"]["step"], str(local)))
    return sorted(found)
