"""Ray Train DPO runs: export, LoRA, reference modes, resume after a stop, fail-fast resource checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpo_ray.config import ConfigError, build_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, short_hh_rows) -> str:
    """96 HH pairs in the implicit-prompt format, as users bring them."""
    path = tmp_path_factory.mktemp("data") / "hh96.jsonl"
    with open(path, "w") as f:
        for row in short_hh_rows[:96]:
            f.write(json.dumps(row) + "\n")
    return str(path)


def make_config(tmp_path: Path, pairs_file: str, model_dir: str, *overrides: str):
    return build_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.train={pairs_file}",
            "data.eval_fraction=0.25",
            "data.max_length=256",
            f"output_dir={tmp_path}/run",
            f"data.cache_dir={tmp_path.parent}/cache",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.log_every=1",
            "train.learning_rate=0.002",
            *overrides,
        ],
    )


def score_eval_accuracy(model_dir: str, prepared, cfg) -> float:
    """Held-out accuracy of a saved model, recomputed outside Ray from the eval rows and their ref log-probs."""
    from dpo_ray.losses import compute_pair_accuracy
    from dpo_ray.modeling import load_causal_lm, load_tokenizer, score_pairs

    lm = load_causal_lm(model_dir)
    pad = load_tokenizer(model_dir).pad_token_id
    rows = prepared.eval.take_all()
    pairs = [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in rows]
    chosen, rejected = score_pairs(lm, pairs, pad)
    ref_c = torch.tensor([r["ref_chosen_logps"] for r in rows])
    ref_r = torch.tensor([r["ref_rejected_logps"] for r in rows])
    margins = cfg.dpo.beta * ((chosen.double() - ref_c) - (rejected.double() - ref_r))
    return compute_pair_accuracy(margins).mean().item()


def run(cfg):
    from dpo_ray.data.pipeline import prepare_data
    from dpo_ray.trainer import prepare_model_path, run_dpo

    model_path = prepare_model_path(cfg)
    prepared = prepare_data(cfg, tokenizer_path=model_path, reference_model_path=model_path)
    return run_dpo(cfg, prepared=prepared, model_path=model_path), prepared


@pytest.mark.slow
def test_lora_uses_the_adapterless_base_as_reference_and_exports_merged(
    ray_session, tmp_path, pairs_file, tiny_model_dir
):
    cfg = make_config(
        tmp_path,
        pairs_file,
        tiny_model_dir,
        "scaling.num_workers=0",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "dpo.reference=adapter",
        "train.learning_rate=0.01",
    )
    summary, prepared = run(cfg)
    final = Path(summary["final_model_dir"])
    assert not (final / "adapter_config.json").exists()  # a plain HF model, LoRA merged in
    assert (Path(cfg.output_dir) / "final_adapter" / "adapter_config.json").exists()
    assert summary["steps"] == 4
    # The adapter-off base gives the same reference log-probs as the precomputed pass, so accuracy reproduces.
    assert score_eval_accuracy(str(final), prepared, cfg) == pytest.approx(summary["eval_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_reference_modes_give_the_same_run_and_full_finetune_exports_a_model_that_reproduces_it(
    ray_session, tmp_path, pairs_file, tiny_model_dir
):
    """Full fine-tuning on 2 DDP workers, once with precomputed reference log-probs and once with a frozen
    reference model in each worker: the same run; the exported model reproduces the reported accuracy."""
    results, prepared = {}, None
    for mode in ("precomputed", "model"):
        cfg = make_config(
            tmp_path / mode,
            pairs_file,
            tiny_model_dir,
            "scaling.num_workers=2",
            f"dpo.reference={mode}",
            f"run_name=ref-{mode}",
        )
        results[mode], prepared = run(cfg)
        summary = results[mode]
        for key in (
            "eval_accuracy",
            "eval_accuracy_strict",
            "eval_loss",
            "eval_reward_margin",
            "train_pairs",
            "eval_pairs",
            "steps",
            "pairs_per_second",
            "wall_seconds",
            "final_model_dir",
            "config",
        ):
            assert key in summary, key
        assert summary["steps"] == 4
        assert summary["eval_pairs"] == prepared.eval_pairs  # every held-out pair counted once across 2 workers
        saved = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
        assert saved["eval_accuracy"] == summary["eval_accuracy"]
        assert Path(summary["final_model_dir"], "model.safetensors").exists()
    assert results["model"]["eval_loss"] == pytest.approx(results["precomputed"]["eval_loss"], abs=1e-4)
    assert results["model"]["eval_accuracy"] == results["precomputed"]["eval_accuracy"]
    exported = score_eval_accuracy(results["precomputed"]["final_model_dir"], prepared, cfg)
    assert exported == pytest.approx(results["precomputed"]["eval_accuracy"], abs=1e-6)


def test_gpu_request_on_a_cpu_cluster_fails_within_seconds(ray_session, tmp_path):
    from dpo_ray.cluster import check_cluster_resources

    cfg = build_config(None, ["scaling.use_gpu=true", f"output_dir={tmp_path}"])
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="scaling.use_gpu.*GPUs"):
        check_cluster_resources(cfg)
    assert time.perf_counter() - start < 5


def test_more_workers_than_cpus_fails_before_any_worker_starts(ray_session, tmp_path):
    from dpo_ray.cluster import check_cluster_resources

    cfg = build_config(None, ["scaling.num_workers=8", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        check_cluster_resources(cfg)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_same_command_resumes_to_the_same_step(
    ray_session, tmp_path, pairs_file, tiny_model_dir
):
    """Stop a run partway with SIGTERM (as Ctrl-C), run the same command again, end at max_steps.

    Both commands join the session's cluster through RAY_ADDRESS, as under ``ray job submit``."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "workflows" / "train.py"),
        "--set",
        f"model.name_or_path={tiny_model_dir}",
        "--set",
        f"data.train={pairs_file}",
        "--set",
        f"output_dir={out}",
        "--set",
        f"data.cache_dir={tmp_path.parent}/cache",
        "--set",
        "data.eval_fraction=0.25",
        "--set",
        "data.max_length=256",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.max_steps=200",
        "--set",
        "train.eval_every=100",
        "--set",
        "train.log_every=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        wait_for(lambda: "step 3/200" in log.read_text(), 240, "training to reach step 3")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    first = log.read_text()
    assert code == 128 + signal.SIGTERM, first[-3000:]
    # the driver's own line: the worker's "checkpoint saved" line can reach the log after the driver exits
    assert "interrupted at step " in first and "checkpoint at " in first
    stopped_at = int(first.split("interrupted at step ")[1].split(";")[0])
    assert 3 <= stopped_at < 200

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from checkpoint at step {stopped_at}/200" in second.stdout + second.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 200
    assert summary["interrupted"] is False
    steps_logged = [json.loads(line)["step"] for line in (out / "metrics/dpo.jsonl").read_text().splitlines()]
    assert Path(summary["training_plot"]).is_file() and steps_logged[0] == 1 and steps_logged[-1] == 200
