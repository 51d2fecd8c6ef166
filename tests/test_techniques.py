"""Each speed technique switched on and off gives the same log-probs as the plain path (fp32, 1e-5)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dpo_ray.modeling import (
    PairLogProbs,
    enable_activation_checkpointing,
    load_causal_lm,
    load_tokenizer,
    score_pairs,
)


@pytest.fixture(scope="module")
def model_and_pairs(tiny_model_dir, hh_rows):
    torch.manual_seed(0)
    lm = load_causal_lm(tiny_model_dir)
    with torch.no_grad():  # sharper weights than the 0.02 init, so attention leaks would show
        for p in lm.parameters():
            p.normal_(0, 0.1)
    tok = load_tokenizer(tiny_model_dir)
    pairs = []
    for row in hh_rows[:6]:
        prompt, _, chosen = row["chosen"].rpartition("\n\nAssistant:")
        rejected = row["rejected"].rpartition("\n\nAssistant:")[2]
        ids = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
        pairs.append((ids(prompt + "\n\nAssistant:")[-40:], ids(chosen)[:20] + [tok.eos_token_id],
                      ids(rejected)[:7] + [tok.eos_token_id]))
    return lm, tok.pad_token_id, pairs


def test_prefix_sharing_and_response_only_logits_match_the_plain_path(model_and_pairs):
    lm, pad, pairs = model_and_pairs
    plain_c, plain_r = score_pairs(lm, pairs, pad, prefix_sharing=False, response_only=False)
    for prefix, response_only, chunk in itertools.product((True, False), (True, False), (1, 7, 1024)):
        c, r = score_pairs(lm, pairs, pad, prefix_sharing=prefix, response_only=response_only, chunk_size=chunk)
        torch.testing.assert_close(c, plain_c, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(r, plain_r, atol=1e-5, rtol=1e-6)


def test_length_bucketing_does_not_change_a_pairs_log_probs(model_and_pairs):
    """Bucketing only regroups pairs; a pair scores the same alone, in a short batch or in a long one."""
    lm, pad, pairs = model_and_pairs
    together_c, together_r = score_pairs(lm, pairs, pad)
    for i, pair in enumerate(pairs):
        alone_c, alone_r = score_pairs(lm, [pair], pad)
        assert alone_c.item() == pytest.approx(together_c[i].item(), abs=1e-5)
        assert alone_r.item() == pytest.approx(together_r[i].item(), abs=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(model_and_pairs):
    lm, pad, pairs = model_and_pairs
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(lm)
        lm.train()
        lm.zero_grad()
        scorer = PairLogProbs(lm)
        chosen, rejected = scorer(scorer.build_batch(pairs, pad))
        (chosen.sum() - rejected.sum()).backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    (lm.activation_checkpointing_disable if hasattr(lm, "activation_checkpointing_disable")
     else lm.gradient_checkpointing_disable)()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
