"""training.png without Ray: the picture from metric rows (DPO, SFT, bad rows) and the metrics file it is drawn
from, which keeps the steps before a resume and drops an earlier attempt's rows after it."""

from __future__ import annotations

import json

import pytest

from dpo_ray.tracking import MetricsFile, log_metrics, read_metric_rows
from dpo_ray.training_plot import plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dpo_rows(steps: int, eval_every: int) -> list[dict]:
    """Rows as a DPO run logs them: a train window per step, the eval metrics at each evaluation."""
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "train/loss": 0.7 - 0.01 * s, "train/accuracy": 0.5 + 0.02 * s,
                     "train/margin": 0.05 * s, "train/lr": 1e-3})
        if s % eval_every == 0:
            rows.append({"step": s, "eval_loss": 0.69 - 0.01 * s, "eval_accuracy": 0.5 + 0.01 * s,
                         "eval_accuracy_strict": 0.4 + 0.01 * s, "eval_reward_margin": 0.04 * s,
                         "eval_rewards_chosen": 0.02 * s, "eval_rewards_rejected": -0.02 * s, "eval_pairs": 20})
    return rows


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000  # a drawn figure, not an empty canvas


def test_dpo_rows_draw_every_panel_and_name_the_series(tmp_path):
    plot = plot_training_curves(dpo_rows(12, eval_every=4), tmp_path / "out" / "training.png", title="run 'dpo'")
    assert plot.path == tmp_path / "out" / "training.png"
    assert_png(plot.path)
    assert plot.series == ("train/loss", "eval_loss", "train/accuracy", "eval_accuracy", "eval_accuracy_strict",
                           "train/margin", "eval_reward_margin", "eval_rewards_chosen", "eval_rewards_rejected")


def test_sft_rows_without_dpo_keys_draw_the_loss_panel_only(tmp_path):
    rows = [{"step": s, "train/loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 1.1,
                                                                         "eval_examples": 8}]
    plot = plot_training_curves(rows, tmp_path / "training.png")
    assert_png(plot.path)
    assert plot.series == ("train/loss", "eval_loss")


def test_nothing_to_draw_writes_no_file(tmp_path):
    rows = [{"step": 1, "train/lr": 1e-3}, {"step": 2, "train/loss": None}]  # no plotted key with a value
    plot = plot_training_curves(rows, tmp_path / "training.png")
    assert plot.path is None and plot.series == ()
    assert not (tmp_path / "training.png").exists()


@pytest.mark.parametrize(
    ("row", "message"),
    [({"train/loss": 0.5}, "metric row 1: 'step' must be an integer"),
     ({"step": 2, "train/loss": "0.5"}, "metric row 1 (step 2): 'train/loss' must be a number or null")],
)
def test_a_bad_row_is_named(tmp_path, row, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plot_training_curves([{"step": 1, "train/loss": 0.6}, row], tmp_path / "training.png")


def test_metrics_file_keeps_the_steps_before_a_resume_and_drops_the_stale_ones(tmp_path):
    path = tmp_path / "metrics" / "dpo.jsonl"
    first = MetricsFile(path)
    for s in range(1, 8):  # the first attempt logs to step 7, its last checkpoint is at step 5
        log_metrics([first], {"train/loss": 1.0 / s, "train/accuracy": True, "note": "x"}, s)
    with open(path, "a") as f:
        f.write('{"step": 8, "train/lo')  # killed mid-line
    resumed = MetricsFile(path)
    log_metrics([resumed], {"train/loss": float("nan")}, 6)  # continues from the checkpoint at step 5
    rows, bad = read_metric_rows(path)
    assert bad == []
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0] == {"step": 1, "train/loss": 1.0} and rows[-1] == {"step": 6, "train/loss": None}
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 6, "train/loss": None}  # strict JSON


def test_read_metric_rows_counts_unreadable_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\nnot json\n{"loss": 1}\n[1]\n{"step": 2}\n')
    rows, bad = read_metric_rows(path)
    assert [r["step"] for r in rows] == [1, 2] and bad == [2, 3, 4]
    assert read_metric_rows(tmp_path / "missing.jsonl") == ([], [])


def test_the_driver_draws_from_the_runs_metrics_file_and_leaves_no_stale_picture(tmp_path, caplog):
    from dpo_ray.config import build_config
    from dpo_ray.trainer import find_training_plot, write_training_plot

    cfg = build_config(None, [f"output_dir={tmp_path}", "run_name=r1"])
    source = tmp_path / "metrics" / "r1.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps(r) + "\n" for r in dpo_rows(6, eval_every=3)) + '{"step": 7, "tr')
    picture = tmp_path / "training.png"
    assert write_training_plot(cfg) == picture and find_training_plot(cfg) == str(picture)
    assert_png(picture)
    source.write_text('{"step": 1, "train/loss": "high"}\n')  # a later run of the same name with a bad row
    assert write_training_plot(cfg) is None and find_training_plot(cfg) is None
    assert "'train/loss' must be a number or null, got 'high'; training.png not written" in caplog.text
