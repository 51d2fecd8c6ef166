"""Ray Tune sweeps: search space, trial configs, and whole small sweeps on the shared Ray instance.

The slow tests share one real sweep (tiny model, 4 steps, 1 worker per trial, one trial at a time, three
trials of which one fails): ``workflows/sweep.py`` runs in a subprocess on the same cluster, is stopped
with SIGTERM while its second trial runs, and the same command resumes it in this process. It checks
that the resume does not redo the finished trial or the reference pass, and then the outputs, the
failed trial recorded as ERROR, and that every CPU comes back.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpo_ray.cli import main_sweep
from dpo_ray.config import TINY_MODEL_PRESET, ConfigError, build_config, config_from_dict, derive_config
from dpo_ray.sweep import preflight, results
from dpo_ray.sweep import space as sweep_space

REPO = Path(__file__).resolve().parent.parent

BASE_COLUMNS = ["trial_id", "dpo.beta", "train.learning_rate", "eval_accuracy", "eval_loss", "eval_reward_margin",
                "steps", "status"]


def build_sweep_dict(model_dir: str, cache_dir: Path, output_dir: Path, **sweep) -> dict:
    """A small sweep: tiny model, 32 train pairs, 4 steps with an evaluation every 2, one worker per trial."""
    return {
        "model": {"name_or_path": model_dir},
        "data": {"cache_dir": str(cache_dir), "limit": 32, "max_length": 256, "eval_fraction": 0.05,
                 "max_invalid_fraction": 0.5},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 4, "eval_every": 2, "log_every": 2},
        "scaling": {"num_workers": 1, "max_failures": 0},
        # a named model gets the pretrained-model lr range; this tiny one keeps its own
        "sweep": {**TINY_MODEL_PRESET["sweep"], "num_samples": 1, "max_concurrent_trials": 1, "seed": 7, **sweep},
        "output_dir": str(output_dir),
    }


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for_free_cpus(ray, expected: float, timeout_s: float = 60.0) -> float:
    """Available CPUs once they return to ``expected`` (or whatever they are at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= expected - 1e-6 or time.monotonic() > deadline:
            return free
        time.sleep(1.0)


# ------------------------------------------------------------------------------------ fast tests


def test_param_space_searches_beta_and_lr_log_uniformly_and_grids_extra_keys():
    from ray.tune.search.sample import Float

    cfg = config_from_dict({"sweep": {"beta_min": 0.01, "beta_max": 0.4, "lr_min": 1e-5, "lr_max": 1e-3,
                                      "extra": {"train.warmup_steps": [0, 5]}}})
    space = sweep_space.build_param_space(cfg)
    assert space.keys() == {"dpo", "train"} and space["train"].keys() == {"learning_rate", "warmup_steps"}
    assert space["train"]["warmup_steps"] == {"grid_search": [0, 5]}
    beta, lr = space["dpo"]["beta"], space["train"]["learning_rate"]
    assert isinstance(beta, Float) and (beta.lower, beta.upper) == (0.01, 0.4)
    assert type(beta.get_sampler()).__name__ == "_LogUniform"
    assert (lr.lower, lr.upper) == (1e-5, 1e-3) and type(lr.get_sampler()).__name__ == "_LogUniform"
    assert sweep_space.count_trials(cfg) == cfg.sweep.num_samples * 2


def test_param_space_grids_beta_when_asked():
    cfg = config_from_dict({"sweep": {"beta_search": "grid", "beta_grid": [0.1, 0.3], "num_samples": 2}})
    assert sweep_space.build_param_space(cfg)["dpo"]["beta"] == {"grid_search": [0.1, 0.3]}
    assert sweep_space.count_trials(cfg) == 4  # each grid point with 2 sampled learning rates


def test_trial_config_applies_sampled_keys_and_gets_its_own_output_dir(tmp_path):
    base = config_from_dict({"output_dir": str(tmp_path / "sweep"), "storage_path": ""}).to_dict()
    sampled = {"dpo": {"beta": 0.37}, "train": {"learning_rate": 2e-4}, "model": {"lora": {"r": 4}}}
    cfg = sweep_space.build_trial_config(base, sampled,
                                       "abc_00001", str(tmp_path / "sweep"), str(tmp_path / "cache"))
    assert cfg.dpo.beta == 0.37 and cfg.train.learning_rate == 2e-4 and cfg.model.lora.r == 4
    assert cfg.run_name == "abc_00001"
    assert cfg.resolved_output_dir() == (tmp_path / "sweep" / "trials" / "abc_00001").resolve()
    assert cfg.resolved_cache_dir() == (tmp_path / "cache").resolve()
    assert cfg.resolved_storage_path() == str(cfg.resolved_output_dir() / "ray_results")


def test_extra_keys_that_change_shared_preparation_or_have_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="sweep.extra.data.max_length"):
        sweep_space.validate_sweep_keys(config_from_dict({"sweep": {"extra": {"data.max_length": [128, 256]}}}))
    with pytest.raises(ConfigError, match="sweep.extra.dpo.reference"):
        sweep_space.validate_sweep_keys(config_from_dict({"sweep": {"extra": {"dpo.reference": ["model"]}}}))
    with pytest.raises(ConfigError, match="train.max_grad_norm"):
        sweep_space.validate_sweep_keys(config_from_dict({"sweep": {"extra": {"train.max_grad_norm": [1.0, -1.0]}}}))
    sweep_space.validate_sweep_keys(config_from_dict({"sweep": {"extra": {"dpo.loss_type": ["sigmoid", "ipo"]}}}))


