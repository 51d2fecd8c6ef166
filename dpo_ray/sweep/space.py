"""The sweep's search space, nested like the config, and each trial's Config built from it once.

Tune's ``param_space`` is a nested dict of the config's own sections (``{"dpo": {"beta": ...}, "train":
{"learning_rate": ...}}`` plus ``sweep.extra``'s grid keys); Tune resolves it per trial, and the trial merges
the resolved values onto the base config. Results name the values by the config's dotted keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from dpo_ray.config import Config, ConfigError, config_from_dict, derive_config, set_dotted

METRIC = "eval_accuracy"  # held-out preference accuracy: the quantity the sweep maximizes
MODE = "max"
BETA_KEY = "dpo.beta"
LR_KEY = "train.learning_rate"
TRIALS_DIR = "trials"  # <output_dir>/trials/<trial_id>: each trial's run_dpo output

# Extra grid keys that would change what the driver prepared once for all trials (tokenized data,
# reference log-probs, the model) or the sweep's own bookkeeping.
SHARED_PREFIXES = ("data.", "model.name_or_path", "model.tiny", "model.trust_remote_code", "dpo.reference",
                   "sweep.", "output_dir", "run_name", "storage_path")


def validate_sweep_keys(cfg: Config) -> None:
    """Reject extra grid keys that cannot vary per trial, and grid values that do not build a valid config."""
    for key, values in cfg.sweep.extra.items():
        if any(key == p.rstrip(".") or key.startswith(p) for p in SHARED_PREFIXES):
            raise ConfigError(
                f"config key 'sweep.extra.{key}': cannot vary per trial; the model and data are prepared once "
                f"for the whole sweep (run one sweep per value instead)"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"config key 'sweep.extra.{key}': needs a non-empty list of values to grid over")
        for value in values:
            try:
                derive_config(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"config key 'sweep.extra.{key}': value {value!r} is invalid: {exc}") from None


def build_param_space(cfg: Config) -> dict[str, Any]:
    """Tune's search space, nested like the config.

    beta is log-uniform in [beta_min, beta_max] (or a grid over beta_grid), the learning rate is
    log-uniform in [lr_min, lr_max]; every ``sweep.extra`` key is a grid (an extra entry for
    ``dpo.beta`` or ``train.learning_rate`` replaces that key's search).
    """
    sweep = cfg.sweep
    space: dict[str, Any] = {}
    beta = (tune.grid_search(list(sweep.beta_grid)) if sweep.beta_search == "grid"
            else tune.loguniform(sweep.beta_min, sweep.beta_max))
    set_dotted(space, BETA_KEY, beta)
    set_dotted(space, LR_KEY, tune.loguniform(sweep.lr_min, sweep.lr_max))
    for key, values in sweep.extra.items():
        set_dotted(space, key, tune.grid_search(list(values)))
    return space


def count_trials(cfg: Config) -> int:
    """Trials the sweep will run: num_samples times the size of the grid."""
    grid = len(cfg.sweep.beta_grid) if cfg.sweep.beta_search == "grid" and BETA_KEY not in cfg.sweep.extra else 1
    for values in cfg.sweep.extra.values():
        grid *= len(values)
    return cfg.sweep.num_samples * grid


def list_sampled_keys(cfg: Config) -> list[str]:
    """The dotted keys that vary between trials, in results.csv order."""
    return [BETA_KEY, LR_KEY] + [k for k in cfg.sweep.extra if k not in (BETA_KEY, LR_KEY)]


def read_dotted(tree: dict[str, Any], key: str) -> Any:
    """``tree["a"]["b"]`` for ``key="a.b"``, or None where a section or the key is missing."""
    node: Any = tree
    for name in key.split("."):
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return node


def merge_nested(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with the leaves of the nested ``values`` set over it."""
    merged = dict(base)
    for key, value in values.items():
        merged[key] = merge_nested(base.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def build_trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_id: str, sweep_output_dir: str,
                       cache_dir: str) -> Config:
    """The trial's Config: the base config dict with the nested sampled values, its own output dir and run name."""
    tree = merge_nested(base, sampled)
    tree["output_dir"] = str(Path(sweep_output_dir) / TRIALS_DIR / trial_id)
    tree["run_name"] = trial_id
    tree["data"] = {**tree.get("data", {}), "cache_dir": cache_dir}
    return config_from_dict(tree)
