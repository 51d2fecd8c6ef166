"""What goes wrong in long runs: a killed worker, non-finite losses, a half-written checkpoint,
bad config values and bad input rows, plus seeded determinism and safe defaults."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from dpo_ray.config import build_config

REPO = Path(__file__).resolve().parent.parent
EVAL_KEYS = ("eval_accuracy", "eval_accuracy_strict", "eval_loss", "eval_reward_margin")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, short_hh_rows) -> str:
    path = tmp_path_factory.mktemp("data") / "hh128.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short_hh_rows[:128]))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


def make_config(workdir: Path, pairs_file: str, model_dir: str, run_name: str, *overrides: str):
    return build_config(None, [
        f"model.name_or_path={model_dir}", f"data.train={pairs_file}", "data.eval_fraction=0.25",
        "data.max_length=256", f"output_dir={workdir}/{run_name}", f"data.cache_dir={workdir}/cache",
        f"run_name={run_name}", "scaling.num_workers=2", "train.batch_size=4", "train.micro_batch_size=2",
        "train.max_steps=16", "train.eval_every=8", "train.log_every=8", "train.learning_rate=0.003", *overrides,
    ])


def prepare(cfg):
    from dpo_ray.data.pipeline import prepare_data

    return prepare_data(cfg, tokenizer_path=cfg.model.name_or_path, reference_model_path=cfg.model.name_or_path)


@pytest.fixture(scope="module")
def baseline(ray_session, workdir, pairs_file, tiny_model_dir):
    from dpo_ray.trainer import run_dpo

    cfg = make_config(workdir, pairs_file, tiny_model_dir, "baseline")
    return run_dpo(cfg, prepared=prepare(cfg), model_path=tiny_model_dir)


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_eval_metrics(baseline, workdir, pairs_file, tiny_model_dir):
    from dpo_ray.trainer import run_dpo

    cfg = make_config(workdir, pairs_file, tiny_model_dir, "repeat")
    repeat = run_dpo(cfg, prepared=prepare(cfg), model_path=tiny_model_dir)
    assert baseline["steps"] == repeat["steps"] == 16
    # Bitwise: the same rows meet in the same worker in the same order (the second run reads the data back
    # from the cache, in other blocks), so even float sums add up the same way.
    for key in EVAL_KEYS + ("eval_rewards_chosen", "eval_rewards_rejected", "eval_logps_chosen", "eval_logps_rejected"):
        assert repeat[key] == baseline[key], key


def find_train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "RayTrainWorker" in cmd:
            found.append(proc)
    return found


def kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if any((p / "COMPLETE").exists() for p in run_dir.glob("checkpoint_*")):
            workers = find_train_workers()
            if workers:
                workers[-1].kill()  # SIGKILL, no cleanup
                killed.append(workers[-1].pid)
                return
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkilled_worker_resumes_from_checkpoint_to_the_same_result(baseline, workdir, pairs_file, tiny_model_dir):
    from dpo_ray.trainer import run_dpo

    cfg = make_config(workdir, pairs_file, tiny_model_dir, "crash", "scaling.max_failures=2")
    prepared = prepare(cfg)
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_after_first_checkpoint, args=(Path(cfg.resolved_storage_path()) / "crash", killed)
    )
    killer.start()
    summary = run_dpo(cfg, prepared=prepared, model_path=tiny_model_dir)
    killer.join()
    assert killed, "no training worker was found to kill"
    assert summary["steps"] == baseline["steps"] == 16
    for key in EVAL_KEYS:
        assert summary[key] == baseline[key], key


@pytest.mark.slow
def test_half_written_latest_checkpoint_is_skipped_on_resume(baseline, workdir, pairs_file, tiny_model_dir):
    """Remove the COMPLETE marker of the latest checkpoint (a crash mid-save): resume uses the one before."""
    from dpo_ray.trainer import run_dpo

    storage = Path(workdir) / "baseline" / "ray_results" / "baseline"
    checkpoints = sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) >= 2
    latest = checkpoints[-1]
    (latest / "COMPLETE").unlink()
    previous_step = json.loads((checkpoints[-2] / "state.json").read_text())["state"]["step"]
    cfg = make_config(workdir, pairs_file, tiny_model_dir, "baseline")
    summary = run_dpo(cfg, prepared=prepare(cfg), model_path=tiny_model_dir)
    assert previous_step < 16
    assert summary["steps"] == 16  # continued from the earlier complete checkpoint, not from step 0
    for key in EVAL_KEYS:
        assert summary[key] == baseline[key], key


@pytest.mark.slow
def test_local_mode_resumes_from_its_stored_checkpoints_to_the_same_result(ray_session, workdir, pairs_file,
                                                                           tiny_model_dir, capsys):
    """``scaling.num_workers=0`` (the loop in the driver) keeps its checkpoints on disk like a Ray Train run:
    with the latest one half-written, the same run resumes from the one before and ends where it did."""
    from dpo_ray.trainer import run_dpo

    cfg = make_config(workdir, pairs_file, tiny_model_dir, "local", "scaling.num_workers=0")
    prepared = prepare(cfg)
    first = run_dpo(cfg, prepared=prepared, model_path=tiny_model_dir)
    run_dir = Path(cfg.resolved_storage_path()) / "local"
    checkpoints = sorted(run_dir.glob("checkpoint_*"))
    assert [json.loads((p / "state.json").read_text())["state"]["step"] for p in checkpoints] == [8, 16]
    assert first["checkpoint_path"] == str(checkpoints[-1]) and first["steps"] == 16
    (checkpoints[-1] / "COMPLETE").unlink()

    capsys.readouterr()
    again = run_dpo(cfg, prepared=prepared, model_path=tiny_model_dir)
    assert "resuming from checkpoint at step 8/16" in capsys.readouterr().out  # the loop runs in this process
    assert again["steps"] == 16 and again["checkpoint_path"] != first["checkpoint_path"]
    for key in EVAL_KEYS:
        assert again[key] == first[key], key


def poison_row(prepared, row_id: str):
    """Give one training row a NaN reference log-prob, so its batch's loss is NaN."""
    def poison(batch):
        batch["ref_chosen_logps"] = batch["ref_chosen_logps"].copy()
        batch["ref_chosen_logps"][batch["row_id"] == row_id] = float("nan")
        return batch

    prepared.train = prepared.train.map_batches(poison, batch_format="numpy").materialize()
    return prepared


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_row_ids(ray_session, workdir, pairs_file, tiny_model_dir):
    from dpo_ray.trainer import run_dpo

    cfg = make_config(workdir, pairs_file, tiny_model_dir, "nan-stop", "scaling.max_failures=0",
                      "scaling.num_workers=0")
    prepared = prepare(cfg)
    row_id = prepared.train.take(1)[0]["row_id"]
    with pytest.raises(Exception) as info:
        run_dpo(cfg, prepared=poison_row(prepared, row_id), model_path=tiny_model_dir)
    message = str(info.value)
    assert "non-finite loss or gradient at step" in message
    assert row_id in message


