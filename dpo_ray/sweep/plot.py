"""The sweep's picture: held-out preference accuracy over beta x learning rate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dpo_ray.sweep.space import BETA_KEY, LR_KEY


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_accuracy_map(rows: list[dict[str, Any]], path: Path, best_id: str | None) -> Path:
    """Scatter of eval accuracy over beta x learning rate (log axes), each point annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 5))
    scored = [r for r in rows if is_finite_number(r["eval_accuracy"])]
    if scored:
        points = ax.scatter([r[BETA_KEY] for r in scored], [r[LR_KEY] for r in scored],
                            c=[r["eval_accuracy"] for r in scored], cmap="viridis", s=120, edgecolors="black")
        fig.colorbar(points, ax=ax, label="eval accuracy")
        for r in scored:
            label = f"{r['eval_accuracy']:.3f}" + (" (stopped)" if r["early_stopped"] else "")
            ax.annotate(label, (r[BETA_KEY], r[LR_KEY]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    failed = [r for r in rows if r["status"] == "ERROR"]
    if failed:
        ax.scatter([r[BETA_KEY] for r in failed], [r[LR_KEY] for r in failed], marker="x", c="red", s=80,
                   label="failed")
        ax.legend(loc="best")
    best = next((r for r in rows if r["trial_id"] == best_id), None)
    if best is not None:
        ax.scatter([best[BETA_KEY]], [best[LR_KEY]], marker="*", s=400, facecolors="none", edgecolors="red")
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
