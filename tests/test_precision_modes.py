"""One precision recipe for policy and reference, train/eval modes, dropout off, gradient clipping under FSDP.

The step-0 tests compute both sides the way the product does: the precomputed reference through
ReferenceScorer's scoring function (blocks of 4 * micro_batch_size pairs, as map_batches hands them over,
sorted by length), the policy through build_policy and DPOStepper.compute on the first epoch's micro-batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_ray.config import build_config
from dpo_ray.data.reference import ReferenceScorer, build_reference_key
from dpo_ray.distributed import clip_gradients
from dpo_ray.dpo import DPOStepper, PairRow, evaluate
from dpo_ray.epochs import plan_epoch, plan_micro_batches, resolve_micro_batch_tokens
from dpo_ray.losses import compute_pair_accuracy
from dpo_ray.modeling import LENGTH_MULTIPLE, PairLogProbs, build_policy, load_tokenizer
from dpo_ray.precision import (
    disable_dropout,
    in_eval_mode,
    list_active_dropout,
    prepare_for_training,
    resolve_precision,
)

BF16, FP32 = torch.bfloat16, torch.float32


# ------------------------------------------------------------------------------------ the recipe


@pytest.mark.parametrize(
    ("model_dtype", "mixed_precision", "device", "weights", "autocast"),
    [
        ("auto", "auto", "cuda", FP32, BF16),
        ("auto", "auto", "cpu", FP32, None),
        ("auto", "bf16", "cpu", FP32, BF16),
        ("auto", "no", "cuda", FP32, None),
        ("float32", "auto", "cuda", FP32, BF16),
        ("float32", "bf16", "cpu", FP32, BF16),
        ("float32", "no", "cpu", FP32, None),
        ("bfloat16", "auto", "cuda", BF16, BF16),
        ("bfloat16", "auto", "cpu", BF16, None),
        ("bfloat16", "bf16", "cpu", BF16, BF16),
        ("bfloat16", "no", "cuda", BF16, None),
    ],
)
def test_precision_recipe_table(model_dtype, mixed_precision, device, weights, autocast):
    recipe = resolve_precision(model_dtype, mixed_precision, device)
    assert (recipe.weights_dtype, recipe.autocast_dtype, recipe.device_type) == (weights, autocast, device)


def test_unknown_precision_values_are_refused():
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_precision("float16", "auto", "cpu")
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_precision("auto", "fp16", "cpu")


def make_config(model_dir: str, *overrides: str):
    return build_config(None, [f"model.name_or_path={model_dir}", "train.batch_size=8", "train.micro_batch_size=4",
                               "dpo.beta=0.1", *overrides])


def test_reference_cache_key_holds_the_resolved_recipe_and_the_scorer_layout(tiny_model_dir):
    def key(*overrides):
        return build_reference_key("data", make_config(tiny_model_dir, *overrides), tiny_model_dir)

    base = key()
    assert base["precision"] == {"weights": "float32", "autocast": "none", "device": "cpu"}
    # the same resolved recipe is the same reference: auto is float32 weights, CPU autocast auto is none
    assert key("model.dtype=float32") == base == key("train.mixed_precision=no")
    for overrides in (["train.mixed_precision=bf16"], ["model.dtype=bfloat16"], ["train.prefix_sharing=false"],
                      ["train.response_only_logits=false"]):
        assert key(*overrides) != base, overrides
    assert key("train.mixed_precision=bf16")["precision"]["autocast"] == "bfloat16"


# ------------------------------------------------------------------------------------ step-0 margins


@pytest.fixture(scope="module")
def token_pairs(tiny_model_dir, short_hh_rows):
    """24 HH pairs of varied lengths, tokenized as (prompt, chosen, rejected) id lists, and the pad id."""
    tok = load_tokenizer(tiny_model_dir)
    pairs = []
    for i, row in enumerate(short_hh_rows[:24]):
        prompt, _, chosen = row["chosen"].rpartition("\n\nAssistant:")
        rejected = row["rejected"].rpartition("\n\nAssistant:")[2]
        ids = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
        pairs.append((ids(prompt + "\n\nAssistant:")[-(20 + 7 * i):], ids(chosen)[: 5 + 3 * i] + [tok.eos_token_id],
                      ids(rejected)[:40] + [tok.eos_token_id]))
    return pairs, tok.pad_token_id


def score_reference_like_the_data_stage(cfg, model_dir: str, pairs, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ReferenceScorer's scores of ``pairs``, handed over in blocks of 4 * micro_batch_size as map_batches does."""
    scorer = ReferenceScorer(model_dir, cfg.model.dtype, cfg.train.mixed_precision, cfg.model.attn_implementation,
                             False, pad_id, False, cfg.train.micro_batch_size, cfg.train.logits_chunk_size,
                             cfg.train.prefix_sharing, cfg.train.response_only_logits, torch.get_num_threads(),
                             cfg.train.micro_batch_tokens)
    num_tokens = np.array([sum(map(len, p)) for p in pairs])
    block = 4 * cfg.train.micro_batch_size
    chosen, rejected = np.zeros(len(pairs)), np.zeros(len(pairs))
    for start in range(0, len(pairs), block):
        c, r = scorer.score(pairs[start : start + block], num_tokens[start : start + block])
        chosen[start : start + block], rejected[start : start + block] = c, r
    return chosen, rejected


