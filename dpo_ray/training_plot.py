"""A training run's picture: its curves against the optimizer step, drawn from the rows of its metrics file
(:class:`dpo_ray.tracking.MetricsFile`), for any objective.

DPO runs log ``train/loss``, ``train/accuracy`` and ``train/margin`` each ``train.log_every`` steps and the
``eval_*`` metrics at each evaluation; SFT runs log ``train/loss`` and ``eval_loss``. A panel is drawn when
at least one of its series has a value, so an SFT picture holds the loss panel only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

PLOT_FILE = "training.png"

# (title, y label, ((metric key, legend label), ...)); eval series are evaluations, train series windows.
PANELS = (
    ("loss", "loss", (("train/loss", "train (mean over the logging window)"), ("eval_loss", "eval (held out)"))),
    (
        "preference accuracy",
        "accuracy",
        (
            ("train/accuracy", "train"),
            ("eval_accuracy", "eval (ties count 1/2)"),
            ("eval_accuracy_strict", "eval strict (ties wrong)"),
        ),
    ),
    ("reward margin", "chosen - rejected reward", (("train/margin", "train"), ("eval_reward_margin", "eval"))),
    (
        "implicit rewards on held-out pairs",
        "beta * (log pi - log pi_ref), nats",
        (("eval_rewards_chosen", "chosen"), ("eval_rewards_rejected", "rejected")),
    ),
)

# the strict accuracy equals the other wherever no pair ties: dashed with crosses, both stay visible
STYLES = {"eval_accuracy_strict": "x--"}


@dataclass(frozen=True)
class TrainingPlot:
    """What :func:`plot_training_curves` did: the PNG (None when nothing could be drawn) and the series drawn."""

    path: Path | None
    series: tuple[str, ...]


def collect_series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step; a repeated step keeps its last row; null is a gap (NaN).

    A row without an integer ``step``, or with a ``key`` value that is neither a number nor null, raises
    ``ValueError`` naming the row's index.
    """
    by_step: dict[int, float] = {}
    for index, row in enumerate(rows):
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"metric row {index}: 'step' must be an integer, got {step!r}")
        if key not in row:
            continue
        value = row[key]
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"metric row {index} (step {step}): {key!r} must be a number or null, got {value!r}")
        by_step[step] = math.nan if value is None else float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def find_panels(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[tuple[str, str, list, list]]]]:
    """The panels that have data: (title, y label, [(key, label, steps, values), ...]) with only the series
    holding at least one finite value."""
    panels = []
    for title, ylabel, series in PANELS:
        drawn = []
        for key, label in series:
            steps, values = collect_series(rows, key)
            if any(math.isfinite(v) for v in values):
                drawn.append((key, label, steps, values))
        if drawn:
            panels.append((title, ylabel, drawn))
    return panels


def draw_panel(ax, title: str, ylabel: str, drawn: list[tuple[str, str, list, list]]) -> None:
    """One panel's series against the step, with its title, axis labels, grid and legend."""
    import matplotlib.ticker

    for key, label, steps, values in drawn:
        # evaluations are few (often one, at the end): markers keep a single point visible
        style = STYLES.get(key, "o-" if key.startswith("eval_") or len(steps) < 3 else "-")
        ax.plot(steps, values, style, markersize=4, label=label)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> TrainingPlot:
    """Draw the panels of :data:`PANELS` that have data from ``rows`` (``{"step": int, key: value}``) into
    the PNG at ``path``; with nothing to draw, no file is written and ``path`` is None."""
    panels = find_panels(rows)
    if not panels:
        return TrainingPlot(None, ())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), squeeze=False)
    all_steps = [s for _, _, drawn in panels for *_, steps, _ in drawn for s in steps]
    pad = max((max(all_steps) - min(all_steps)) * 0.03, 0.5)
    for ax, panel in zip(axes.flat, panels):
        draw_panel(ax, *panel)
        ax.set_xlim(min(all_steps) - pad, max(all_steps) + pad)  # one step axis for every panel
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return TrainingPlot(path, tuple(key for _, _, drawn in panels for key, *_ in drawn))
