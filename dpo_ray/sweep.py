"""Hyperparameter sweeps with Ray Tune over DPO's beta and learning rate.

One sweep is one Tune experiment named ``sweep`` under the sweep's storage path
(``<output_dir>/ray_results/sweep`` unless ``storage_path`` says otherwise):

* The driver prepares the model and the data ONCE (tokenization and the reference pass), before the
  Tuner starts; every trial receives the same materialized datasets through ``tune.with_parameters``.
* Each trial is a Tune function trainable (:func:`run_trial`): it builds the trial's Config from the
  base config plus the sampled keys (dotted paths), then trains with :func:`dpo_ray.trainer.run_dpo`,
  which builds a Ray Train ``TorchTrainer``. ``TuneReportCallback`` forwards every evaluation to Tune,
  so ASHA can stop weak trials on ``eval_accuracy``.
* A failed trial is recorded (status ERROR) and the sweep goes on; an interrupted sweep (Ctrl-C,
  SIGTERM) saves its state, and running the same command again resumes it without redoing finished
  trials. Trials that were running resume from their own latest Train checkpoint (same run name).
* Outputs in ``output_dir``: ``results.csv``, ``best.json``, ``sweep_summary.json``, ``best_model/``
  (Hugging Face directory of the best trial) and ``sweep_accuracy.png``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from ray import tune

from dpo_ray.cluster import release_leaked_placement_groups
from dpo_ray.config import Config, ConfigError, config_from_dict

logger = logging.getLogger("dpo_ray")

METRIC = "eval_accuracy"  # held-out preference accuracy: the quantity the sweep maximizes
MODE = "max"
BETA_KEY = "dpo.beta"
LR_KEY = "train.learning_rate"
EXPERIMENT_NAME = "sweep"  # Tune experiment directory under the storage path
TRIALS_DIR = "trials"  # <output_dir>/trials/<trial_id>: each trial's run_dpo output
RESULTS_FILE = "results.csv"
BEST_FILE = "best.json"
SUMMARY_FILE = "sweep_summary.json"
PLOT_FILE = "sweep_accuracy.png"
BEST_MODEL_DIR = "best_model"
SWEEP_CONFIG_FILE = "sweep_config.yaml"  # the config the sweep started with; a resume must match it
ASHA_REDUCTION_FACTOR = 2  # small sweeps: keep the better half at each rung
ASHA_MAX_T = 10_000  # far beyond any sweep's evaluation count: no trial is cut at its last report for reaching max_t

# Extra grid keys that would change what the driver prepared once for all trials (tokenized data,
# reference log-probs, the model) or the sweep's own bookkeeping.
SHARED_PREFIXES = ("data.", "model.name_or_path", "model.tiny", "model.trust_remote_code", "dpo.reference",
                   "sweep.", "output_dir", "run_name", "storage_path")

RESULT_COLUMNS = ("trial_id", "beta", "learning_rate")
METRIC_COLUMNS = ("eval_accuracy", "eval_loss", "eval_reward_margin", "steps", "evaluations", "status",
                  "early_stopped", "train_seconds", "trial_seconds", "final_model_dir", "checkpoint_path", "error")


@dataclass
class SharedInputs:
    """What the driver prepares once and hands to every trial."""

    model_path: str
    prepared: Any  # dpo_ray.data.pipeline.PreparedData


# ------------------------------------------------------------------------------------ search space


def validate_sweep_keys(cfg: Config) -> None:
    """Reject extra grid keys that cannot vary per trial, and grid values that do not build a valid config."""
    base = cfg.to_dict()
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
                config_from_dict(apply_dotted_values(base, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"config key 'sweep.extra.{key}': value {value!r} is invalid: {exc}") from None


def build_param_space(cfg: Config) -> dict[str, Any]:
    """Tune's search space keyed by dotted config paths.

    beta is log-uniform in [beta_min, beta_max] (or a grid over beta_grid), the learning rate is
    log-uniform in [lr_min, lr_max]; every ``sweep.extra`` key is a grid (an extra entry for
    ``dpo.beta`` or ``train.learning_rate`` replaces that key's search).
    """
    sweep = cfg.sweep
    space: dict[str, Any] = {
        BETA_KEY: tune.grid_search(list(sweep.beta_grid)) if sweep.beta_search == "grid"
        else tune.loguniform(sweep.beta_min, sweep.beta_max),
        LR_KEY: tune.loguniform(sweep.lr_min, sweep.lr_max),
    }
    for key, values in sweep.extra.items():
        space[key] = tune.grid_search(list(values))
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


def apply_dotted_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``base`` with each ``section.key`` of ``values`` set."""
    tree = json.loads(json.dumps(base))
    for dotted, value in values.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def build_trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_id: str, sweep_output_dir: str,
                       cache_dir: str) -> Config:
    """The trial's Config: base + sampled keys, its own output dir and run name (= trial id)."""
    tree = apply_dotted_values(base, sampled)
    tree["output_dir"] = str(Path(sweep_output_dir) / TRIALS_DIR / trial_id)
    tree["run_name"] = trial_id
    tree.setdefault("data", {})["cache_dir"] = cache_dir
    return config_from_dict(tree)


