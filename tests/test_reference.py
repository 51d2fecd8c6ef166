"""Reference log-probs as a Ray Data stage: equal to a plain forward pass, computed once, cached by key."""

from __future__ import annotations

import logging

import pytest
import torch
from test_data_pipeline import build_config, explicit_rows, write_jsonl

from dpo_ray.data import prepare_data
from dpo_ray.data.pipeline import PUBLIC_COLUMNS
from dpo_ray.data.reference import REFERENCE_COLUMNS
from dpo_ray.losses import compute_sequence_logps


def score_directly(model, prompt_ids, response_ids) -> float:
    """Summed response log-prob from the full logits of one [prompt | response] row."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    mask = torch.zeros_like(ids)
    mask[0, len(prompt_ids):] = 1
    with torch.no_grad():
        return compute_sequence_logps(model(input_ids=ids).logits, ids, mask).item()


def by_row_id(data) -> dict[str, dict]:
    return {r["row_id"]: r for r in data.train.take_all() + data.eval.take_all()}


def test_reference_logps_match_a_forward_pass_and_are_reused(ray_session, tiny_model_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    story = {"prompt": "Tell me a story. " * 2, "chosen": "Once upon a time " * 12, "rejected": "No."}
    path = write_jsonl(tmp_path / "pairs.jsonl", explicit_rows(0, 11) + [story])
    cfg = build_config(tmp_path, path, max_length=48, eval_fraction=0.3)
    cfg.train.micro_batch_size = 4
    caplog.set_level(logging.INFO, logger="dpo_ray.data")

    first = prepare_data(cfg, tiny_model_dir, tiny_model_dir)
    assert first.reference_passes == 1 and "reference log-probs: computing" in caplog.text
    assert first.train.columns() == [*PUBLIC_COLUMNS, *REFERENCE_COLUMNS]
    rows = by_row_id(first)
    assert len(rows) == 12 and first.report["sources"]["train"]["truncated"] == 1

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for row in rows.values():
        for side in ("chosen", "rejected"):
            expected = score_directly(model, row["prompt_ids"], row[f"{side}_ids"])
            assert row[f"ref_{side}_logps"] == pytest.approx(expected, abs=1e-5, rel=1e-6)

    caplog.clear()
    again = prepare_data(cfg, tiny_model_dir, tiny_model_dir)
    assert again.reference_passes == 0 and "reference log-probs: reusing cache" in caplog.text
    assert (again.train_pairs, again.eval_pairs) == (first.train_pairs, first.eval_pairs)
    assert (again.train.count(), again.eval.count()) == (first.train.count(), first.eval.count())  # no duplicates
    assert by_row_id(again) == rows

    caplog.clear()
    cfg.data.max_length = 40
    changed = prepare_data(cfg, tiny_model_dir, tiny_model_dir)
    assert changed.reference_passes == 1 and "reference log-probs: computing" in caplog.text
    assert changed.cache_dir != first.cache_dir

    # the reference pass follows the policy's layout switches, and they are part of its cache key
    caplog.clear()
    cfg.data.max_length = 48
    cfg.train.prefix_sharing = False
    separate = prepare_data(cfg, tiny_model_dir, tiny_model_dir)
    assert separate.reference_passes == 1 and "reference log-probs: computing" in caplog.text
    for row_id, row in by_row_id(separate).items():
        for side in ("chosen", "rejected"):
            assert row[f"ref_{side}_logps"] == pytest.approx(rows[row_id][f"ref_{side}_logps"], abs=1e-5, rel=1e-6)
