"""The demo chain (dpo_ray.demo) and its parts: settings, KL, and a miniature end-to-end run (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dpo_ray.config import ConfigError, build_config
from dpo_ray.demo import DEMO_CONFIG_FILE, DemoSettings, build_demo_config, parse_demo_settings, run_demo

REPO = Path(__file__).resolve().parent.parent
DEMO_YAML = REPO / "configs" / "demo.yaml"


# ---------------------------------------------------------------------------- settings


def test_the_demo_config_defaults_to_configs_demo_yaml_and_takes_overrides():
    assert DEMO_CONFIG_FILE == DEMO_YAML
    assert build_demo_config() == build_config(DEMO_YAML)
    assert build_demo_config().model.tiny.hidden_size == 32  # the demo's own shape, not the Config default
    assert build_demo_config(None, ["dpo.beta=0.5"]).dpo.beta == 0.5


def test_demo_settings_parse_and_reject_unknown_or_mistyped_keys():
    demo = parse_demo_settings(["sft_steps=50", "temperature=1", "pft_learning_rate=3e-4"])
    assert (demo.sft_steps, demo.temperature, demo.pft_learning_rate) == (50, 1.0, 3e-4)
    assert demo.reference_seed == -1 and parse_demo_settings(["reference_seed=0"]).reference_seed == 0
    with pytest.raises(ConfigError, match="sft_stepz"):
        parse_demo_settings(["sft_stepz=5"])
    with pytest.raises(ConfigError, match="'sft_steps' expects int"):
        parse_demo_settings(["sft_steps=fast"])
    with pytest.raises(ConfigError):
        parse_demo_settings(["sft_steps"])


# ---------------------------------------------------------------------------- KL


def test_completion_kl_is_zero_to_itself_and_matches_a_direct_sum(tiny_model_dir, tmp_path):
    from dpo_ray.evaluation import compute_completion_kl, split_completions
    from dpo_ray.generation import generate_responses, load_generation_model

    policy, tok = load_generation_model(tiny_model_dir)
    other, _ = load_generation_model(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    inputs, generated = generate_responses(policy, tok, ["12+34=", "7+5=", "40+41="], 2, 1.0, 5)
    completions = split_completions(inputs, generated, tok.eos_token_id)
    assert [len(p) for p, _ in completions] == [len(tok("12+34=")["input_ids"]) + 1] * 2 + [
        len(tok("7+5=")["input_ids"]) + 1] * 2 + [len(tok("40+41=")["input_ids"]) + 1] * 2  # BOS + prompt, unpadded
    assert torch.allclose(compute_completion_kl(policy, policy, completions, tok.pad_token_id), torch.zeros(6))
    kl = compute_completion_kl(policy, other, completions, tok.pad_token_id)
    prompt, response = completions[0]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_p = torch.log_softmax(policy(ids).logits[0], -1)
        log_q = torch.log_softmax(other(ids).logits[0], -1)
    positions = range(len(prompt) - 1, len(prompt) + len(response) - 1)
    direct = sum((log_p[t].exp() * (log_p[t] - log_q[t])).sum() for t in positions)
    assert (kl > 0).all()
    assert kl[0].item() == pytest.approx(direct.item(), rel=1e-4)


# ---------------------------------------------------------------------------- the chain


# The default reference (SFT of 550 steps, about half right), a third of the pair prompts, a third of
# DPO's steps, no second Preferred-FT run.
MINI_DEMO = DemoSettings(pair_prompts=1200, heldout_prompts=200, samples_per_prompt=4, eval_samples=2,
                         pft_matched_learning_rate=0.0)
MINI_OVERRIDES = ["train.max_steps=100", "train.eval_every=50", "train.log_every=50",
                  "scaling.num_workers=0"]  # Ray Train local mode: no worker group to start for each stage


@pytest.mark.slow
def test_mini_chain_dpo_improves_task_accuracy_and_reruns_skip_stages(ray_session, tmp_path):
    cfg = build_demo_config(None, MINI_OVERRIDES + [f"output_dir={tmp_path / 'demo'}"])
    summary = run_demo(cfg, MINI_DEMO)
    out = tmp_path / "demo"

    assert summary["task_accuracy_policy"] > summary["task_accuracy_reference"]
    for key in ("eval_accuracy", "train_pairs", "final_model_dir", "task_accuracy_preferred_ft",
                "kl_policy_reference", "kl_preferred_ft_reference"):
        assert summary[key] is not None, key
    assert summary["kl_policy_reference"] > 0 and summary["kl_preferred_ft_reference"] > 0
    assert json.loads((out / "summary.json").read_text())["task_accuracy_policy"] == summary["task_accuracy_policy"]
    assert (out / "demo.png").stat().st_size > 0
    assert (Path(summary["final_model_dir"]) / "config.json").exists()

    from dpo_ray.task import check_prompt_answer

    rows = [json.loads(line) for line in (out / "pairs" / "train.jsonl").read_text().splitlines()]
    assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert all(check_prompt_answer(r["prompt"], r["chosen"]) for r in rows)
    assert not any(check_prompt_answer(r["prompt"], r["rejected"]) for r in rows)
    assert len(summary["trajectory"]) >= 2  # checkpoints of both runs were evaluated

    start = time.perf_counter()
    again = run_demo(cfg, MINI_DEMO)
    assert time.perf_counter() - start < 30  # every stage is reused
    assert again["task_accuracy_policy"] == summary["task_accuracy_policy"]


# ---------------------------------------------------------------------------- SFT loss


def test_sft_batch_masks_the_prompt_and_the_nll_counts_response_tokens_only(tiny_model_dir):
    from dpo_ray.batching import build_sft_batch
    from dpo_ray.generation import load_generation_model
    from dpo_ray.modeling import ResponseNLL

    lm, _ = load_generation_model(tiny_model_dir)
    examples = [([1, 40, 41, 42], [50, 2]), ([1, 43], [51, 52, 53, 2])]
    batch = build_sft_batch(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 40, 41, 42, 50, 2], [1, 43, 51, 52, 53, 2]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]]
    with torch.no_grad():
        # SFT's loss through the fused head and through the model's own logits, against one sequence at a time
        (nll, tokens), (full_nll, _) = ResponseNLL(lm)(batch), ResponseNLL(lm, response_only=False)(batch)
        direct = 0.0
        for prompt, response in examples:
            log_p = torch.log_softmax(lm(torch.tensor([prompt + response])).logits[0], -1)
            direct -= sum(log_p[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))
    assert tokens.item() == 6
    assert nll.item() == pytest.approx(direct, rel=1e-5) and full_nll.item() == pytest.approx(direct, rel=1e-5)