def score_step0_like_the_worker(cfg, model_dir: str, rows: list[PairRow], pad_id: int):
    """([N] margins, [N] policy chosen, [N] policy rejected) of the first epoch's micro-batches at step 0."""
    lm = build_policy(cfg, model_dir, torch.device("cpu"), None)
    scorer = PairLogProbs(lm, cfg.train.prefix_sharing, cfg.train.logits_chunk_size, cfg.train.response_only_logits)
    stepper = DPOStepper(cfg, scorer, scorer, None, pad_id, torch.device("cpu"))
    margins, chosen, rejected = (np.full(len(rows), np.nan) for _ in range(3))
    budget = resolve_micro_batch_tokens(cfg.train.micro_batch_tokens, torch.device("cpu"))
    for step in plan_epoch(rows, cfg.train.batch_size, cfg.train.seed, 0, cfg.train.length_bucketing):
        for planned in plan_micro_batches([rows[i].num_tokens for i in step], cfg.train.micro_batch_size, budget):
            micro = [step[i] for i in planned]
            out, c, r = stepper.compute([rows[i] for i in micro])
            margins[micro] = (out.chosen_rewards - out.rejected_rewards).double().numpy()
            chosen[micro], rejected[micro] = c.double().numpy(), r.double().numpy()
    return margins, chosen, rejected


@pytest.mark.parametrize("overrides", [["train.mixed_precision=bf16"], ["model.dtype=bfloat16"],
                                       ["train.mixed_precision=bf16", "train.prefix_sharing=false"]],
                         ids=["bf16-autocast", "bf16-weights", "bf16-autocast-separate-rows"])
def test_step0_margins_are_exactly_zero_with_the_precomputed_reference(tiny_model_dir, token_pairs, overrides,
                                                                       single_torch_thread):
    pairs, pad_id = token_pairs
    cfg = make_config(tiny_model_dir, *overrides)
    ref_chosen, ref_rejected = score_reference_like_the_data_stage(cfg, tiny_model_dir, pairs, pad_id)
    rows = [PairRow(str(i), *p, ref_chosen=ref_chosen[i], ref_rejected=ref_rejected[i]) for i, p in enumerate(pairs)]
    margins, chosen, rejected = score_step0_like_the_worker(cfg, tiny_model_dir, rows, pad_id)
    # reference values travel as float64 and are used as float32, as the worker reads them
    np.testing.assert_array_equal(chosen, ref_chosen.astype(np.float32))
    np.testing.assert_array_equal(rejected, ref_rejected.astype(np.float32))
    assert np.count_nonzero(margins) == 0
    assert compute_pair_accuracy(torch.from_numpy(margins)).mean().item() == 0.5


def test_a_pairs_bf16_log_probs_do_not_depend_on_its_batch(tiny_model_dir, token_pairs, single_torch_thread):
    """CPU attention sums over the padded length in 16-wide vectors plus a scalar tail; padding every batch to a
    multiple of LENGTH_MULTIPLE keeps a pair's positions in full vectors, so its batch no longer matters."""
    pairs, pad_id = token_pairs
    cfg = make_config(tiny_model_dir, "model.dtype=bfloat16")
    lm = build_policy(cfg, tiny_model_dir, torch.device("cpu"), None)
    scorer = PairLogProbs(lm, True, 1024, True)

    def score(batch_pairs):
        with torch.no_grad():
            return torch.stack(scorer(scorer.build_batch(batch_pairs, pad_id, "cpu")), dim=1)

    alone = torch.cat([score([p]) for p in pairs])
    for size in (3, 5, 8):
        together = torch.cat([score(pairs[i : i + size]) for i in range(0, len(pairs), size)])
        assert torch.equal(together, alone), size
    batch = scorer.build_batch(pairs[:3], pad_id, "cpu")
    assert batch["input_ids"].shape[1] % LENGTH_MULTIPLE == 0