# ------------------------------------------------------------------------------------ the trial


def run_trial(config: dict[str, Any], base_config: dict[str, Any], sweep_output_dir: str, cache_dir: str,
              shared: SharedInputs) -> None:
    """Tune function trainable: train one DPO run with the sampled values and report to Tune.

    Reports reach Tune through ``TuneReportCallback`` (rank 0's ``ray.train.report`` at each
    evaluation). An exception here marks the trial ERROR; the sweep goes on.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from dpo_ray.trainer import run_dpo

    trial_id = tune.get_context().get_trial_id()
    cfg = build_trial_config(base_config, config, trial_id, sweep_output_dir, cache_dir)
    run_dpo(cfg, callbacks=[TuneReportCallback()], prepared=shared.prepared, model_path=shared.model_path)


def name_trial_dir(trial) -> str:
    """Tune trial directories are named by trial id, like the trials' output directories."""
    return trial.trial_id


# ------------------------------------------------------------------------------------ freeing resources

TRAIN_WORKER_CLASS = "RayTrainWorker"


def is_owner_death(actor) -> bool:
    """True when an actor died because its owner died (its Train controller was killed), not by a clean shutdown."""
    cause = actor.death_cause or {}
    context = cause.get("actor_died_error_context") or {}
    return context.get("reason") == "OWNER_DIED"


def find_train_placement_groups() -> tuple[list[str], list[str]]:
    """This job's live placement groups that hold Ray Train workers: (orphaned ids, ids still in use).

    A group is orphaned when every Train worker that ran in it is dead because its owner (the Train
    controller) died: the controller was killed before it could remove the group.
    """
    import ray
    from ray.util.state import list_actors, list_placement_groups

    ctx = ray.get_runtime_context()
    groups = list_placement_groups(address=ctx.gcs_address, filters=[("state", "=", "CREATED")], limit=10_000,
                                   raise_on_missing_output=False)
    groups = [g.placement_group_id for g in groups if g.creator_job_id == ctx.get_job_id()]
    if not groups:
        return [], []
    workers = list_actors(address=ctx.gcs_address, filters=[("class_name", "=", TRAIN_WORKER_CLASS)], detail=True,
                          limit=10_000, raise_on_missing_output=False)
    members: dict[str, list] = {}
    for w in workers:
        if w.placement_group_id:
            members.setdefault(w.placement_group_id, []).append(w)
    orphaned, in_use = [], []
    for group in groups:
        if group not in members:
            continue  # not a Train worker group, or its workers are still starting
        if all(w.state == "DEAD" and is_owner_death(w) for w in members[group]):
            orphaned.append(group)
        else:
            in_use.append(group)
    return orphaned, in_use


