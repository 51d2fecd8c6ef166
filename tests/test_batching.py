"""Batch layouts (dpo_ray.batching) and their numerical equivalence through dpo_ray.modeling.

The prefix-sharing row ``[prompt | chosen | rejected]`` must give the same summed log-probs (and
gradients) as the plain layout of two rows per pair, in fp32, for Llama and Qwen2 and for both the
sdpa and eager attention paths.
"""

from __future__ import annotations

import pytest
import torch

from dpo_ray.batching import (
    SEG_CHOSEN,
    SEG_PAD,
    SEG_PROMPT,
    SEG_REJECTED,
    build_prefix_sharing_batch,
    build_separate_batch,
    order_by_length_buckets,
)
from dpo_ray.modeling import PairLogProbs, build_pair_batch, score_pairs

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ARCHS = ["llama", "qwen2"]
ATTNS = ["sdpa", "eager"]
# fp32 sums of up to ~60 nats: 1e-5 absolute, plus a 1e-6 relative allowance for the longest sums.
ATOL, RTOL = 1e-5, 1e-6

# (prompt, chosen, rejected) lengths: 1-token responses, a 1-token prompt, very unequal responses.
SHAPES = [(3, 1, 1), (6, 9, 2), (2, 1, 12), (5, 4, 4), (1, 3, 2), (4, 17, 1)]


@pytest.fixture(scope="module")
def small_tokenizer(hh_rows):
    from dpo_ray.tiny_model import train_tokenizer

    return train_tokenizer([r["chosen"] for r in hh_rows[:40]], vocab_size=300)


@pytest.fixture(scope="module")
def model_dirs(small_tokenizer, tmp_path_factory) -> dict[str, str]:
    """A saved random-init model per architecture, with weights large enough to be context-sensitive.

    At the default init (std 0.02) the next-token distribution barely depends on the context, so a
    broken attention mask would change log-probs by less than the tolerance; std 0.1 makes it matter.
    """
    from dpo_ray.config import TinyModelSettings
    from dpo_ray.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("batching_models")
    dirs = {}
    for arch in ARCHS:
        settings = TinyModelSettings(architecture=arch, vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                                     num_kv_heads=2, intermediate_size=64, max_position_embeddings=128)
        model = build_tiny_model(settings, small_tokenizer, seed=0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        path = root / arch
        model.save_pretrained(path)
        small_tokenizer.save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


_LOADED: dict[tuple[str, str], torch.nn.Module] = {}


def _load(model_dirs, arch: str, attn: str):
    from transformers import AutoModelForCausalLM

    key = (model_dirs[arch], attn)
    if key not in _LOADED:
        model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32, attn_implementation=attn)
        assert model.config._attn_implementation == attn
        assert model.config.model_type == arch
        _LOADED[key] = model
    return _LOADED[key]


@pytest.fixture(scope="module")
def pairs(small_tokenizer):
    gen = torch.Generator().manual_seed(0)
    vocab = len(small_tokenizer)
    first = len(small_tokenizer.all_special_ids)  # ordinary tokens only

    def ids(n):
        return torch.randint(first, vocab, (n,), generator=gen).tolist()

    return [(ids(p), ids(c), ids(r)) for p, c, r in SHAPES]