def test_best_trial_is_the_most_accurate_one_that_finished_training():
    rows = [
        {"trial_id": "a", "eval_accuracy": 0.9, "eval_loss": 0.5, "final_model_dir": "", "status": "TERMINATED"},
        {"trial_id": "b", "eval_accuracy": 0.7, "eval_loss": 0.6, "final_model_dir": "/b", "status": "TERMINATED"},
        {"trial_id": "c", "eval_accuracy": 0.7, "eval_loss": 0.4, "final_model_dir": "/c", "status": "TERMINATED"},
        {"trial_id": "d", "eval_accuracy": None, "eval_loss": None, "final_model_dir": "", "status": "ERROR"},
    ]
    assert results.select_best_row(rows)["trial_id"] == "c"  # a was stopped early; c beats b on loss
    assert results.select_best_row(rows[3:]) is None


def test_resume_refuses_a_different_config(tmp_path):
    cfg = config_from_dict({"output_dir": str(tmp_path / "sweep")})
    cfg.resolved_output_dir().mkdir(parents=True)
    (cfg.resolved_output_dir() / preflight.SWEEP_CONFIG_FILE).write_text(cfg.to_yaml())
    preflight.check_resume_matches(cfg)
    changed = config_from_dict({"output_dir": str(tmp_path / "sweep"), "sweep": {"num_samples": 9}})
    with pytest.raises(ConfigError, match="sweep.num_samples"):
        preflight.check_resume_matches(changed)
    # how the local Ray instance is started (ray.*) does not change what the trials compute
    hosted = config_from_dict({"output_dir": str(tmp_path / "sweep"), "ray": {"include_dashboard": True}})
    preflight.check_resume_matches(hosted)
    assert "ray" not in hosted.to_result_dict() and hosted.to_result_dict()["sweep"] == cfg.to_dict()["sweep"]


def size(resources: dict, *overrides: str) -> tuple[int, int]:
    sizing = preflight.choose_sweep_sizing(build_config(None, list(overrides)), resources)
    return sizing.concurrent_trials, sizing.workers_per_trial


def test_auto_sizing_fits_the_default_sweep_to_the_cluster():
    # 2 CPUs: one trial with the default 2 workers needs 0.25 + 2 CPUs, so 1 worker per trial; such a trial trains
    # in its own process on 1 CPU, so 2 trials at once
    assert size({"CPU": 2.0}) == (2, 1)
    assert size({"CPU": 2.0}, "sweep.train_in_trial=false") == (1, 1)  # 0.25 + 1 CPUs per trial
    assert "scaling.num_workers=2 would need (0.25 + 2 x 1) CPUs" in preflight.choose_sweep_sizing(
        build_config(), {"CPU": 2.0}).reason
    assert size({"CPU": 16.0}) == (4, 2)  # all 4 trials, each 2.25 CPUs
    assert size({"CPU": 16.0}, "sweep.num_samples=16") == (7, 2)  # 7 x 2.25 <= 16: every started trial trains
    assert size({"CPU": 4.0}, "scaling.num_workers=4") == (1, 2)  # 3 fits too but does not divide batch_size 16
    assert size({"CPU": 16.0, "GPU": 1.0}, "scaling.use_gpu=true") == (1, 1)  # GPUs bound both
    assert size({"CPU": 1.0}, "scaling.allow_autoscale=true") == (2, 2)  # a growing cluster: not sized from now