def release_orphaned_train_placement_groups() -> int:
    """Remove this job's Train worker placement groups whose controller was killed; returns how many.

    When ASHA stops a trial, Tune ends the trial's actor and its Train controller dies with it, before
    removing its workers' placement group. Ray Train's detached PlacementGroupCleaner normally frees
    it, but its State API lookup has no address and fails when more than one Ray instance runs on the
    machine ("Found multiple active Ray instances"); the next trial then waits for CPUs forever. This
    driver-side check passes this cluster's address explicitly.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    orphaned, _ = find_train_placement_groups()
    for group in orphaned:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
        logger.info("released placement group %s left by a stopped trial", group)
    return len(orphaned)


def release_placement_groups_after_sweep(timeout_s: float = 30.0) -> int:
    """Once the sweep is over, wait (briefly) for stopped trials' workers to die and free their groups.

    Without this, the last trial ASHA stopped would hold its CPUs until the driver exits.
    """
    deadline = time.monotonic() + timeout_s
    released = 0
    try:
        while True:
            released += release_orphaned_train_placement_groups()
            _, in_use = find_train_placement_groups()
            if not in_use or time.monotonic() > deadline:
                return released
            time.sleep(1.0)
    except Exception as exc:  # no dashboard / State API: Ray Train's own cleaner is all there is
        logger.warning("cannot check for placement groups left by stopped trials: %s", exc)
        return released


class PlacementGroupReleaser(tune.Callback):
    """Tune callback: for a while after each trial ends, frees the Train placement groups it left behind."""

    interval_s = 3.0  # the controller and its workers take a moment to be reported dead
    window_s = 90.0  # stop looking this long after the last trial ended

    def __init__(self):
        self._until = 0.0
        self._next = 0.0
        self._broken = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._until = time.monotonic() + self.window_s

    def on_trial_error(self, iteration, trials, trial, **info):
        self._until = time.monotonic() + self.window_s

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if self._broken or now > self._until or now < self._next:
            return
        self._next = now + self.interval_s
        try:
            release_orphaned_train_placement_groups()
        except Exception as exc:  # no dashboard / State API: Ray Train's own cleaner is all there is
            logger.warning("cannot check for placement groups left by stopped trials: %s", exc)
            self._broken = True


# ------------------------------------------------------------------------------------ Tune objects


def build_scheduler(cfg: Config):
    """ASHA on eval accuracy, one rung per ``training_iteration`` (= evaluation), or None when off."""
    if not cfg.sweep.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(ASHA_MAX_T, cfg.sweep.asha_grace_period),
        grace_period=cfg.sweep.asha_grace_period,
        reduction_factor=ASHA_REDUCTION_FACTOR,
    )


def build_search_alg(cfg: Config):
    """Seeded random/grid search; the concurrency limit lives here (TuneConfig's is ignored with it)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.sweep.seed, max_concurrent=cfg.sweep.max_concurrent_trials)


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


def resolve_experiment_path(cfg: Config) -> str:
    """Where Tune keeps the sweep's state (local path or URI)."""
    storage = cfg.resolved_storage_path()
    return f"{storage.rstrip('/')}/{EXPERIMENT_NAME}"


def build_tuner(cfg: Config, trainable):
    """A new Tuner: search space, ASHA, seeded search, no retries of failed trials."""
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
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=cfg.resolved_storage_path(),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[PlacementGroupReleaser()],
        ),
    )


def restore_tuner(cfg: Config, trainable):
    """The interrupted sweep, resumed: finished and errored trials stay as they are."""
    return tune.Tuner.restore(resolve_experiment_path(cfg), trainable=trainable, resume_errored=False)


def can_resume(cfg: Config) -> bool:
    return tune.Tuner.can_restore(resolve_experiment_path(cfg))


# ------------------------------------------------------------------------------------ driver steps