# ---------------------------------------------------------------------------- numerical equivalence


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_sharing_scores_equal_separate_layout(model_dirs, pairs, small_tokenizer, arch, attn):
    model = _load(model_dirs, arch, attn)
    shared = score_pairs(model, pairs, small_tokenizer.pad_token_id, prefix_sharing=True)
    plain = score_pairs(model, pairs, small_tokenizer.pad_token_id, prefix_sharing=False)
    assert shared[0].shape == plain[0].shape == (len(pairs),)
    assert torch.isfinite(shared[0]).all() and torch.isfinite(shared[1]).all()
    torch.testing.assert_close(shared[0], plain[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(shared[1], plain[1], atol=ATOL, rtol=RTOL)


def test_equivalence_check_would_catch_rejected_seeing_chosen(model_dirs, pairs, small_tokenizer):
    """Control: scoring rejected after chosen (a leaky mask) differs far beyond the tolerance."""
    model = _load(model_dirs, "llama", "sdpa")
    pad = small_tokenizer.pad_token_id
    _, rejected = score_pairs(model, pairs, pad, prefix_sharing=False)
    leaky = [(list(p) + list(c), r, r) for p, c, r in pairs]
    leaked, _ = score_pairs(model, leaky, pad, prefix_sharing=False)
    assert (leaked - rejected).abs().min() > 100 * ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_sharing_rejected_scores_ignore_chosen_tokens(model_dirs, pairs, small_tokenizer, arch):
    model = _load(model_dirs, arch, "sdpa")
    pad = small_tokenizer.pad_token_id
    swapped = [(p, [t + 1 for t in c], r) for p, c, r in pairs]  # different chosen tokens
    chosen_a, rejected_a = score_pairs(model, pairs, pad, prefix_sharing=True)
    chosen_b, rejected_b = score_pairs(model, swapped, pad, prefix_sharing=True)
    torch.testing.assert_close(rejected_a, rejected_b, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(chosen_a, chosen_b, atol=1e-3)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_separate_layout_left_padding_equals_right_padding(model_dirs, pairs, small_tokenizer, arch, attn):
    model = _load(model_dirs, arch, attn).eval()
    scorer = PairLogProbs(model, prefix_sharing=False)
    pad = small_tokenizer.pad_token_id
    with torch.no_grad():
        right = scorer(build_separate_batch(pairs, pad, padding_side="right"))
        left = scorer(build_separate_batch(pairs, pad, padding_side="left"))
    for right_scores, left_scores in zip(right, left):
        assert torch.isfinite(left_scores).all()
        torch.testing.assert_close(left_scores, right_scores, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_scores_do_not_depend_on_batch_padding_or_pad_id(model_dirs, pairs, small_tokenizer, prefix_sharing):
    model = _load(model_dirs, "qwen2", "sdpa")
    pad = small_tokenizer.pad_token_id
    batch = score_pairs(model, pairs, pad, prefix_sharing=prefix_sharing)
    other_pad = score_pairs(model, pairs, pad + 5, prefix_sharing=prefix_sharing)
    for i, pair in enumerate(pairs):
        alone = score_pairs(model, [pair], pad, prefix_sharing=prefix_sharing)
        torch.testing.assert_close(alone[0][0], batch[0][i], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(alone[1][0], batch[1][i], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(other_pad, batch, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_prefix_sharing_chunk_size_does_not_change_scores(model_dirs, pairs, small_tokenizer, chunk_size):
    model = _load(model_dirs, "llama", "sdpa")
    pad = small_tokenizer.pad_token_id
    plain = score_pairs(model, pairs, pad, prefix_sharing=False)
    chunked = score_pairs(model, pairs, pad, prefix_sharing=True, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, plain, atol=ATOL, rtol=RTOL)


def test_score_pairs_restores_training_mode(model_dirs, pairs, small_tokenizer):
    model = _load(model_dirs, "llama", "sdpa")
    model.train()
    score_pairs(model, pairs[:2], small_tokenizer.pad_token_id)
    assert model.training
    model.eval()
    score_pairs(model, pairs[:2], small_tokenizer.pad_token_id)
    assert not model.training


def test_prefix_sharing_equals_separate_on_real_text_with_fixture_model(tiny_model_dir, hh_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    real_pairs = []
    for row in hh_rows[:6]:
        # Split the shared conversation from the final assistant turn.
        cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        prompt = tok(row["chosen"][:cut], add_special_tokens=False)["input_ids"][-24:]
        chosen = tok(row["chosen"][cut:], add_special_tokens=False)["input_ids"][:20] + [tok.eos_token_id]
        rejected = tok(row["rejected"][cut:], add_special_tokens=False)["input_ids"][:7] + [tok.eos_token_id]
        real_pairs.append((prompt, chosen, rejected))
    shared = score_pairs(model, real_pairs, tok.pad_token_id, prefix_sharing=True)
    plain = score_pairs(model, real_pairs, tok.pad_token_id, prefix_sharing=False)
    torch.testing.assert_close(shared, plain, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_equal_between_layouts(model_dirs, pairs, small_tokenizer, arch, attn):
    model = _load(model_dirs, arch, attn)
    model.train()
    pad = small_tokenizer.pad_token_id
    grads = {}
    for prefix_sharing in (True, False):
        model.zero_grad(set_to_none=True)
        scorer = PairLogProbs(model, prefix_sharing=prefix_sharing)
        chosen, rejected = scorer(build_pair_batch(pairs, pad, prefix_sharing))
        (chosen.sum() - rejected.sum()).backward()
        grads[prefix_sharing] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.eval()
    assert grads[True].keys() == grads[False].keys()
    assert any(g.abs().max() > 1e-2 for g in grads[False].values())  # a real signal, not all zeros
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------- prefix-sharing layout

# Two pairs of different total length, so the shorter row is padded: 2+3+1 = 6 and 1+2+4 = 7.
LAYOUT_PAIRS = [([11, 12], [21, 22, 23], [31]), ([13], [24, 25], [32, 33, 34, 35])]
PAD = 0


def test_prefix_sharing_batch_layout_segments_and_targets():
    b = build_prefix_sharing_batch(LAYOUT_PAIRS, PAD)
    assert b["input_ids"].tolist() == [[11, 12, 21, 22, 23, 31, PAD], [13, 24, 25, 32, 33, 34, 35]]
    P, C, R, X = SEG_PROMPT, SEG_CHOSEN, SEG_REJECTED, SEG_PAD
    assert b["segment_ids"].tolist() == [[P, P, C, C, C, R, X], [P, C, C, R, R, R, R]]
    assert b["chosen_lengths"].tolist() == [3, 2]
    assert b["rejected_lengths"].tolist() == [1, 4]
    # Targets: every response token once, labelled with its sequence (2b chosen, 2b+1 rejected).
    assert b["target_ids"].tolist() == [21, 22, 23, 31, 24, 25, 32, 33, 34, 35]
    assert b["target_seq"].tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    assert b["target_batch"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    # Predicting positions: chosen from the position before it; the first rejected token from the last
    # prompt token (never from a chosen position); later rejected tokens from the rejected token before.
    assert b["target_pos"].tolist() == [1, 2, 3, 1, 0, 1, 0, 3, 4, 5]


def test_prefix_sharing_rejected_positions_restart_at_prompt_length():
    b = build_prefix_sharing_batch(LAYOUT_PAIRS, PAD)
    pos, seg = b["position_ids"], b["segment_ids"]
    for row, (p, c, r) in enumerate(LAYOUT_PAIRS):
        assert pos[row][seg[row] == SEG_PROMPT].tolist() == list(range(len(p)))
        assert pos[row][seg[row] == SEG_CHOSEN].tolist() == list(range(len(p), len(p) + len(c)))
        assert pos[row][seg[row] == SEG_REJECTED].tolist() == list(range(len(p), len(p) + len(r)))


def test_prefix_sharing_target_positions_never_point_into_chosen_for_rejected_tokens():
    b = build_prefix_sharing_batch(LAYOUT_PAIRS, PAD)
    seg_at_pos = b["segment_ids"][b["target_batch"], b["target_pos"]]
    rejected = b["target_seq"] % 2 == 1
    assert set(seg_at_pos[rejected].tolist()) <= {SEG_PROMPT, SEG_REJECTED}
    assert set(seg_at_pos[~rejected].tolist()) <= {SEG_PROMPT, SEG_CHOSEN}
    assert (seg_at_pos != SEG_PAD).all()


@pytest.mark.parametrize(
    "bad",
    [[([], [1], [2])], [([1], [], [2])], [([1], [2], [])], []],
    ids=["empty-prompt", "empty-chosen", "empty-rejected", "no-pairs"],
)
def test_prefix_sharing_batch_rejects_empty_parts(bad):
    with pytest.raises(ValueError):
        build_prefix_sharing_batch(bad, PAD)


# ---------------------------------------------------------------------------- separate layout


@pytest.mark.parametrize("side", ["right", "left"])
def test_separate_batch_rows_masks_and_positions(side):
    b = build_separate_batch(LAYOUT_PAIRS, PAD, padding_side=side)
    assert b["input_ids"].shape == (4, 5)  # rows: chosen 0, chosen 1, rejected 0, rejected 1; longest 1 + 4
    expected_rows = [[11, 12, 21, 22, 23], [13, 24, 25], [11, 12, 31], [13, 32, 33, 34, 35]]
    response_lengths = [3, 2, 1, 4]
    for i, (row, n_resp) in enumerate(zip(expected_rows, response_lengths)):
        real = b["attention_mask"][i].bool()
        assert b["input_ids"][i][real].tolist() == row
        assert (b["input_ids"][i][~real] == PAD).all()
        assert b["position_ids"][i][real].tolist() == list(range(len(row)))
        assert b["loss_mask"][i].sum().item() == n_resp
        assert not b["loss_mask"][i][~real].any()
        # the response tokens are the last n_resp real tokens
        assert b["input_ids"][i][b["loss_mask"][i].bool()].tolist() == row[-n_resp:]
        first_real = int(real.nonzero()[0])
        assert first_real == (0 if side == "right" else 5 - len(row))
    assert b["chosen_lengths"].tolist() == [3, 2]


# ---------------------------------------------------------------------------- length buckets


def test_length_buckets_return_every_index_once_in_full_batches():
    lengths = torch.randint(5, 400, (203,), generator=torch.Generator().manual_seed(3)).tolist()
    batches = order_by_length_buckets(lengths, batch_size=8, generator=torch.Generator().manual_seed(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))
    sizes = [len(b) for b in batches]
    assert sizes.count(8) == len(sizes) - 1 and 203 % 8 in sizes  # one short batch: 203 = 25 * 8 + 3


def test_length_buckets_group_similar_lengths():
    lengths = torch.randperm(512, generator=torch.Generator().manual_seed(4)).add(1).tolist()  # distinct 1..512
    batches = order_by_length_buckets(lengths, batch_size=8, generator=torch.Generator().manual_seed(1))
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    # Random batches of 8 out of 512 distinct lengths spread over ~400 on average; buckets sorted
    # within windows of 64 pairs spread over ~8 windows' worth of rank, about 60.
    gen = torch.Generator().manual_seed(2)
    random_batches = torch.randperm(512, generator=gen).view(-1, 8).tolist()
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_batches) / 64
    assert sum(spreads) / len(spreads) < random_spread / 3
    # Within one window of 8 batches the batches are consecutive runs of the sorted lengths.
    one_window = order_by_length_buckets(lengths[:64], batch_size=8, generator=torch.Generator().manual_seed(5))
    runs = sorted(sorted(lengths[i] for i in b) for b in one_window)
    all_sorted = sorted(lengths[:64])
    assert runs == [all_sorted[k : k + 8] for k in range(0, 64, 8)]


def test_length_buckets_are_deterministic_per_seed_and_shuffled_across_seeds():
    lengths = list(range(100))
    a = order_by_length_buckets(lengths, 4, torch.Generator().manual_seed(7))
    b = order_by_length_buckets(lengths, 4, torch.Generator().manual_seed(7))
    c = order_by_length_buckets(lengths, 4, torch.Generator().manual_seed(8))
    assert a == b
    assert a != c
    # Batch order is random: not sorted by length.
    firsts = [lengths[bt[0]] for bt in a]
    assert firsts != sorted(firsts)


def test_epoch_plan_is_seeded_and_keeps_the_data_order_without_shuffle():
    from dpo_ray.dpo import PairRow
    from dpo_ray.epochs import plan_epoch

    rows = [PairRow(str(i), [1] * (i % 5 + 1), [2], [3]) for i in range(10)]
    assert plan_epoch(rows, 4, 0, 0, True, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for bucketing in (True, False):
        plan = plan_epoch(rows, 4, 0, 0, bucketing)
        assert plan == plan_epoch(rows, 4, 0, 0, bucketing)  # seeded
        assert sorted(i for batch in plan for i in batch) == list(range(10))  # every row once
    assert plan_epoch(rows, 4, 0, 0, False) != plan_epoch(rows, 4, 0, 1, False)  # a new order each epoch


def test_epoch_planner_walks_the_plan_and_moves_the_state_to_the_next_epoch():
    from dpo_ray.checkpointing import TrainState
    from dpo_ray.config import build_config
    from dpo_ray.dpo import PairRow
    from dpo_ray.epochs import EpochPlanner

    rows = [PairRow(str(i), [1], [2], [3]) for i in range(5)]
    planner = EpochPlanner(rows, 2, build_config(None, ["train.shuffle=false"]))
    state, taken = TrainState(), []
    for _ in range(4):  # as the loops do: take the step's rows, then count the batch
        taken.append(([r.row_id for r in planner.take_step_rows(state)], state.epoch))
        state.batch_in_epoch += 1
    assert taken == [(["0", "1"], 0), (["2", "3"], 0), (["4"], 0), (["0", "1"], 1)]
    assert (state.epoch, state.batch_in_epoch) == (1, 1)
    resumed = EpochPlanner(rows, 2, build_config(None, ["train.shuffle=false"]))  # a resume: a fresh planner
    assert [r.row_id for r in resumed.take_step_rows(state)] == ["2", "3"]


class ArrowShard:
    """A stand-in for a worker's Ray Data shard: Arrow batches of ``batch_rows`` rows, each a slice of one table
    (so list columns come with offsets that do not start at 0, as slices of Ray blocks do)."""

    def __init__(self, table, batch_rows: int = 3):
        self.table, self.batch_rows = table, batch_rows

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        assert batch_format == "pyarrow"
        for start in range(0, self.table.num_rows, self.batch_rows):
            yield self.table.slice(start, self.batch_rows)


def make_pair_table(n: int, with_reference: bool = True):
    """``n`` pairs with ids above the small-int range, of varying lengths, and float64 reference log-probs."""
    import pyarrow as pa

    gen = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(0, 70000, (k,), generator=gen).tolist()  # noqa: E731
    data = {
        "row_id": [f"hh.jsonl:{i}" for i in range(n)],
        "prompt_ids": [ids(1 + i % 7) for i in range(n)],
        "chosen_ids": [ids(1 + i % 3) for i in range(n)],
        "rejected_ids": [ids(2 + i % 5) for i in range(n)],
    }
    types = {"row_id": pa.string(), **{k: pa.list_(pa.int32()) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}}
    if with_reference:
        data["ref_chosen_logps"] = [-1.0 / (i + 3) for i in range(n)]
        data["ref_rejected_logps"] = [-2.0 / (i + 7) for i in range(n)]
        types.update(ref_chosen_logps=pa.float64(), ref_rejected_logps=pa.float64())
    return pa.table({k: pa.array(v, type=types[k]) for k, v in data.items()}), data


@pytest.mark.parametrize("with_reference", [True, False])
def test_shard_columns_make_the_same_rows_as_python_lists(with_reference):
    import numpy as np

    from dpo_ray.dpo import PairRow, collect_shard_rows

    table, data = make_pair_table(11, with_reference)
    store = collect_shard_rows(ArrowShard(table))
    refs = (data["ref_chosen_logps"], data["ref_rejected_logps"]) if with_reference else ([0.0] * 11, [0.0] * 11)
    expected = [PairRow(*fields) for fields in zip(data["row_id"], data["prompt_ids"], data["chosen_ids"],
                                                   data["rejected_ids"], *refs)]
    assert len(store) == 11 and list(store) == expected and store[-1] == expected[-1] and store[2:5] == expected[2:5]
    assert all(type(t) is int for t in store[4].prompt) and type(store[4].ref_chosen) is float
    assert store.num_tokens.tolist() == [r.num_tokens for r in expected]
    assert store.tokens["prompt"].values.dtype == np.int32 and store.tokens["prompt"].offsets.dtype == np.int64
    assert all(f.values.base is None for f in store.tokens.values())  # copies: no batch's buffer is kept alive
    tokens = sum(r.num_tokens for r in expected)
    assert store.nbytes < 4 * tokens + 200 * 11  # int32 ids plus a little per row
    with pytest.raises(IndexError, match="row 11 of a shard of 11 rows"):
        store[11]
    assert len(collect_shard_rows(None)) == 0


def test_epoch_plans_and_eval_order_are_the_same_on_columns_and_on_row_lists():
    from dpo_ray.dpo import collect_shard_rows
    from dpo_ray.epochs import plan_epoch
    from dpo_ray.shard_columns import count_row_tokens, list_row_ids

    store = collect_shard_rows(ArrowShard(make_pair_table(40)[0]))
    rows = list(store)
    for bucketing in (True, False):
        for epoch in (0, 1):
            assert plan_epoch(store, 4, 3, epoch, bucketing) == plan_epoch(rows, 4, 3, epoch, bucketing)
    assert count_row_tokens(store) == count_row_tokens(rows) and list_row_ids(store) == list_row_ids(rows)


def test_shard_columns_name_the_row_or_column_of_bad_data():
    import pyarrow as pa

    from dpo_ray.dpo import collect_shard_rows

    table, _ = make_pair_table(5)
    chosen = pa.array([[1], [2], None, [4], [5]], type=pa.list_(pa.int32()))
    with pytest.raises(ValueError, match="row hh.jsonl:2: chosen_ids is null"):
        collect_shard_rows(ArrowShard(table.set_column(2, "chosen_ids", chosen)))
    with pytest.raises(ValueError, match="no column 'rejected_ids'"):
        collect_shard_rows(ArrowShard(table.drop_columns(["rejected_ids"])))
    huge = pa.array([[1], [2], [3], [2**40], [5]], type=pa.list_(pa.int64()))
    with pytest.raises(ValueError, match="column 'chosen_ids': token ids must be int32-sized"):
        collect_shard_rows(ArrowShard(table.set_column(2, "chosen_ids", huge)))


def test_shard_columns_read_ray_tensor_columns_as_the_lists_they_were():
    """A numpy-format ``map_batches`` upstream turns list columns into Ray Data's tensor extension types."""
    import numpy as np
    import pyarrow as pa
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray  # what Ray Data makes of such columns

    from dpo_ray.dpo import collect_shard_rows

    table, data = make_pair_table(7)
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ragged = np.array([np.asarray(ids, dtype=np.int64) for ids in data[name]] + [np.zeros(0)], dtype=object)[:-1]
        table = table.set_column(table.schema.get_field_index(name), name, ArrowTensorArray.from_numpy(ragged))
    assert isinstance(table.column("prompt_ids").type, pa.ExtensionType)
    assert list(collect_shard_rows(ArrowShard(table))) == list(collect_shard_rows(ArrowShard(make_pair_table(7)[0])))


# ---------------------------------------------------------------------------- micro-batches under a token budget


def test_micro_batches_without_a_token_budget_are_consecutive_chunks():
    from dpo_ray.epochs import plan_micro_batches

    assert plan_micro_batches([50, 5, 500, 7, 9], max_rows=2, max_tokens=0) == [[0, 1], [2, 3], [4]]


def test_micro_batches_keep_the_token_budget_and_every_row_once():
    from dpo_ray.epochs import plan_micro_batches

    lengths = [457, 120, 130, 300, 90, 460, 118, 125]
    micro = plan_micro_batches(lengths, max_rows=8, max_tokens=1024)
    assert sorted(i for m in micro for i in m) == list(range(len(lengths)))
    for m in micro:
        assert m == sorted(m)  # rows keep their step order inside a forward
        assert len(m) * max(lengths[i] for i in m) <= 1024
    # shortest first: 90, 118, 120, 125, 130 pad to 130 x 5 = 650; then 300 and 457 (2 x 457 = 914); 460 alone
    assert micro == [[1, 2, 4, 6, 7], [0, 3], [5]]
    assert plan_micro_batches(lengths, max_rows=3, max_tokens=1024)[0] == [1, 4, 6]  # the row cap still holds
    assert plan_micro_batches([2000, 10], max_rows=8, max_tokens=1024) == [[1], [0]]  # too long for the budget: alone
    assert plan_micro_batches([10, 20, 30], max_rows=8, max_tokens=1024) == [[0, 1, 2]]  # all fit: one forward


def test_micro_batches_split_to_the_count_another_worker_needs():
    from dpo_ray.epochs import split_to_count

    lengths = [100, 100, 400, 400]
    assert split_to_count([[0, 1, 2, 3]], 2, lengths) == [[0, 1], [2, 3]]
    assert split_to_count([[0, 1], [2, 3]], 3, lengths) == [[0, 1], [2], [3]]  # the costlier one is halved
    with pytest.raises(ValueError, match="cannot split 2 rows into 3"):
        split_to_count([[0], [1]], 3, lengths)


@pytest.mark.parametrize("max_tokens", [0, 40, 1])
def test_a_dpo_step_under_a_token_budget_has_the_same_loss_and_gradients(model_dirs, pairs, small_tokenizer,
                                                                          max_tokens):
    """The step's weighted micro-batch losses sum to the whole batch's loss, and so do their gradients (fp32)."""
    from dpo_ray.config import build_config
    from dpo_ray.dpo import DPOObjective, PairRow
    from dpo_ray.epochs import plan_micro_batches

    model = _load(model_dirs, "llama", "sdpa")
    model.train()
    cfg = build_config(None, [f"model.name_or_path={model_dirs['llama']}", "dpo.beta=0.5"])
    objective = DPOObjective(cfg, model, small_tokenizer.pad_token_id, torch.device("cpu"))
    objective.attach(objective.scorer, model_dirs["llama"])
    rows = [PairRow(str(i), *p, ref_chosen=-3.0 - i, ref_rejected=-2.0 * i) for i, p in enumerate(pairs)]

    def step(micro):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for m in micro:
            weighted, _, _ = objective.compute_micro([rows[i] for i in m], rows)
            weighted.backward()
            total += weighted.item()
        return total, {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    micro = plan_micro_batches([r.num_tokens for r in rows], 8, max_tokens)
    assert len(micro) == {0: 1, 40: 3, 1: len(rows)}[max_tokens]
    loss, grads = step(micro)
    whole_loss, whole_grads = step([list(range(len(rows)))])
    model.zero_grad(set_to_none=True)
    model.eval()
    assert loss == pytest.approx(whole_loss, abs=1e-6)
    for name, g in whole_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
