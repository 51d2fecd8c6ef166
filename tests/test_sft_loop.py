"""SFT runs in the shared worker loop: it stops gracefully, guards against non-finite losses and trains
under the precision recipe, as DPO does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_ray.config import build_config
from dpo_ray.modeling import build_policy
from dpo_ray.sft_objective import SFTExample, SFTObjective


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory, short_hh_rows) -> str:
    path = tmp_path_factory.mktemp("sft") / "hh32.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short_hh_rows[:32]))
    return str(path)


def make_config(tmp_path: Path, sft_file: str, model_dir: str, *overrides: str):
    """Local mode (the loop in the driver, so tests can patch it), 2 steps of 8 examples."""
    return build_config(None, [
        f"model.name_or_path={model_dir}", f"data.train={sft_file}", "data.max_length=256",
        f"output_dir={tmp_path}/run", f"data.cache_dir={tmp_path.parent}/cache", "scaling.num_workers=0",
        "train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=2", "train.log_every=1", *overrides,
    ])


def test_sft_stop_request_checkpoints_and_exports_no_final_model(ray_session, tmp_path, sft_file, tiny_model_dir,
                                                                monkeypatch):
    from dpo_ray.sft import run_sft

    monkeypatch.setattr("dpo_ray.train_loop.StopPoller.poll", lambda self: True)  # as after SIGTERM
    summary = run_sft(make_config(tmp_path, sft_file, tiny_model_dir), model_path=tiny_model_dir)
    assert summary["steps"] == 1 and summary["final_model_dir"] == ""
    state = json.loads((Path(summary["checkpoint_path"]) / "state.json").read_text())
    assert state["state"]["step"] == 1 and state["metrics"]["interrupted"] is True


def test_sft_nonfinite_loss_stops_with_step_and_row_ids(ray_session, tmp_path, sft_file, tiny_model_dir, monkeypatch):
    from dpo_ray.sft import run_sft
    from dpo_ray.train_loop import NonFiniteLossError

    compute = SFTObjective.compute_micro

    def poisoned(self, rows, step_rows):
        weighted, loss, sums = compute(self, rows, step_rows)
        return weighted * float("nan"), loss * float("nan"), sums

    monkeypatch.setattr(SFTObjective, "compute_micro", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at step 1 .*rows in the batch: .+"):
        run_sft(make_config(tmp_path, sft_file, tiny_model_dir, "scaling.max_failures=0"), model_path=tiny_model_dir)


def test_sft_trains_and_evaluates_under_the_precision_recipe(tiny_model_dir, monkeypatch, single_torch_thread):
    """train.mixed_precision=bf16 on CPU: the SFT forward passes run under bf16 autocast, training and eval."""
    seen: list[torch.dtype | None] = []

    from dpo_ray.modeling import ResponseNLL

    forward = ResponseNLL.forward

    def record(self, batch):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(self, batch)

    monkeypatch.setattr(ResponseNLL, "forward", record)
    cfg = build_config(None, ["train.mixed_precision=bf16", "train.micro_batch_size=2"])
    device = torch.device("cpu")
    lm = build_policy(cfg, tiny_model_dir, device, None)
    objective = SFTObjective(cfg, lm, pad_id=0, device=device)
    rows = [SFTExample("a", [1, 40, 41], [50, 2]), SFTExample("b", [1, 43], [51, 52, 2])]
    weighted, loss, sums = objective.compute_micro(rows, rows)
    weighted.backward()
    metrics = objective.evaluate(rows, objective.trainable_module())
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert sums["tokens"] == 5 and weighted.item() == pytest.approx(loss.item() / 5)
    assert metrics["eval_examples"] == 2 and metrics["eval_loss"] > 0


def test_sft_rows_read_as_columns_evaluate_as_the_row_list_does(tiny_model_dir, single_torch_thread):
    """The worker's SFT shard is held as int32 columns; its rows and eval metrics equal those of the row list."""
    import pyarrow as pa

    from dpo_ray.sft_objective import collect_sft_examples

    rows = [SFTExample(f"r{i}", [1, 40 + i, 300 + i], [50 + i] * (1 + i % 3) + [2]) for i in range(5)]
    table = pa.table({"row_id": [r.row_id for r in rows], "prompt_ids": [r.prompt for r in rows],
                      "response_ids": [r.response for r in rows]},
                     schema=pa.schema([("row_id", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
                                       ("response_ids", pa.list_(pa.int32()))]))

    class Shard:
        def iter_batches(self, batch_size, batch_format, prefetch_batches):
            yield from (table.slice(s, 2) for s in range(0, table.num_rows, 2))

    store = collect_sft_examples(Shard())
    assert list(store) == rows and store.num_tokens.tolist() == [r.num_tokens for r in rows]
    cfg = build_config(None, ["train.micro_batch_size=2"])
    lm = build_policy(cfg, tiny_model_dir, torch.device("cpu"), None)
    objective = SFTObjective(cfg, lm, pad_id=0, device=torch.device("cpu"))
    scorer = objective.trainable_module()
    assert objective.evaluate(store, scorer) == objective.evaluate(rows, scorer)