@pytest.mark.slow
def test_skip_nonfinite_skips_the_batch_counts_it_and_never_steps_on_nan(
    ray_session, workdir, pairs_file, tiny_model_dir
):
    import torch
    from safetensors.torch import load_file

    from dpo_ray.trainer import run_dpo

    cfg = make_config(
        workdir,
        pairs_file,
        tiny_model_dir,
        "nan-skip",
        "train.skip_nonfinite=true",
        "scaling.num_workers=0",
        "train.max_steps=0",
        "train.epochs=1",
    )
    prepared = prepare(cfg)
    row_id = prepared.train.take(1)[0]["row_id"]
    summary = run_dpo(cfg, prepared=poison_row(prepared, row_id), model_path=tiny_model_dir)
    assert summary["nonfinite_skips"] == 1
    assert row_id in summary["skipped_row_ids"]
    weights = load_file(str(Path(summary["final_model_dir"]) / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert math.isfinite(summary["eval_loss"])


# ------------------------------------------------------------------------------ bad config values


@pytest.mark.parametrize(
    "override, key",
    [
        ("dpo.beta=-0.1", "dpo.beta"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("dpo.loss_type=kto_pair", "dpo.loss_type"),
        ("data.max_length=4", "data.max_length"),
        ("train.batch_size=many", "train.batch_size"),
    ],
)
def test_bad_config_value_is_a_one_line_error_before_ray_starts(override, key, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "workflows" / "train.py"), "--set", override, "--set", f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_more_workers_than_the_cluster_has_is_refused_before_workers_start(ray_session, tmp_path, capsys):
    from dpo_ray.cli import main_train

    with pytest.raises(SystemExit) as info:
        main_train(["--set", "scaling.num_workers=16", "--set", f"output_dir={tmp_path}"])
    assert info.value.code == 2
    assert "scaling.num_workers" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bad input rows, end to end

GOOD = {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."}


def bad_rows() -> dict[str, bytes]:
    hh_mismatch = json.dumps(
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: fine",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
        }
    )
    return {
        "unparseable_line": b'{"prompt": "x", "chosen": ',
        "invalid_utf8": b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}',
        "missing_field": json.dumps({"prompt": "p", "chosen": "c"}).encode(),
        "empty_field": json.dumps({"prompt": "p", "chosen": "   ", "rejected": "r"}).encode(),
        "non_string_field": json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}).encode(),
        "chosen_equals_rejected": json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode(),
        "prompt_too_long": json.dumps({"prompt": "word " * 400, "chosen": "c", "rejected": "r"}).encode(),
        "prompt_mismatch": hh_mismatch.encode(),
    }


@pytest.mark.parametrize("reason", sorted(bad_rows()))
def test_each_malformed_input_kind_stops_train_with_file_and_reason(
    reason, ray_session, tmp_path, tiny_model_dir, capsys
):
    from dpo_ray.cli import main_train

    data = tmp_path / f"{reason}.jsonl"
    good = (
        GOOD
        if reason != "prompt_mismatch"
        else {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}
    )
    lines = [json.dumps(good).encode()] * 12
    lines.insert(5, bad_rows()[reason])
    data.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(SystemExit) as info:
        main_train(
            [
                "--set",
                f"model.name_or_path={tiny_model_dir}",
                "--set",
                f"data.train={data}",
                "--set",
                f"output_dir={tmp_path}/out",
                "--set",
                f"data.cache_dir={tmp_path}/cache",
                "--set",
                "data.max_length=64",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert data.name in err and reason in err, err[-2000:]
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert json.dumps(report).count(f"{data.name}:6") >= 1  # the bad row is named by file and line


# ------------------------------------------------------------------------------ safe defaults


def test_defaults_keep_remote_code_off():
    assert build_config().model.trust_remote_code is False


def test_every_torch_load_passes_weights_only_true():
    sources = list((REPO / "dpo_ray").rglob("*.py")) + list((REPO / "workflows").rglob("*.py"))
    for path in sources:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle.load" not in path.read_text(), path


def test_checkpoints_and_models_are_safetensors(baseline):
    final = Path(baseline["final_model_dir"])
    assert (final / "model.safetensors").exists()
    assert not list(final.glob("*.bin"))
    storage = final.parent / "ray_results"
    assert list(storage.rglob("model.safetensors"))
    assert not list(storage.rglob("*.bin"))
