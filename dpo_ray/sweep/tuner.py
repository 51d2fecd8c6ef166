"""The Tune objects: ASHA, the seeded search, a new or a restored Tuner."""

from __future__ import annotations

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from dpo_ray.config import Config
from dpo_ray.ray_compat import PlacementGroupReleaser
from dpo_ray.sweep.preflight import trains_in_trial
from dpo_ray.sweep.space import METRIC, MODE, build_param_space

EXPERIMENT_NAME = "sweep"  # Tune experiment directory under the storage path
ASHA_REDUCTION_FACTOR = 2  # small sweeps: keep the better half at each rung
ASHA_MAX_T = 10_000  # far beyond any sweep's evaluation count: no trial is cut at its last report for reaching max_t


def build_scheduler(cfg: Config) -> ASHAScheduler | None:
    """ASHA on eval accuracy, one rung per ``training_iteration`` (= evaluation), or None when off."""
    if not cfg.sweep.asha:
        return None
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(ASHA_MAX_T, cfg.sweep.asha_grace_period),
        grace_period=cfg.sweep.asha_grace_period,
        reduction_factor=ASHA_REDUCTION_FACTOR,
    )


def build_search_alg(cfg: Config) -> BasicVariantGenerator:
    """Seeded random/grid search; the concurrency limit lives here (TuneConfig's is ignored with it)."""
    return BasicVariantGenerator(random_state=cfg.sweep.seed, max_concurrent=cfg.sweep.max_concurrent_trials)


def name_trial_dir(trial) -> str:
    """Tune trial directories are named by trial id, like the trials' output directories."""
    return trial.trial_id


def resolve_experiment_path(cfg: Config) -> str:
    """Where Tune keeps the sweep's state (local path or URI)."""
    return f"{cfg.resolved_storage_path().rstrip('/')}/{EXPERIMENT_NAME}"


def build_tuner(cfg: Config, trainable) -> tune.Tuner:
    """A new Tuner: the nested search space, ASHA, seeded search, no retries of failed trials."""
    return tune.Tuner(
        trainable,
        param_space=build_param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=cfg.sweep.num_samples,
            search_alg=build_search_alg(cfg),
            scheduler=build_scheduler(cfg),
            trial_dirname_creator=name_trial_dir,
            # the next trial that trains in its own process runs in the finished one's: no new process to start
            # and no torch or transformers to import again (seconds per trial on a small machine)
            reuse_actors=trains_in_trial(cfg),
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=cfg.resolved_storage_path(),
            failure_config=tune.FailureConfig(max_failures=0),
            # trials that train in their own process leave no worker group's placement group to free
            callbacks=[] if trains_in_trial(cfg) else [PlacementGroupReleaser()],
        ),
    )


def restore_tuner(cfg: Config, trainable) -> tune.Tuner:
    """The interrupted sweep, resumed: finished and errored trials stay as they are."""
    return tune.Tuner.restore(resolve_experiment_path(cfg), trainable=trainable, resume_errored=False)


def can_resume(cfg: Config) -> bool:
    return tune.Tuner.can_restore(resolve_experiment_path(cfg))