def test_padding_to_a_length_multiple_adds_only_padding():
    from dpo_ray.batching import SEG_PAD, build_prefix_sharing_batch, build_separate_batch

    pairs = [([5, 6, 7], [8, 9], [10]), ([5], [11, 12, 13, 14], [15, 16])]
    for build in (build_prefix_sharing_batch, lambda p, pad, m: build_separate_batch(p, pad, pad_to_multiple_of=m)):
        batch, padded = build(pairs, 0, 1), build(pairs, 0, 16)
        length = batch["input_ids"].shape[1]
        assert padded["input_ids"].shape[1] == 16
        for key, value in batch.items():
            if value.dim() == 2 and value.shape[1] == length:
                assert torch.equal(padded[key][:, :length], value), key
                fill = SEG_PAD if key == "segment_ids" else 0
                assert (padded[key][:, length:] == fill).all(), key
            else:
                assert torch.equal(padded[key], value), key


# ------------------------------------------------------------------------------------ dropout and modes


def build_dropout_models():
    """GPT-2 (nn.Dropout modules: resid, attn, embd) and Llama (the float ``attention_dropout`` that its
    attention applies functionally), tiny, from configs: no download."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    gpt2 = AutoConfig.for_model("gpt2", vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
    llama = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.3)
    return {name: AutoModelForCausalLM.from_config(c) for name, c in (("gpt2", gpt2), ("llama", llama))}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dropout_off_makes_train_mode_forwards_deterministic(name, single_torch_thread):
    lm = build_dropout_models()[name]
    ids = torch.arange(1, 25).unsqueeze(0)
    lm.train()
    assert list_active_dropout(lm)
    with torch.no_grad():
        assert not torch.equal(lm(input_ids=ids).logits, lm(input_ids=ids).logits)  # dropout is on
    prepare_for_training(lm)
    assert lm.training and all(m.training for m in lm.modules())
    assert list_active_dropout(lm) == []
    with torch.no_grad():
        first, second = lm(input_ids=ids).logits, lm(input_ids=ids).logits
        with in_eval_mode(lm):
            evaluated = lm(input_ids=ids).logits
    assert torch.equal(first, second)
    assert torch.equal(first, evaluated)
    assert lm.training  # in_eval_mode gave the mode back


def test_disable_dropout_reaches_module_attributes_and_configs():
    lm = build_dropout_models()["llama"]
    attn = lm.model.layers[0].self_attn
    assert attn.attention_dropout == 0.3 and lm.config.attention_dropout == 0.3
    disable_dropout(lm)
    assert attn.attention_dropout == 0.0 and lm.config.attention_dropout == 0.0


def test_build_policy_trains_in_train_mode_and_keeps_dropout_only_when_asked(tmp_path):
    model_dir = str(tmp_path / "gpt2")
    build_dropout_models()["gpt2"].save_pretrained(model_dir)
    lm = build_policy(make_config(model_dir), model_dir, torch.device("cpu"), None)  # from_pretrained: eval mode
    assert all(m.training for m in lm.modules())
    assert list_active_dropout(lm) == []
    kept = build_policy(make_config(model_dir, "train.disable_dropout=false"), model_dir, torch.device("cpu"), None)
    assert all(m.training for m in kept.modules())
    assert "transformer.drop.p" in list_active_dropout(kept)


def test_evaluation_gives_every_module_its_own_mode_back(tiny_model_dir, token_pairs, single_torch_thread):
    pairs, pad_id = token_pairs
    cfg = make_config(tiny_model_dir)
    lm = build_policy(cfg, tiny_model_dir, torch.device("cpu"), None)
    scorer = PairLogProbs(lm, True, 1024, True)
    stepper = DPOStepper(cfg, scorer, scorer, None, pad_id, torch.device("cpu"))
    lm.model.embed_tokens.eval()  # a frozen part kept in eval mode inside a training model
    before = {name: m.training for name, m in scorer.named_modules()}
    seen = []
    hook = lm.model.register_forward_pre_hook(lambda m, a, k: seen.append(any(x.training for x in scorer.modules())),
                                              with_kwargs=True)
    rows = [PairRow(str(i), *p) for i, p in enumerate(pairs[:6])]
    evaluate(stepper, rows, micro_batch_size=4)
    hook.remove()
    assert seen and not any(seen)  # every module was in eval mode during evaluation
    assert {name: m.training for name, m in scorer.named_modules()} == before


def count_decoder_layer_calls(lm, run) -> int:
    """Forward calls of the decoder layers' submodules while ``run()`` runs. transformers 5 checkpoints a
    layer's ``forward`` (its own hooks stay outside), so recomputation shows in its submodules' calls; counted
    as they start (pre-hooks), since torch's recomputation stops once it has what backward needs."""
    calls = []
    handles = [child.register_forward_pre_hook(lambda *_: calls.append(1))
               for layer in lm.get_decoder().layers for child in layer.children()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return len(calls)


def test_gradient_checkpointing_recomputes_the_layers_in_a_training_step(tiny_model_dir, token_pairs,
                                                                          single_torch_thread):
    pairs, pad_id = token_pairs
    rows = [PairRow(str(i), *p) for i, p in enumerate(pairs[:4])]
    counts, grads = {}, {}
    for checkpointing in (False, True):
        cfg = make_config(tiny_model_dir, f"model.gradient_checkpointing={str(checkpointing).lower()}")
        lm = build_policy(cfg, tiny_model_dir, torch.device("cpu"), None)  # as the worker builds it
        scorer = PairLogProbs(lm, cfg.train.prefix_sharing, cfg.train.logits_chunk_size, cfg.train.response_only_logits)
        stepper = DPOStepper(cfg, scorer, scorer, None, pad_id, torch.device("cpu"))

        def step():
            out, _, _ = stepper.compute(rows)
            out.loss.backward()

        counts[checkpointing] = count_decoder_layer_calls(lm, step)
        grads[checkpointing] = [p.grad.clone() for p in lm.parameters()]
    assert counts[False] > 0
    assert counts[True] == 2 * counts[False]  # each layer ran again in backward
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ gradient clipping


def test_clip_gradients_clips_local_and_ddp_models_with_torch_utils():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    full = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    norm = clip_gradients(model, list(model.parameters()), 0.5)
    assert norm.item() == pytest.approx(full.item())
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item() == pytest.approx(0.5, rel=1e-5)
    assert clip_gradients(model, list(model.parameters()), 0.0).item() == pytest.approx(0.5, rel=1e-5)  # measures only


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_clip_gradients_uses_fsdps_global_norm(tmp_path, monkeypatch):
    """A real FSDP1 module on CPU in a one-process gloo group: clip_gradients must call its clip_grad_norm_
    (which all-reduces the shards' norms), not torch.nn.utils on the local shards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    calls = {"fsdp": 0, "utils": 0}  # utils: calls from outside FSDP (one rank's NO_SHARD FSDP delegates to it)
    fsdp_clip, utils_clip = FSDP.clip_grad_norm_, torch.nn.utils.clip_grad_norm_
    inside_fsdp = []

    def spy_fsdp(self, *args, **kwargs):
        calls["fsdp"] += 1
        inside_fsdp.append(True)
        try:
            return fsdp_clip(self, *args, **kwargs)
        finally:
            inside_fsdp.pop()

    def spy_utils(*args, **kwargs):
        calls["utils"] += 0 if inside_fsdp else 1
        return utils_clip(*args, **kwargs)

    monkeypatch.setattr(FSDP, "clip_grad_norm_", spy_fsdp)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_utils)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        model = FSDP(inner, device_id=torch.device("cpu"), use_orig_params=True)
        model(torch.randn(5, 4)).pow(2).sum().backward()
        params = [p for p in model.parameters() if p.requires_grad]
        full = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = clip_gradients(model, params, 0.1)
        assert calls == {"fsdp": 1, "utils": 0}
        assert norm.item() == pytest.approx(full.item(), rel=1e-6)
        assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(0.1, rel=1e-4)
        clip_gradients(model, params, 0.0)  # max_grad_norm=0 still measures through FSDP, and does not clip
        assert calls["fsdp"] == 2
    finally:
        dist.destroy_process_group()


def clip_on_fsdp_rank(rank: int, directory: str) -> None:
    """One rank of a 2-process CPU FSDP run: writes its local shard norm, clip_gradients' norm and the
    unsharded model's norm to ``directory/rank{rank}.json``."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"file://{directory}/pg", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        inner = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        whole = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        whole.load_state_dict(inner.state_dict())
        x = torch.randn(6, 4)
        model = FSDP(inner, device_id=torch.device("cpu"), use_orig_params=True)
        model(x[3 * rank : 3 * rank + 3]).pow(2).sum().backward()
        params = list(model.parameters())
        local = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None and p.grad.numel()])
        norm = clip_gradients(model, params, 1e9)
        whole(x).pow(2).sum().div(2).backward()  # FSDP averages the ranks' gradients
        unsharded = torch.nn.utils.get_total_norm([p.grad for p in whole.parameters()])
        result = {"local": local.item(), "clip": norm.item(), "unsharded": unsharded.item()}
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_clip_gradients_measures_fsdp_shards_by_their_global_norm(tmp_path):
    """Two CPU processes, FULL_SHARD: each rank's own shard has a different norm; clip_gradients returns
    (and clips by) the norm of the whole gradient on both."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(clip_on_fsdp_rank, args=(str(tmp_path),), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["clip"] == pytest.approx(r["unsharded"], rel=1e-5)
        assert r["local"] < r["unsharded"] * 0.999  # what torch.nn.utils.clip_grad_norm_ would have used
    assert results[0]["local"] != pytest.approx(results[1]["local"])
