"""One workflow over several seeds, and the mean and spread of its results.

A table from one seed on one machine is one sample: another seed (or another CPU) moves it by points.
:func:`run_over_seeds` runs a workflow (the demo, ``dpo-ray iterate``) once per seed ``train.seed + i``, each in
``<output_dir>/seed_<seed>``, as parallel Ray tasks when the cluster holds more than one run's CPUs at once, else
one after the other; :func:`aggregate_seeds` gives each metric's mean, sample standard deviation, min and max.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from dpo_ray.config import Config, derive_config

SEEDS_FILE = "seeds.json"


def derive_seed_configs(cfg: Config, count: int) -> list[Config]:
    """``count`` Configs: seeds ``train.seed + i``, each writing to ``<output_dir>/seed_<seed>``."""
    out = cfg.resolved_output_dir()
    seeds = [cfg.train.seed + i for i in range(count)]
    return [derive_config(cfg, {"train.seed": seed, "output_dir": str(out / f"seed_{seed}")}) for seed in seeds]


def count_parallel_runs(cpus_per_run: float, cluster_cpus: float) -> int:
    """How many runs fit in the cluster at once (at least one)."""
    return max(1, int(cluster_cpus // max(cpus_per_run, 1e-9)))


def run_over_seeds(cfgs: Sequence[Config], run_one: Callable[[Config], dict], cpus_per_run: float) -> list[dict]:
    """``run_one(cfg)`` for each Config, in order of ``cfgs``; parallel Ray tasks where the cores allow.

    A run's own Ray Train workers and Ray Data actors reserve its CPUs (``cpus_per_run`` of them), so the task that
    drives it reserves none; at most as many run at once as the cluster's CPUs hold.
    """
    import ray

    parallel = min(len(cfgs), count_parallel_runs(cpus_per_run, ray.cluster_resources().get("CPU", 1.0)))
    print(f"[seeds] {len(cfgs)} seeds, {parallel} at a time ({cpus_per_run:g} CPUs each)", flush=True)
    if parallel <= 1:
        return [run_one(cfg) for cfg in cfgs]
    remote = ray.remote(num_cpus=0, max_retries=0)(run_one)
    pending: dict[Any, int] = {}
    results: dict[int, dict] = {}
    for index, cfg in enumerate(cfgs):
        if len(pending) >= parallel:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[remote.remote(cfg)] = index
    for ref, index in pending.items():
        results[index] = ray.get(ref)
    return [results[i] for i in range(len(cfgs))]


def aggregate_seeds(summaries: Sequence[dict], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{key: {mean, std, min, max, values}}`` over the summaries (std: sample standard deviation, 0 for one)."""
    stats = {}
    for key in keys:
        values = [float(s[key]) for s in summaries if s.get(key) is not None]
        if not values:
            continue
        stats[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "min": min(values), "max": max(values), "values": values}
    return stats


def format_seed_table(stats: dict[str, dict[str, float]], labels: dict[str, str]) -> str:
    """One line per key: label, mean ± std, min..max, and each seed's value."""
    lines = [f"{'':34s} {'mean':>7s} {'± std':>7s} {'min':>7s} {'max':>7s}   per seed"]
    for key, label in labels.items():
        if key in stats:
            s = stats[key]
            values = " ".join(f"{v:.3f}" for v in s["values"])
            lines.append(f"{label:34s} {s['mean']:7.3f} {s['std']:7.3f} {s['min']:7.3f} {s['max']:7.3f}   {values}")
    return "\n".join(lines)


def write_seed_report(out: Path, cfgs: Sequence[Config], summaries: Sequence[dict],
                      stats: dict[str, dict[str, float]]) -> Path:
    """``<output_dir>/seeds.json``: each seed's output directory and the aggregated metrics."""
    path = out / SEEDS_FILE
    out.mkdir(parents=True, exist_ok=True)
    report = {"seeds": [c.train.seed for c in cfgs], "output_dirs": [c.output_dir for c in cfgs],
              "metrics": stats, "per_seed": [{k: s.get(k) for k in stats} for s in summaries]}
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