def test_values_the_user_set_are_kept_and_one_that_cannot_fit_is_refused():
    assert size({"CPU": 16.0}, "sweep.max_concurrent_trials=3", "sweep.workers_per_trial=3",
                "train.batch_size=12") == (3, 3)
    assert size({"CPU": 2.0}, "sweep.max_concurrent_trials=2") == (2, 1)  # workers still auto: lowered
    # 8 trials x 0.25 CPU would hold both CPUs: no trial's worker group could ever start
    cfg = build_config(None, ["scaling.num_workers=1", "sweep.num_samples=8", "sweep.max_concurrent_trials=8",
                              "sweep.train_in_trial=false"])
    with pytest.raises(ConfigError, match="'sweep.max_concurrent_trials': 8 concurrent trials"):
        preflight.check_sweep_fits(preflight.size_sweep_config(cfg, {"CPU": 2.0}), {"CPU": 2.0})
    # trials that train in their own process hold all they need: those that do not fit wait their turn
    in_trial = preflight.size_sweep_config(derive_config(cfg, {"sweep.train_in_trial": True}), {"CPU": 2.0})
    preflight.check_sweep_fits(in_trial, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="'scaling.cpus_per_worker': one trial needs 4 CPUs but the cluster has 2"):
        preflight.check_sweep_fits(derive_config(in_trial, {"scaling.cpus_per_worker": 4.0}), {"CPU": 2.0})
    explicit_workers = build_config(None, ["sweep.workers_per_trial=2"])
    assert preflight.choose_sweep_sizing(explicit_workers, {"CPU": 2.0}).workers_per_trial == 2
    with pytest.raises(ConfigError, match=r"'sweep.workers_per_trial': one trial needs 2.25 CPUs .* cluster has 2 "):
        preflight.check_sweep_fits(preflight.size_sweep_config(explicit_workers, {"CPU": 2.0}), {"CPU": 2.0})


