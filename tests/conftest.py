"""Shared fixtures: one local Ray instance for the whole session, and one tiny model built offline."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HH_DATA = REPO / "data" / "hh_rlhf_harmless_1800.jsonl.gz"

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s; the tests' runs are seconds long, so poll faster
# (Ray's processes inherit this from the session's ray.init).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts a PreemptionWatcher actor per run to watch for spot-instance preemption; one local node
# is never preempted, and on 2 cores one actor less per run saves about a second (measured: 19.0 s -> 17.7 s
# mean of 8 one-worker runs each).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False)  # the dashboard stays: Train uses its State API
    yield ray


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors gain nothing from threads; on a shared 2-core machine one thread wastes less CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hh_rows() -> list[dict]:
    with gzip.open(HH_DATA, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def short_hh_rows(hh_rows) -> list[dict]:
    """Clean, short HH pairs (under 600 characters, a non-empty final turn) for quick training runs."""
    def usable(row: dict) -> bool:
        return all(len(row[k]) < 600 and not row[k].rstrip().endswith("Assistant:") for k in ("chosen", "rejected"))

    return [r for r in hh_rows if usable(r)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, hh_rows) -> str:
    """A tiny Llama (2 layers, 64 wide) with a tokenizer trained on the bundled HH sample."""
    from dpo_ray.config import TinyModelSettings
    from dpo_ray.tiny_model import make_tiny_model

    settings = TinyModelSettings(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=128, max_position_embeddings=1024)
    texts = [r["chosen"] for r in hh_rows[:600]] + [f"{a}+{b}={a + b}" for a in range(50) for b in range(20)]
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", texts, settings, seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer."""
    from dpo_ray.modeling import load_tokenizer

    return load_tokenizer(tiny_model_dir)