def check_sweep_resources(cfg: Config) -> None:
    """Fail up front when concurrent trials could never all get their workers.

    Each running trial holds ``sweep.trial_cpus`` for its own function; if the trials' shares leave less
    than one trial's workers need, every trial waits for workers forever.
    """
    import ray

    from dpo_ray.cluster import check_cluster_resources

    check_cluster_resources(cfg)
    if cfg.scaling.allow_autoscale:
        return
    have = ray.cluster_resources().get("CPU", 0.0)
    concurrent = min(cfg.sweep.max_concurrent_trials, count_trials(cfg))
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    need = concurrent * cfg.sweep.trial_cpus + workers
    if need > have + 1e-9:
        raise ConfigError(
            f"config key 'sweep.max_concurrent_trials': {concurrent} concurrent trials x {cfg.sweep.trial_cpus:g} CPUs "
            f"plus one trial's workers ({workers:g} CPUs) need {need:g} CPUs but the cluster has {have:g} "
            f"(lower sweep.max_concurrent_trials, sweep.trial_cpus or scaling.num_workers)"
        )


def check_resume_matches(cfg: Config) -> None:
    """A resumed sweep must use the config it started with; otherwise trials would mix settings."""
    path = cfg.resolved_output_dir() / SWEEP_CONFIG_FILE
    if not path.exists():
        return
    saved = flatten_dict(yaml.safe_load(path.read_text()) or {})
    now = flatten_dict(cfg.to_dict())
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"config key '{differ[0]}': {cfg.resolved_output_dir()} holds a sweep started with a different config "
            f"(differs at: {', '.join(differ)}); run the same config to resume it, or use a new output_dir"
        )


def flatten_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"section.key": value}."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten_dict(v, key + "."))
        else:
            flat[key] = v
    return flat


def prepare_shared_inputs(cfg: Config) -> SharedInputs:
    """Model path and prepared data, once on the driver, for all trials (the reference pass runs here)."""
    from dpo_ray.data.pipeline import prepare_data
    from dpo_ray.trainer import prepare_model_path

    model_path = prepare_model_path(cfg)
    ref_path = model_path if cfg.dpo.reference == "precomputed" else None
    prepared = prepare_data(cfg, tokenizer_path=model_path, reference_model_path=ref_path)
    return SharedInputs(model_path=model_path, prepared=prepared)


@contextlib.contextmanager
def forward_sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM stops the sweep the way Ctrl-C does.

    While Tune runs, its SIGINT handler saves the experiment state and stops the trials; before that,
    SIGINT raises KeyboardInterrupt. Either way the driver ends cleanly and can say how to resume.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_trials(cfg: Config) -> list:
    """Every trial of the sweep as Tune saved it (status, config, last result, error file)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(resolve_experiment_path(cfg), default_metric=METRIC, default_mode=MODE)
    return sorted(analysis.trials, key=lambda t: t.trial_id)


# ------------------------------------------------------------------------------------ results


def read_error_line(trial) -> str:
    """The last line of a trial's error (the exception itself), or ''."""
    text = ""
    try:
        error = trial.get_error()
        text = str(error) if error is not None else ""
    except Exception:  # an unreadable error file must not break the summary
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def build_trial_row(trial, cfg: Config) -> dict[str, Any]:
    """One results.csv row: sampled values, last reported metrics, status and where the outputs are."""
    last = dict(trial.last_result or {})
    sampled = dict(trial.config or {})
    out_dir = cfg.resolved_output_dir() / TRIALS_DIR / trial.trial_id
    summary_path = out_dir / "summary.json"
    completed = trial.status == "TERMINATED" and summary_path.exists()
    row: dict[str, Any] = {
        "trial_id": trial.trial_id,
        "beta": sampled.get(BETA_KEY, cfg.dpo.beta),
        "learning_rate": sampled.get(LR_KEY, cfg.train.learning_rate),
    }
    for key in list_sampled_keys(cfg)[2:]:
        row[key] = sampled.get(key)
    row.update(
        {
            "eval_accuracy": last.get("eval_accuracy"),
            "eval_loss": last.get("eval_loss"),
            "eval_reward_margin": last.get("eval_reward_margin"),
            "steps": last.get("step"),
            "evaluations": last.get("training_iteration"),
            "status": trial.status,
            "early_stopped": trial.status == "TERMINATED" and not completed,
            "train_seconds": last.get("train_seconds"),
            "trial_seconds": last.get("time_total_s"),
            "final_model_dir": str(out_dir / "final_model") if completed else "",
            "checkpoint_path": last.get("checkpoint_path", ""),
            "error": read_error_line(trial) if trial.status == "ERROR" else "",
        }
    )
    return row


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(rows[0].keys()) if rows else list(RESULT_COLUMNS + METRIC_COLUMNS)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def select_best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest final eval accuracy among those that finished training (lower loss breaks ties).

    Trials ASHA stopped early are left out: their last accuracy comes from an earlier evaluation and
    they have no final model.
    """
    done = [r for r in rows if r["final_model_dir"] and is_number(r["eval_accuracy"])]
    if not done:
        return None
    return max(done, key=lambda r: (r["eval_accuracy"], -(r["eval_loss"] if is_number(r["eval_loss"]) else math.inf)))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def export_best_model(best: dict[str, Any], out_dir: Path) -> Path:
    """Copy the best trial's final model (a Hugging Face directory) to ``<output_dir>/best_model``."""
    from dpo_ray.checkpointing import copy_model_dir

    return copy_model_dir(Path(best["final_model_dir"]), out_dir / BEST_MODEL_DIR)