def test_a_sweep_refuses_trials_without_a_worker_group(monkeypatch):
    """Ray 2.60 refuses ray.train calls inside a Tune trial, so no trial may train in the driver's local mode."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match="'scaling.num_workers': 0 .* set sweep.workers_per_trial=1"):
        preflight.size_sweep(build_config(None, ["scaling.num_workers=0"]))
    with pytest.raises(ConfigError, match="'sweep.workers_per_trial': must be auto or >= 1; got 0"):
        build_config(None, ["sweep.workers_per_trial=0"])
    assert preflight.size_sweep(build_config(None, ["scaling.num_workers=0", "sweep.workers_per_trial=1"])
                                ).scaling.num_workers == 1


def test_the_sweep_is_sized_once_from_the_cluster_and_logged(monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # a 2-core machine, no Ray needed
    with caplog.at_level("INFO", logger="dpo_ray"):
        sized = preflight.size_sweep(build_config())  # python workflows/sweep.py with no --config
    assert (sized.sweep.max_concurrent_trials, sized.sweep.workers_per_trial, sized.scaling.num_workers) == (2, 1, 1)
    assert "sweep sizing: 2 trial(s) at once (auto: 2 trial(s) x 1 CPUs (one worker, in the trial's process) " \
        "fit in 2 CPUs)" in caplog.text


def test_a_one_worker_ddp_trial_trains_in_its_own_process_holding_the_workers_resources():
    from dpo_ray.sweep.trial import build_trial_resources

    def sized(*overrides: str):
        return build_config(None, ["sweep.workers_per_trial=1", *overrides])

    assert preflight.trains_in_trial(sized()) and build_trial_resources(sized()) == {"CPU": 1.0}
    assert build_trial_resources(sized("scaling.use_gpu=true", "scaling.cpus_per_worker=4")) == {"CPU": 4.0,
                                                                                                 "GPU": 1.0}
    for other in (sized("train.strategy=fsdp", "scaling.use_gpu=true"), sized("sweep.train_in_trial=false"),
                  build_config(None, ["sweep.workers_per_trial=2"])):
        assert not preflight.trains_in_trial(other) and build_trial_resources(other) == {"CPU": 0.25}, other.sweep
    # only a sweep whose trials may get worker groups needs the State API (so a local dashboard)
    assert not preflight.needs_state_api(build_config(None, ["scaling.num_workers=1"]))
    assert preflight.needs_state_api(build_config())  # auto workers: up to scaling.num_workers=2
    assert preflight.needs_state_api(build_config(None, ["scaling.num_workers=1", "sweep.train_in_trial=false"]))


def test_only_live_groups_of_finished_jobs_count_as_leaked():
    from types import SimpleNamespace as Record

    from dpo_ray.ray_compat import find_leaked_placement_groups

    jobs = [Record(job_id="01000000", status="RUNNING"), Record(job_id="02000000", status="SUCCEEDED"),
            Record(job_id="03000000", status="FAILED")]
    groups = [
        Record(placement_group_id="a", creator_job_id="02000000", is_detached=False, state="CREATED"),  # leaked
        Record(placement_group_id="b", creator_job_id="03000000", is_detached=False, state="PENDING"),  # leaked
        Record(placement_group_id="c", creator_job_id="01000000", is_detached=False, state="CREATED"),  # job alive
        Record(placement_group_id="d", creator_job_id="02000000", is_detached=True, state="CREATED"),  # detached
        Record(placement_group_id="e", creator_job_id="02000000", is_detached=False, state="REMOVED"),  # gone
    ]
    assert find_leaked_placement_groups(groups, jobs) == ["a", "b"]


def test_a_group_whose_job_finished_is_released_and_its_cpus_come_back(ray_session, monkeypatch):
    """The leak itself is a race in Ray (a group created as its driver stops); here the job is reported
    finished while its group lives, and the real group is removed through the State API's records."""
    import dataclasses

    from ray.util.placement_group import placement_group

    from dpo_ray.cluster import RUN_METADATA_KEY
    from dpo_ray.ray_compat import release_leaked_placement_groups

    # Earlier tests' actors may still be handing their CPUs back: start from an idle instance, so the
    # only change in free CPUs below is this test's group.
    total = ray_session.cluster_resources().get("CPU", 0.0)
    free = wait_for_free_cpus(ray_session, total)
    assert free == pytest.approx(total)
    group = placement_group([{"CPU": 0.5}])
    ray_session.get(group.ready(), timeout=60)
    assert release_leaked_placement_groups() == 0  # this job is running: its group is not touched
    assert ray_session.available_resources().get("CPU", 0.0) == pytest.approx(free - 0.5)

    import dpo_ray.ray_compat

    real_list_job_records = dpo_ray.ray_compat.list_job_records

    def jobs_with_this_one_finished():  # and marked as a dpo-ray run (the test session's driver is not)
        this = ray_session.get_runtime_context().get_job_id()
        return [dataclasses.replace(r, status="SUCCEEDED", metadata={RUN_METADATA_KEY: "/run"})
                if r.job_id == this else r for r in real_list_job_records()]

    monkeypatch.setattr(dpo_ray.ray_compat, "list_job_records", jobs_with_this_one_finished)
    assert release_leaked_placement_groups() == 1
    assert wait_for_free_cpus(ray_session, free) == pytest.approx(free)


# ------------------------------------------------------------------------------------ whole sweeps


@pytest.fixture(scope="module")
def first_sweep(ray_session, tiny_model_dir, tmp_path_factory) -> dict:
    """Three trials, one at a time (the third asks for flash attention 3, which is not installed here):
    started with ``workflows/sweep.py``, SIGTERM while the second trial runs, resumed with the same command."""
    root = tmp_path_factory.mktemp("sweeps")
    out = root / "sweep"
    config_path = root / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(build_sweep_dict(
        tiny_model_dir, root / "cache", out, asha=False,
        extra={"model.attn_implementation": ["sdpa", "eager", "flash_attention_3"]})))
    argv = ["--config", str(config_path)]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    log_path = root / "interrupted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "workflows/sweep.py", *argv], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while len(find_started_trials(out / "trials")) < 2:  # the second trial starts after the first ended
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the second trial never started"
                time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)  # handled like Ctrl-C: Tune saves its state
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    first, second = find_started_trials(out / "trials")
    interrupted = {
        "returncode": proc.returncode,
        "output": log_path.read_text(),
        "summary": json.loads((out / "sweep_summary.json").read_text()),
        "first": first,
        "second": second,
        "second_finished": (second / "summary.json").exists(),
        "first_finished": (first / "summary.json").exists(),
        "first_mtime": (first / "summary.json").stat().st_mtime_ns if (first / "summary.json").exists() else None,
        "first_result_lines": len(
            (out / "ray_results" / "sweep" / first.name / "result.json").read_text().splitlines()),
    }
    cfg = config_from_dict(yaml.safe_load(config_path.read_text()))
    start = time.perf_counter()
    summary = main_sweep(argv)  # the same command, in this process (same cluster)
    return {"cfg": cfg, "summary": summary, "seconds": time.perf_counter() - start, "interrupted": interrupted,
            "free_cpus": wait_for_free_cpus(ray_session, ray_session.cluster_resources()["CPU"])}


