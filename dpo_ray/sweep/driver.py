"""The sweep: prepare once, run (or resume) the Tune experiment, write the outputs.

One sweep is one Tune experiment named ``sweep`` under the sweep's storage path
(``<output_dir>/ray_results/sweep`` unless ``storage_path`` says otherwise):

* The driver prepares the model and the data ONCE (tokenization and the reference pass), before the
  Tuner starts; every trial receives the same materialized datasets through ``tune.with_parameters``.
* Each trial (:func:`dpo_ray.sweep.trial.run_trial`) merges its sampled values onto the base config and
  trains: a one-worker trial in its own process, others with :func:`dpo_ray.trainer.run_dpo`. Every evaluation
  reaches Tune, so ASHA can stop weak trials on ``eval_accuracy``.
* A failed trial is recorded (status ERROR) and the sweep goes on; an interrupted sweep (Ctrl-C,
  SIGTERM) saves its state, and running the same command again resumes it without redoing finished
  trials. Trials that were running resume from their own latest Train checkpoint (same run name).
* Outputs in ``output_dir``: ``results.csv``, ``best.json``, ``sweep_summary.json``, ``best_model/``
  (Hugging Face directory of the best trial) and ``sweep_accuracy.png``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dpo_ray.config import Config
from dpo_ray.ray_compat import release_leaked_placement_groups, release_placement_groups_after_sweep
from dpo_ray.sweep.preflight import (
    SWEEP_CONFIG_FILE,
    check_resume_matches,
    needs_state_api,
    size_sweep,
    trains_in_trial,
)
from dpo_ray.sweep.results import build_rows, write_sweep_outputs
from dpo_ray.sweep.space import count_trials, validate_sweep_keys
from dpo_ray.sweep.trial import build_trainable, prepare_shared_inputs
from dpo_ray.sweep.tuner import build_tuner, can_resume, resolve_experiment_path, restore_tuner

logger = logging.getLogger("dpo_ray")


def run_sweep(cfg: Config) -> dict[str, Any]:
    """Prepare once, run (or resume) the Tune sweep, write the outputs; returns sweep_summary.json's content.

    The summary's ``interrupted`` is True when Ctrl-C/SIGTERM stopped the sweep before every trial
    finished; running the same config again resumes it.
    """
    start = time.perf_counter()
    validate_sweep_keys(cfg)
    out = cfg.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    resumed = can_resume(cfg)
    if resumed:
        check_resume_matches(cfg)
    if needs_state_api(cfg):  # only Ray Train worker groups leave placement groups behind
        release_leaked_placement_groups()  # e.g. left by the interrupted run this one resumes
    sized = size_sweep(cfg)  # the config as given (auto included) is the one a resume must match
    shared = prepare_shared_inputs(sized)
    logger.info("prepared once for all trials: %d train / %d eval pairs, %d reference pass(es)",
                shared.prepared.train_pairs, shared.prepared.eval_pairs, shared.prepared.reference_passes)
    trainable = build_trainable(sized, shared)
    if resumed:
        logger.info("resuming the sweep in %s", resolve_experiment_path(sized))
        tuner = restore_tuner(sized, trainable)
    else:
        (out / SWEEP_CONFIG_FILE).write_text(cfg.to_yaml())
        logger.info("starting a sweep of %d trials (at most %d at once) in %s", count_trials(sized),
                    sized.sweep.max_concurrent_trials, resolve_experiment_path(sized))
        tuner = build_tuner(sized, trainable)
    grid = tuner.fit()
    if not trains_in_trial(sized):
        release_placement_groups_after_sweep()
    return write_sweep_outputs(sized, build_rows(grid, sized), shared.prepared.reference_passes,
                               time.perf_counter() - start, resumed)
