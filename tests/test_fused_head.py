"""The fused log-prob head (``dpo_ray.losses.compute_token_logps_chunked``): values, gradients and memory.

The plain path it must equal is the whole ``[N, V]`` logits at once: ``log_softmax(transform(head(h)))``.
Gradients are checked with a random weight per token (as DPO's per-pair sigmoid weights them), for the
hidden states, an untied and a tied head weight and every logit transform of :mod:`dpo_ray.families`;
end to end, every parameter's gradient through :class:`~dpo_ray.modeling.PairLogProbs` must equal the one
through the model's own ``forward().logits``, for a tied soft-capped Gemma 2, an untied Llama and a LoRA
adapter on Llama's ``lm_head``. Memory is counted with torch's ``MemTracker`` (live tensor storages).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpo_ray.families import LogitTransform, find_plain_linear_head, output_head
from dpo_ray.losses import compute_token_logps_chunked, compute_token_logps_linear
from dpo_ray.modeling import PairLogProbs, unwrap_base_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TRANSFORMS = {
    "none": LogitTransform(),
    "gemma-softcap": LogitTransform((("softcap", 5.0),)),
    "cohere-scale": LogitTransform((("mul", 0.5),)),
    "granite-scaling": LogitTransform((("div", 4.0),)),
}
TOL = dict(rtol=1e-5, atol=1e-5)


class TinyLM(nn.Module):
    """Embedding -> one tanh layer -> lm_head, optionally tied to the embedding (as Gemma and small Qwens)."""

    def __init__(self, vocab: int, hidden: int, tied: bool, head_bias: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=head_bias)
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.embed(ids)))


def plain_token_logps(hidden, targets, head) -> torch.Tensor:
    """[N] log-probs from the whole [N, V] logits at once: the oracle."""
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def score_tokens(path: str, lm: TinyLM, transform: LogitTransform, hidden, targets, chunk: int) -> torch.Tensor:
    """[N] log-probs by ``path``: plain (the oracle), module (the generic fused head) or linear (the weight read
    directly, as :class:`~dpo_ray.modeling.PairLogProbs` does for a plain ``nn.Linear`` head)."""
    if path == "plain":
        return plain_token_logps(hidden, targets, output_head(lm, transform))
    if path == "module":
        return compute_token_logps_chunked(hidden, targets, output_head(lm, transform), chunk_size=chunk)
    return compute_token_logps_linear(hidden, targets, lm.lm_head.weight, lm.lm_head.bias,
                                      transform if transform.steps else None, chunk_size=chunk)


def token_logps_and_grads(lm: TinyLM, transform: LogitTransform, batches, path: str, chunk: int = 0):
    """([N] log-probs of the last batch, grad of its hidden states, {param name: grad}) after one backward of
    ``sum(weights * logps)`` per (ids, targets, weights) batch, without zeroing in between (gradient
    accumulation over micro-batches)."""
    lm.zero_grad(set_to_none=True)
    for ids, targets, weights in batches:
        hidden = lm.hidden_states(ids)
        hidden.retain_grad()
        logps = score_tokens(path, lm, transform, hidden, targets, chunk)
        (logps * weights).sum().backward()
    return logps.detach(), hidden.grad, {n: p.grad.clone() for n, p in lm.named_parameters()}


def random_token_batches(count: int, tokens: int = 23, vocab: int = 50) -> list:
    """(ids, targets, per-token upstream gradients as DPO's per-pair weights make them) per micro-batch."""
    return [(torch.randint(0, vocab, (tokens,)), torch.randint(0, vocab, (tokens,)), torch.randn(tokens))
            for _ in range(count)]


@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("path", ["module", "linear"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_fused_head_values_and_gradients_equal_the_plain_path_in_fp32(transform, tied, chunk_size, path,
                                                                       micro_batches):
    """Both fused paths, one micro-batch (the weight has no ``.grad`` yet) and two (the linear path adds the second
    into the existing ``.grad`` in place), against the whole logits at once; the head has a bias."""
    torch.manual_seed(0)
    lm = TinyLM(vocab=50, hidden=12, tied=tied, head_bias=True)
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.5)  # wide, so that the soft-cap saturates for some logits
    batches = random_token_batches(micro_batches)
    want = token_logps_and_grads(lm, TRANSFORMS[transform], batches, "plain")
    got = token_logps_and_grads(lm, TRANSFORMS[transform], batches, path, chunk_size)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    assert set(got[2]) == set(want[2]) == ({"embed.weight", "mix.weight", "mix.bias", "lm_head.bias"}
                                           | ({"lm_head.weight"} if not tied else set()))
    for name in want[2]:
        assert got[2][name].layout == torch.strided, name
        torch.testing.assert_close(got[2][name], want[2][name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("transform", ["none", "gemma-softcap"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_linear_head_under_bf16_autocast_matches_the_module_path(transform, tied):
    """Under autocast (bf16 on GPU by default; CPU autocast here) the backward recomputes each chunk's logits in
    autocast's dtype, as the forward made them, and multiplies in it, as autograd through the module does. Against
    the fp32 oracle its gradients are no further off than the module path's (which also sums the chunks' weight
    gradients in bf16, where the linear head adds them in fp32)."""
    torch.manual_seed(4)
    lm = TinyLM(vocab=50, hidden=16, tied=tied, head_bias=True)
    batches = random_token_batches(2)
    oracle = token_logps_and_grads(lm, TRANSFORMS[transform], batches, "plain")
    results, errors = {}, {}
    for path in ("module", "linear"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[path] = token_logps_and_grads(lm, TRANSFORMS[transform], batches, path, chunk=5)
        errors[path] = max((results[path][2][n] - g).abs().max().item() for n, g in oracle[2].items())
    assert torch.equal(results["linear"][0], results["module"][0])  # the same bf16 logits, the same log-softmax
    torch.testing.assert_close(results["linear"][1], results["module"][1], rtol=2e-2, atol=1e-3)
    assert errors["linear"] <= 1.25 * errors["module"] + 1e-6, errors
    assert errors["module"] > 1e-4  # bf16 did change the gradients: the comparison means something


def test_linear_head_writes_the_second_micro_batch_into_the_existing_grad():
    """The same ``.grad`` tensor holds both micro-batches' head gradients (no second [V, H] buffer is handed to
    autograd); ``torch.autograd.grad`` therefore sees zeros for the weight, which the docstring warns of."""
    torch.manual_seed(3)
    lm = TinyLM(vocab=50, hidden=12, tied=False)
    (ids, targets, weights), second = random_token_batches(2)
    logps = score_tokens("linear", lm, LogitTransform(), lm.hidden_states(ids), targets, 8)
    (logps * weights).sum().backward()
    grad = lm.lm_head.weight.grad
    first = grad.clone()
    logps = score_tokens("linear", lm, LogitTransform(), lm.hidden_states(second[0]), second[1], 8)
    (logps * second[2]).sum().backward()
    assert lm.lm_head.weight.grad is grad and not torch.equal(grad, first)
    logps = score_tokens("linear", lm, LogitTransform(), lm.hidden_states(ids), targets, 8)
    (weight_grad,) = torch.autograd.grad((logps * weights).sum(), lm.lm_head.weight)
    assert weight_grad.to_dense().abs().max() == 0


class CountingHead(nn.Module):
    """A linear head that counts its calls."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.linear = nn.Linear(hidden, vocab, bias=False)
        self.calls = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(hidden)


def test_the_head_runs_once_per_chunk_without_grad_and_twice_with_a_backward():
    head = CountingHead(8, 30)
    hidden, targets = torch.randn(10, 8, requires_grad=True), torch.randint(0, 30, (10,))
    with torch.no_grad():  # the reference pass and evaluation: nothing saved, nothing recomputed
        compute_token_logps_chunked(hidden, targets, head, chunk_size=3)
    assert head.calls == 4
    head.calls = 0
    logps = compute_token_logps_chunked(hidden, targets, head, chunk_size=3)
    assert head.calls == 4
    logps.sum().backward()
    assert head.calls == 8  # one recompute per chunk in the backward
    assert hidden.grad is not None and head.linear.weight.grad is not None


# ---------------------------------------------------------------------------- end to end, every parameter

FAMILY_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
E2E = {
    "gemma2-tied-softcap": ("gemma2", dict(head_dim=8, final_logit_softcapping=5.0, tie_word_embeddings=True), False),
    "llama-untied": ("llama", dict(tie_word_embeddings=False), False),
    "llama-lora-on-lm_head": ("llama", dict(tie_word_embeddings=False), True),
}
PAIRS = [([5, 6, 7, 8], [9, 10, 11], [12, 13]), ([20, 21], [22, 23, 24, 25, 26], [27]), ([30, 31, 32], [33], [34, 35])]


def build_e2e_model(case: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides, lora = E2E[case]
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **FAMILY_COMMON, **overrides),
                                          attn_implementation="eager")
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    if lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head", "q_proj"],
                                           init_lora_weights=False))
    return lm.eval()


def pair_logps_and_grads(lm: nn.Module, response_only: bool, wrap=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(log-probs, {param: grad}) after two micro-batches' backward (the second accumulates into ``.grad``), the
    scorer wrapped by ``wrap`` (DDP) if given, the first micro-batch under its ``no_sync`` as the loop runs it."""
    lm.zero_grad(set_to_none=True)
    scorer = PairLogProbs(lm, prefix_sharing=True, chunk_size=3, response_only=response_only)
    model = wrap(scorer) if wrap else scorer
    logps = []
    for micro, sync in ((PAIRS[:2], False), (PAIRS[2:], True)):
        with model.no_sync() if wrap and not sync else contextlib.nullcontext():
            chosen, rejected = model(scorer.build_batch(micro, pad_id=0))
            (chosen.sum() - 0.7 * rejected.sum()).backward()
        logps.append(torch.stack([chosen, rejected]).detach())
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
    return torch.cat(logps, dim=1), grads


def assert_same_gradients(got: dict, want: dict) -> None:
    assert set(got) == set(want) and all(g.abs().max() > 0 for g in got.values())
    for name in want:
        assert got[name].layout == torch.strided, name
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", list(E2E))
def test_every_parameter_gradient_equals_the_models_own_forward_in_fp32(case):
    """Two accumulated micro-batches. The tied Gemma 2 takes the linear head (the weight's gradient written into
    ``.grad``) and the sparse embedding gradient; the LoRA-wrapped head takes the module path."""
    lm = build_e2e_model(case)
    want_logps, want = pair_logps_and_grads(lm, response_only=False)
    got_logps, got = pair_logps_and_grads(lm, response_only=True)
    torch.testing.assert_close(got_logps, want_logps, **TOL)
    if E2E[case][2]:
        assert any("lm_head" in n and "lora" in n for n in got), "the LoRA adapter on lm_head gets a gradient"
    assert not lm.get_input_embeddings().sparse  # set for the forward only
    assert (find_plain_linear_head(unwrap_base_model(lm)) is None) == E2E[case][2]  # which path ran
    assert_same_gradients(got, want)


def test_gradients_under_ddp_equal_the_models_own_forward(tmp_path):
    """DDP (a one-process gloo group: its reducer, buckets and hooks as on many) around the scorer of a tied,
    soft-capped Gemma 2: the head's gradient written into ``.grad`` and the embedding's sparse one reach DDP's
    dense bucket, which DDP built from ``Embedding.sparse`` = False."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    lm = build_e2e_model("gemma2-tied-softcap")
    want_logps, want = pair_logps_and_grads(lm, response_only=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        got_logps, got = pair_logps_and_grads(lm, response_only=True, wrap=DDP)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got_logps, want_logps, **TOL)
    assert_same_gradients(got, want)


# ---------------------------------------------------------------------------- memory


def old_token_logps(hidden, targets, head, chunk_size):
    """The chunked loop before the fused head, verbatim: every chunk's logits stay saved for the backward."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()
        tgt = targets[start : start + chunk_size]
        out.append(logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(out)


MEM_HIDDEN, MEM_CHUNK = 16, 32
# Peak of a fused step in fp32 [chunk, V] logits, measured 2.5 and 3.5: the recomputed chunk's logits, their
# gradient, the head weight's gradient (half a chunk at H=16, chunk 32), and for the soft-cap its saved tanh.
BOUND = {"none": 3.0, "gemma-softcap": 4.0}


def measure_step_peak(fn, tokens: int, vocab: int, transform: str) -> int:
    """Peak bytes of the tensors live during forward + backward of ``sum(w * fn(...))``, beyond its inputs.

    The head is ``F.linear`` on a weight rather than an ``nn.Linear``: MemTracker refuses a module called
    more than once per step (the chunks call it once each); the tensors are the same.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    weight = torch.randn(vocab, MEM_HIDDEN, requires_grad=True)
    hidden = torch.randn(tokens, MEM_HIDDEN, requires_grad=True)
    targets, weights = torch.randint(0, vocab, (tokens,)), torch.randn(tokens)
    tracker = MemTracker()
    tracker.track_external(weight, hidden, targets, weights)
    with tracker:
        before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        logps = fn(hidden, targets, lambda h: TRANSFORMS[transform](F.linear(h, weight)), MEM_CHUNK)
        (logps * weights).sum().backward()
    assert weight.grad is not None and hidden.grad is not None
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - before


@pytest.mark.parametrize("transform", ["none", "gemma-softcap"])
def test_fused_head_peak_is_one_chunk_of_logits_whatever_the_number_of_tokens(transform):
    for vocab in (4096, 16384):
        chunk_logits = MEM_CHUNK * vocab * 4  # one fp32 [chunk, V]
        fused = {n: measure_step_peak(compute_token_logps_chunked, n * MEM_CHUNK, vocab, transform) for n in (4, 16)}
        old = {n: measure_step_peak(old_token_logps, n * MEM_CHUNK, vocab, transform) for n in (4, 16)}
        in_chunks = {side: [round(v / chunk_logits, 2) for v in d.values()]
                     for side, d in (("fused", fused), ("old", old))}
        print(f"{transform} V={vocab}: peak in chunk logits at 4 and 16 chunks: {in_chunks}")
        assert fused[16] < BOUND[transform] * chunk_logits
        assert fused[16] < 1.1 * fused[4]  # flat in tokens
        assert old[16] - old[4] >= 12 * chunk_logits  # the old loop kept each of the 12 more chunks' logits


def test_auto_chunks_hold_the_same_logits_whatever_the_vocabulary():
    """With ``train.logits_chunk_size=auto`` a chunk holds ~2**24 fp32 logits at 4k and at 152k: the head's peak is
    flat in the vocabulary (one chunk's logits, their gradient buffer), not only in the number of tokens."""
    from dpo_ray.config import build_config
    from dpo_ray.losses import LOGITS_CHUNK_ELEMENTS, resolve_chunk_rows

    for vocab in (4096, 32768, 151936, 262144):
        rows = resolve_chunk_rows("auto", vocab)
        assert LOGITS_CHUNK_ELEMENTS - vocab < rows * vocab <= LOGITS_CHUNK_ELEMENTS
    assert resolve_chunk_rows(300, 151936) == 300  # an explicit row count is kept
    assert build_config(None, []).train.logits_chunk_size == "auto"
    assert build_config(None, ["train.logits_chunk_size=512"]).train.logits_chunk_size == 512


class CountLargeAllocations(TorchDispatchMode):
    """Counts the new dense tensors of at least ``numel`` elements that ops create (views and in-place results,
    which share an input's storage, are not new). MemTracker cannot follow sparse tensors, which the linear
    head's backward returns."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in inputs):
                self.count += 1
        return out


def count_weight_sized_tensors(path: str, vocab: int = 512, hidden_size: int = 16, tokens: int = 64, chunk: int = 8):
    """New [V, H]-sized tensors made by forward + backward while the head weight already holds a ``.grad`` (a
    step's second micro-batch): ``module`` through :func:`compute_token_logps_chunked`, ``linear`` through
    :func:`compute_token_logps_linear`; chunks of 8 rows, so a chunk's [8, V] logits are far smaller."""
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    weight.grad = torch.randn_like(weight)
    before = weight.grad.clone()
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    targets, weights = torch.randint(0, vocab, (tokens,)), torch.randn(tokens)
    with CountLargeAllocations(vocab * hidden_size) as counter:
        if path == "module":
            logps = compute_token_logps_chunked(hidden, targets, lambda h: F.linear(h, weight), chunk)
        else:
            logps = compute_token_logps_linear(hidden, targets, weight, chunk_size=chunk)
        (logps * weights).sum().backward()
    assert not torch.equal(weight.grad, before)
    return counter.count


def test_linear_head_adds_into_the_grad_without_a_weight_sized_buffer():
    """With a ``.grad`` already there, autograd through the module makes a [V, H] gradient per chunk (and sums
    them into a second one); the linear head adds each chunk's straight into ``.grad``."""
    counts = {path: count_weight_sized_tensors(path) for path in ("module", "linear")}
    assert counts == {"module": counts["module"], "linear": 0} and counts["module"] >= 8, counts
