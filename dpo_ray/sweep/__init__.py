"""Hyperparameter sweeps with Ray Tune over DPO's beta and learning rate (see :mod:`dpo_ray.sweep.driver`).

space: the nested search space and each trial's Config; trial: the Tune function trainable; tuner: ASHA,
search and the Tuner; preflight: resource and resume checks; results: rows from the ResultGrid and the output
files; plot: the accuracy map; driver: :func:`run_sweep`.
"""

from dpo_ray.sweep.driver import run_sweep
from dpo_ray.sweep.results import SUMMARY_FILE

__all__ = ["SUMMARY_FILE", "run_sweep"]
