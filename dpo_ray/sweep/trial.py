"""One trial: the Tune function trainable that trains one DPO run on what the driver prepared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dpo_ray.config import Config
from dpo_ray.data.pipeline import PreparedData, prepare_data
from dpo_ray.sweep.space import build_trial_config
from dpo_ray.trainer import prepare_model_path, run_dpo


@dataclass
class SharedInputs:
    """What the driver prepares once and hands to every trial."""

    model_path: str
    prepared: PreparedData


def prepare_shared_inputs(cfg: Config) -> SharedInputs:
    """Model path and prepared data, once on the driver, for all trials (the reference pass runs here)."""
    model_path = prepare_model_path(cfg)
    ref_path = cfg.resolve_reference_path(model_path) if cfg.dpo.reference == "precomputed" else None
    prepared = prepare_data(cfg, tokenizer_path=model_path, reference_model_path=ref_path)
    return SharedInputs(model_path=model_path, prepared=prepared)


def run_trial(config: dict[str, Any], base_config: dict[str, Any], sweep_output_dir: str, cache_dir: str,
              shared: SharedInputs) -> None:
    """Tune function trainable: train one DPO run with the sampled values (``config``, nested) and report to Tune.

    Reports reach Tune through ``TuneReportCallback`` (rank 0's ``ray.train.report`` at each
    evaluation). An exception here marks the trial ERROR; the sweep goes on.
    """
    trial_id = tune.get_context().get_trial_id()
    cfg = build_trial_config(base_config, config, trial_id, sweep_output_dir, cache_dir)
    run_dpo(cfg, callbacks=[TuneReportCallback()], prepared=shared.prepared, model_path=shared.model_path)


def build_trainable(cfg: Config, shared: SharedInputs):
    """The trial function with the shared inputs in the object store and a small CPU share."""
    fn = tune.with_parameters(
        run_trial,
        base_config=cfg.to_dict(),
        sweep_output_dir=str(cfg.resolved_output_dir()),
        cache_dir=str(cfg.resolved_cache_dir()),
        shared=shared,
    )
    return tune.with_resources(fn, {"CPU": cfg.sweep.trial_cpus})
