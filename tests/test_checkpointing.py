"""A run's checkpoints in Ray Train's local mode (dpo_ray.checkpointing.LocalModeCheckpoints), on disk only.

Ray Train's local mode keeps reported checkpoints in memory; these tests check that they land where a
Ray Train run keeps them, are pruned like the trainer's CheckpointConfig, and that a half-written one is
never resumed from. Ray's own reporting is replaced by a stub: no Ray instance is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_ray.checkpointing import (
    COMPLETE_MARKER,
    LocalModeCheckpoints,
    build_checkpoint_config,
    list_checkpoint_dirs,
    open_run_checkpoints,
)
from dpo_ray.config import build_config


@pytest.fixture
def reported(monkeypatch) -> list:
    """What the loop hands to ``ray.train.report``: (metrics, checkpoint) per call."""
    import ray.train

    calls: list = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: calls.append((metrics, checkpoint)))
    return calls


def write_fake_checkpoint(step: int, accuracy: float):
    def write(directory: Path) -> None:
        (directory / "model").mkdir()
        (directory / "model" / "weights.bin").write_bytes(bytes([step]) * 10)
        (directory / "state.json").write_text(json.dumps({"state": {"step": step},
                                                           "metrics": {"eval_accuracy": accuracy}}))
    return write


def steps_on_disk(run_dir: Path) -> list[int]:
    return [json.loads((Path(p) / "state.json").read_text())["state"]["step"]
            for p in list_checkpoint_dirs(LocalModeCheckpoints(str(run_dir), None).filesystem, str(run_dir))]


def test_local_mode_is_chosen_by_zero_workers_and_keeps_checkpoints_under_storage_and_run_name(tmp_path):
    local = open_run_checkpoints(build_config(None, [f"output_dir={tmp_path}", "run_name=r", "scaling.num_workers=0"]),
                                 score_attribute="eval_accuracy")
    assert isinstance(local, LocalModeCheckpoints)
    assert local.run_dir == str(tmp_path / "ray_results" / "r")  # where Ray Train keeps the run's checkpoints
    assert local.config.num_to_keep == 2 and local.config.checkpoint_score_attribute == "eval_accuracy"
    ray_run = open_run_checkpoints(build_config(None, [f"output_dir={tmp_path}", "scaling.num_workers=2"]), None)
    assert not isinstance(ray_run, LocalModeCheckpoints)


def test_checkpoints_are_persisted_complete_and_pruned_to_the_best_plus_the_latest(tmp_path, reported):
    cfg = build_config(None, ["train.keep_checkpoints=2"])
    run_dir = tmp_path / "run"
    store = LocalModeCheckpoints(str(run_dir), build_checkpoint_config(cfg, "eval_accuracy"))
    assert store.find_latest() is None  # nothing to resume from yet
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)]:
        store.report({"step": step, "eval_accuracy": accuracy}, write_fake_checkpoint(step, accuracy))

    # The 2 most accurate (steps 2 and 3) plus the latest (step 4), as Ray's CheckpointConfig keeps them.
    assert steps_on_disk(run_dir) == [2, 3, 4]
    latest = store.find_latest()
    assert json.loads((latest / "state.json").read_text())["state"]["step"] == 4
    assert (latest / COMPLETE_MARKER).exists() and (latest / "model" / "weights.bin").read_bytes() == bytes([4]) * 10
    metrics, checkpoint = reported[-1]
    assert metrics["step"] == 4 and Path(checkpoint.path) == latest  # the run's result points at the stored copy


def test_without_a_score_the_newest_are_kept(tmp_path, reported):
    cfg = build_config(None, ["train.keep_checkpoints=2"])
    store = LocalModeCheckpoints(str(tmp_path / "run"), build_checkpoint_config(cfg, None))
    for step, accuracy in [(1, 0.9), (2, 0.1), (3, 0.5)]:
        store.report({"step": step}, write_fake_checkpoint(step, accuracy))
    assert steps_on_disk(tmp_path / "run") == [2, 3]


def test_a_half_written_latest_checkpoint_is_skipped_and_never_pruned_into(tmp_path, reported):
    cfg = build_config(None, ["train.keep_checkpoints=1"])
    run_dir = tmp_path / "run"
    store = LocalModeCheckpoints(str(run_dir), build_checkpoint_config(cfg, "eval_accuracy"))
    store.report({"step": 1}, write_fake_checkpoint(1, 0.9))
    store.report({"step": 2}, write_fake_checkpoint(2, 0.5))
    assert steps_on_disk(run_dir) == [1, 2]  # the best and the latest
    newest = Path(list_checkpoint_dirs(store.filesystem, str(run_dir))[-1])
    (newest / COMPLETE_MARKER).unlink()  # as if the process died while writing it
    assert json.loads((store.find_latest() / "state.json").read_text())["state"]["step"] == 1


def test_a_failed_write_leaves_no_checkpoint_and_no_staging_dir(tmp_path, reported, monkeypatch):
    import dpo_ray.checkpointing as ckpt

    staged = []
    real = ckpt.make_staging_dir
    monkeypatch.setattr(ckpt, "make_staging_dir", lambda: staged.append(real()) or staged[-1])
    store = LocalModeCheckpoints(str(tmp_path / "run"), build_checkpoint_config(build_config(None, []), None))

    def broken(directory: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.report({"step": 1}, broken)
    assert store.find_latest() is None and not reported
    assert staged and not staged[0].exists()


def test_a_ray_train_checkpoint_leaves_no_staging_copy_behind(monkeypatch):
    """Ray's synchronous upload keeps the local directory unless asked; a whole model per checkpoint would pile up."""
    import ray.train

    import dpo_ray.checkpointing as ckpt

    staged, calls = [], []
    real = ckpt.make_staging_dir
    monkeypatch.setattr(ckpt, "make_staging_dir", lambda: staged.append(real()) or staged[-1])
    monkeypatch.setattr(ray.train, "get_context", lambda: type("Ctx", (), {"get_world_rank": lambda self: 0})())

    def report(metrics, checkpoint=None, **options):
        assert (Path(checkpoint.path) / COMPLETE_MARKER).exists()  # complete when Ray copies it
        calls.append(options)

    monkeypatch.setattr(ray.train, "report", report)
    ckpt.RayTrainCheckpoints().report({"step": 1}, write_fake_checkpoint(1, 0.5))
    assert calls == [{"delete_local_checkpoint_after_upload": True}]
    assert staged and not staged[0].exists()