def plot_accuracy_map(rows: list[dict[str, Any]], path: Path, best_id: str | None) -> Path:
    """Scatter of eval accuracy over beta x learning rate (log axes), each point annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 5))
    scored = [r for r in rows if is_number(r["eval_accuracy"])]
    if scored:
        points = ax.scatter([r["beta"] for r in scored], [r["learning_rate"] for r in scored],
                            c=[r["eval_accuracy"] for r in scored], cmap="viridis", s=120, edgecolors="black")
        fig.colorbar(points, ax=ax, label="eval accuracy")
        for r in scored:
            label = f"{r['eval_accuracy']:.3f}" + (" (stopped)" if r["early_stopped"] else "")
            ax.annotate(label, (r["beta"], r["learning_rate"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    failed = [r for r in rows if r["status"] == "ERROR"]
    if failed:
        ax.scatter([r["beta"] for r in failed], [r["learning_rate"] for r in failed], marker="x", c="red", s=80,
                   label="failed")
        ax.legend(loc="best")
    best = next((r for r in rows if r["trial_id"] == best_id), None)
    if best is not None:
        ax.scatter([best["beta"]], [best["learning_rate"]], marker="*", s=400, facecolors="none", edgecolors="red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(x=0.25, y=0.25)  # room for the labels of the outermost points
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on short log ranges
        axis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation())
    ax.set_xlabel("beta (dpo.beta)")
    ax.set_ylabel("learning rate (train.learning_rate)")
    ax.set_title(f"DPO sweep: held-out preference accuracy ({len(rows)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize_statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        key = "EARLY_STOPPED" if r["early_stopped"] else r["status"]
        counts[key] = counts.get(key, 0) + 1
    return counts


def build_best_record(cfg: Config, best: dict[str, Any], best_model_dir: Path, timing: dict[str, Any],
                      reference_passes: int) -> dict[str, Any]:
    """best.json: the winning trial's full config, metrics, checkpoint and the sweep's cost."""
    trial_config = cfg.resolved_output_dir() / TRIALS_DIR / best["trial_id"] / "config.yaml"  # written by run_dpo
    return {
        "trial_id": best["trial_id"],
        "sampled": {k: (best["beta"] if k == BETA_KEY else best["learning_rate"] if k == LR_KEY else best[k])
                    for k in list_sampled_keys(cfg)},
        "metrics": {k: best[k] for k in ("eval_accuracy", "eval_loss", "eval_reward_margin", "steps", "evaluations")},
        "checkpoint_path": best["checkpoint_path"],
        "best_model_dir": str(best_model_dir),
        "reference_passes": reference_passes,
        **timing,
        "config": yaml.safe_load(trial_config.read_text()),
    }


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def build_timing(rows: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    return {
        "wall_seconds": round(wall_seconds, 2),
        "trial_train_seconds_sum": round(sum(r["train_seconds"] for r in rows if is_number(r["train_seconds"])), 2),
        "trial_seconds_sum": round(sum(r["trial_seconds"] for r in rows if is_number(r["trial_seconds"])), 2),
    }


def read_previous_totals(out_dir: Path, resumed: bool) -> dict[str, Any]:
    """Totals over the earlier invocations of a resumed sweep (from its last sweep_summary.json)."""
    path = out_dir / SUMMARY_FILE
    if not resumed or not path.exists():
        return {"invocations": 0, "reference_passes_total": 0, "wall_seconds_total": 0.0}
    previous = json.loads(path.read_text())
    return {
        "invocations": previous.get("invocations", 1),
        "reference_passes_total": previous.get("reference_passes_total", previous.get("reference_passes", 0)),
        "wall_seconds_total": previous.get("wall_seconds_total", previous.get("wall_seconds", 0.0)),
    }


def write_sweep_outputs(cfg: Config, rows: list[dict[str, Any]], reference_passes: int, wall_seconds: float,
                        resumed: bool, interrupted: bool) -> dict[str, Any]:
    """results.csv always; best.json, best_model/ and the plot once the sweep has finished.

    ``reference_passes`` and ``wall_seconds`` are this invocation's; the ``*_total`` keys add up every
    invocation of a resumed sweep.
    """
    out = cfg.resolved_output_dir()
    timing = build_timing(rows, wall_seconds)
    before = read_previous_totals(out, resumed)
    timing.update({
        "invocations": before["invocations"] + 1,
        "reference_passes_total": before["reference_passes_total"] + reference_passes,
        "wall_seconds_total": round(before["wall_seconds_total"] + wall_seconds, 2),
    })
    summary: dict[str, Any] = {
        "experiment_path": resolve_experiment_path(cfg),
        "num_trials": len(rows),
        "statuses": summarize_statuses(rows),
        "reference_passes": reference_passes,
        **timing,
        "resumed": resumed,
        "interrupted": interrupted,
        "results_csv": str(write_results_csv(rows, out / RESULTS_FILE)),
        "best": None,
    }
    if not interrupted:
        best = select_best_row(rows)
        summary["plot"] = str(plot_accuracy_map(rows, out / PLOT_FILE, best["trial_id"] if best else None))
        if best is not None:
            best_dir = export_best_model(best, out)
            record = build_best_record(cfg, best, best_dir, timing, reference_passes)
            summary["best"] = {k: record[k] for k in ("trial_id", "sampled", "metrics", "best_model_dir")}
            summary["best_json"] = str(write_json(record, out / BEST_FILE))
    write_json(summary, out / SUMMARY_FILE)
    return summary


# ------------------------------------------------------------------------------------ the sweep


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
    release_leaked_placement_groups()  # e.g. left by the interrupted run this one resumes
    check_sweep_resources(cfg)
    shared = prepare_shared_inputs(cfg)
    logger.info("prepared once for all trials: %d train / %d eval pairs, %d reference pass(es)",
                shared.prepared.train_pairs, shared.prepared.eval_pairs, shared.prepared.reference_passes)
    trainable = build_trainable(cfg, shared)
    if resumed:
        logger.info("resuming the sweep in %s", resolve_experiment_path(cfg))
        tuner = restore_tuner(cfg, trainable)
    else:
        (out / SWEEP_CONFIG_FILE).write_text(cfg.to_yaml())
        logger.info("starting a sweep of %d trials (at most %d at once) in %s", count_trials(cfg),
                    cfg.sweep.max_concurrent_trials, resolve_experiment_path(cfg))
        tuner = build_tuner(cfg, trainable)
    tuner.fit()
    release_placement_groups_after_sweep()
    rows = [build_trial_row(t, cfg) for t in load_trials(cfg)]
    interrupted = any(r["status"] not in ("TERMINATED", "ERROR") for r in rows)
    return write_sweep_outputs(cfg, rows, shared.prepared.reference_passes, time.perf_counter() - start,
                               resumed, interrupted)


# ------------------------------------------------------------------------------------ command line


def format_resume_hint(argv: list[str]) -> str:
    import shlex

    command = " ".join(["python", "workflows/sweep.py", *(shlex.quote(a) for a in argv)])
    return f"[dpo-ray] the sweep's state is saved; run the same command again to resume it:\n  {command}"


def format_sweep_summary(summary: dict[str, Any]) -> str:
    """The lines the workflow prints at the end: cost, reference passes, best trial, where the files are."""
    lines = [
        f"  trials                 {summary['num_trials']} ({', '.join(f'{k} {v}' for k, v in summary['statuses'].items())})",
        f"  reference passes       {summary['reference_passes']} (all invocations: {summary['reference_passes_total']})",
        f"  wall seconds           {summary['wall_seconds']} (all invocations: {summary['wall_seconds_total']})",
        f"  trial train seconds    {summary['trial_train_seconds_sum']} (sum over trials)",
        f"  trial seconds          {summary['trial_seconds_sum']} (sum over trials, incl. start-up)",
    ]
    best = summary.get("best")
    if best:
        sampled = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["sampled"].items())
        metrics = best["metrics"]
        lines += [
            f"  best trial             {best['trial_id']}: {sampled}",
            f"  best eval_accuracy     {metrics['eval_accuracy']:.4f} (loss {metrics['eval_loss']:.4f}, "
            f"margin {metrics['eval_reward_margin']:.4f}, {metrics['steps']} steps)",
            f"  best model             {best['best_model_dir']}",
            f"  best.json              {summary['best_json']}",
        ]
    lines += [f"  results.csv            {summary['results_csv']}"]
    if summary.get("plot"):
        lines.append(f"  accuracy plot          {summary['plot']}")
    lines.append(f"  sweep_summary.json     {Path(summary['results_csv']).parent / SUMMARY_FILE}")
    lines.append(f"  Tune experiment        {summary['experiment_path']}")
    return "\n".join(lines)


def main_sweep(argv: list[str] | None = None) -> dict[str, Any]:
    """``workflows/sweep.py``: parse, run (or resume) the sweep, print where the results are.

    Exit codes: 2 for a bad config or bad data, 130 when interrupted (state saved, same command
    resumes), 1 when no trial finished.
    """
    import sys

    from dpo_ray.cli import build_parser, exit_on_input_error, parse_config, print_config
    from dpo_ray.cluster import init_ray

    argv = list(sys.argv[1:] if argv is None else argv)
    _, cfg = parse_config(build_parser("Sweep DPO's beta and learning rate with Ray Tune."), argv)
    print_config(cfg)
    init_ray()
    try:
        with exit_on_input_error(), forward_sigterm_as_sigint():
            summary = run_sweep(cfg)
    except KeyboardInterrupt:
        print("[dpo-ray] sweep interrupted", file=sys.stderr)
        print(format_resume_hint(argv), file=sys.stderr)
        raise SystemExit(130) from None
    if summary["interrupted"]:
        print(f"[dpo-ray] sweep interrupted: {summary['statuses']}", file=sys.stderr)
        print(format_resume_hint(argv), file=sys.stderr)
        raise SystemExit(130)
    print("[dpo-ray] sweep done:\n" + format_sweep_summary(summary), flush=True)
    if summary["best"] is None:
        print("error: no trial finished training; see the error column of results.csv", file=sys.stderr)
        raise SystemExit(1)
    return summary