def find_started_trials(trials_dir: Path) -> list[Path]:
    return sorted(p.parent for p in trials_dir.glob("*/config.yaml"))


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_the_same_command_without_redoing_finished_trials(first_sweep):
    before = first_sweep["interrupted"]
    assert before["returncode"] == 130, before["output"][-3000:]
    assert "run the same command again to resume" in before["output"]
    assert before["summary"]["interrupted"] and before["summary"]["reference_passes"] == 1
    assert before["first_finished"] and not before["second_finished"]

    out = first_sweep["cfg"].resolved_output_dir()
    summary = first_sweep["summary"]
    assert summary["resumed"] and not summary["interrupted"]
    assert summary["reference_passes"] == 0 and summary["reference_passes_total"] == 1  # cached by the first run
    assert summary["invocations"] == 2
    first = before["first"]
    assert (first / "summary.json").stat().st_mtime_ns == before["first_mtime"]  # the finished trial did not run again
    assert len((out / "ray_results" / "sweep" / first.name / "result.json").read_text().splitlines()) == \
        before["first_result_lines"]
    assert (before["second"] / "summary.json").exists()


@pytest.mark.slow
def test_sweep_runs_more_trials_than_fit_at_once_and_writes_its_outputs(first_sweep):
    from transformers import AutoModelForCausalLM

    out = first_sweep["cfg"].resolved_output_dir()
    summary = first_sweep["summary"]
    rows = read_rows(out / "results.csv")
    assert len(rows) == 3 and summary["num_trials"] == 3 and not summary["interrupted"]
    assert set(BASE_COLUMNS + ["model.attn_implementation"]) <= set(rows[0])
    assert len({r["trial_id"] for r in rows}) == 3
    finished = [r for r in rows if r["status"] == "TERMINATED"]
    assert len(finished) == 2 and all(r["final_model_dir"] for r in finished)
    for r in finished:
        assert 0.0 <= float(r["eval_accuracy"]) <= 1.0
        assert 0.02 <= float(r["dpo.beta"]) <= 0.5 and 1e-4 <= float(r["train.learning_rate"]) <= 3e-3
        assert int(r["steps"]) >= 2

    best = json.loads((out / "best.json").read_text())
    assert best["trial_id"] in {r["trial_id"] for r in finished}
    assert best["metrics"]["eval_accuracy"] == max(float(r["eval_accuracy"]) for r in finished if r["final_model_dir"])
    assert best["config"]["dpo"]["beta"] == best["sampled"]["dpo.beta"]
    assert best["config"]["run_name"] == best["trial_id"]
    assert best["reference_passes"] == 0 and summary["reference_passes_total"] == 1
    assert best["wall_seconds"] > 0 and best["trial_train_seconds_sum"] > 0
    assert (out / "sweep_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(out / "best_model")
    assert model.config.num_hidden_layers == 2
    assert json.loads((out / "sweep_summary.json").read_text())["best"]["trial_id"] == best["trial_id"]


@pytest.mark.slow
def test_failed_trial_is_recorded_as_error_and_the_others_finish(first_sweep):
    rows = read_rows(first_sweep["cfg"].resolved_output_dir() / "results.csv")
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert [r["model.attn_implementation"] for r in failed] == ["flash_attention_3"]
    assert "FlashAttention3" in failed[0]["error"]
    assert first_sweep["summary"]["statuses"]["ERROR"] == 1
    assert all(r["status"] == "TERMINATED" for r in rows if r["model.attn_implementation"] != "flash_attention_3")


@pytest.mark.slow
def test_sweep_gives_back_every_cpu_when_it_ends(first_sweep, ray_session):
    assert first_sweep["free_cpus"] == pytest.approx(ray_session.cluster_resources()["CPU"])
