"""Measuring what training did to a policy, on held-out prompts and pairs.

For each policy (the reference itself, the DPO policy, the Preferred-FT baseline, and any checkpoints
along their training) :class:`PolicyEvaluator`, a Ray Data actor UDF, measures on every held-out prompt:

* **task accuracy**: the greedy answer is verified correct (by the task's checker);
* **reward**: the mean checker reward (1 right, 0 wrong) of ``num_samples`` answers sampled at
  temperature 1, i.e. the expected ground-truth reward of the policy, as on the y-axis of the DPO paper's
  reward/KL frontier;
* **KL(policy || reference)**: for the same samples ``y ~ pi(.|x)``, the sum over the sampled tokens of the
  exact KL between the next-token distributions, ``sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t))`` (the step
  that emits EOS included), averaged over samples and prompts. By the chain rule its expectation is the
  sequence-level ``E_x KL(pi(.|x) || pi_ref(.|x))`` (completions cut at ``max_new_tokens``); summing the exact
  per-token KL instead of ``log pi(y) - log pi_ref(y)`` keeps every term >= 0 and lowers the variance.

:func:`compute_preference_accuracy` gives the held-out preference accuracy of any policy: the share of
held-out pairs whose implicit reward ``beta * log(pi / pi_ref)`` is higher for chosen than for rejected
(ties count one half, as in training's ``eval_accuracy``; the reference itself ties everywhere: 0.5).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import torch

from dpo_ray.batching import build_sft_batch
from dpo_ray.generation import (
    decode_responses,
    generate_responses,
    group_samples,
    load_generation_model,
    map_prompts,
    seed_for_batch,
)

REFERENCE = "reference"


@dataclass
class EvalSettings:
    """How :func:`evaluate_policies` measures."""

    num_samples: int = 4  # temperature-1 samples per prompt for reward and KL
    max_new_tokens: int = 6
    seed: int = 1234
    batch_size: int = 256  # prompts per batch
    num_actors: int = 2  # each actor loads every policy (tiny models: cheap) and scores its batches
    cpus_per_actor: float = 0.5  # fractional: leaves room for Ray Data's other tasks on 2 CPUs
    threads_per_actor: int = 1


@dataclass
class PolicyScores:
    """Held-out means for one policy."""

    task_accuracy: float  # greedy answers verified correct
    reward: float  # mean checker reward of temperature-1 samples
    kl: float  # KL(policy || reference) per prompt, see the module docstring
    prompts: int


# ------------------------------------------------------------------------------------ KL


def split_completions(prompt_inputs: dict[str, torch.Tensor], generated: torch.Tensor,
                      eos_id: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids without padding, response ids up to and including the first EOS) of each row.

    Args:
        prompt_inputs: left-padded ``input_ids`` / ``attention_mask`` [N, P], as given to ``generate``.
        generated: [N, G] the new tokens ``generate`` returned.
        eos_id: the end-of-sequence token.
    """
    rows = []
    for ids, mask, new in zip(prompt_inputs["input_ids"].tolist(), prompt_inputs["attention_mask"].tolist(),
                              generated.tolist()):
        prompt = [t for t, m in zip(ids, mask) if m]
        response = new[: new.index(eos_id) + 1] if eos_id in new else new
        rows.append((prompt, response))
    return rows


@torch.no_grad()
def compute_completion_kl(policy, reference, completions: Sequence[tuple[list[int], list[int]]],
                          pad_id: int) -> torch.Tensor:
    """Summed exact per-token KL(policy || reference) along each completion.

    Args:
        policy, reference: causal LMs sharing a tokenizer.
        completions: B (prompt ids, response ids) pairs, e.g. from :func:`split_completions`.
        pad_id: padding token id.

    Returns:
        [B] fp32: sum over response positions t of sum_v p_t(v) (log p_t(v) - log q_t(v)), where p_t and q_t
        are the two models' next-token distributions given the prompt and response tokens before t.
    """
    batch = build_sft_batch(completions, pad_id, policy.device)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    log_p = torch.log_softmax(policy(**inputs).logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    log_q = torch.log_softmax(reference(**inputs).logits[:, :-1].float(), dim=-1)
    token_kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, T-1]; position t predicts token t+1
    return (token_kl * batch["loss_mask"][:, 1:].float()).sum(-1)


# ------------------------------------------------------------------------------------ Ray Data UDF


class PolicyEvaluator:
    """Ray Data actor UDF: ``{index, prompt}`` rows -> per-policy columns ``<name>.answer`` (greedy text),
    ``<name>.correct``, ``<name>.reward`` and ``<name>.kl`` (floats, see the module docstring).

    Every policy and the reference are loaded once per actor. ``verify(prompt, answer) -> bool`` is the
    task's checker (a module-level function, so Ray can ship it).
    """

    def __init__(self, policies: dict[str, str], reference_path: str, settings: dict,
                 verify: Callable[[str, str], bool]):
        self.settings = EvalSettings(**settings)
        self.verify = verify
        threads = self.settings.threads_per_actor
        self.reference, self.tokenizer = load_generation_model(reference_path, threads)
        self.policies = {name: load_generation_model(path, threads)[0] for name, path in policies.items()}

    def score_policy(self, model, prompts: list[str], seed: int) -> dict[str, list]:
        """Greedy answers and their correctness, sampled rewards and KL for one policy on ``prompts``."""
        s, tok = self.settings, self.tokenizer
        _, greedy = generate_responses(model, tok, prompts, 1, 0.0, s.max_new_tokens)
        answers = decode_responses(tok, greedy)
        torch.manual_seed(seed)
        inputs, sampled = generate_responses(model, tok, prompts, s.num_samples, 1.0, s.max_new_tokens)
        samples = group_samples(decode_responses(tok, sampled), s.num_samples)
        if model is self.reference:
            kl = torch.zeros(len(prompts) * s.num_samples)
        else:
            kl = compute_completion_kl(model, self.reference, split_completions(inputs, sampled, tok.eos_token_id),
                                       tok.pad_token_id)
        return {
            "answer": answers,
            "correct": [float(self.verify(p, a)) for p, a in zip(prompts, answers)],
            "reward": [sum(self.verify(p, x) for x in xs) / len(xs) for p, xs in zip(prompts, samples)],
            "kl": kl.view(len(prompts), s.num_samples).mean(-1).tolist(),
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt").to_pylist()
        seed = seed_for_batch(self.settings.seed, min(batch.column("index").to_pylist()))
        for name, model in [(REFERENCE, self.reference), *self.policies.items()]:
            for column, values in self.score_policy(model, prompts, seed).items():
                batch = batch.append_column(f"{name}.{column}", pa.array(values))
        return batch


def evaluate_policies(prompts: Sequence[str], policies: dict[str, str], reference_path: str, settings: EvalSettings,
                      verify: Callable[[str, str], bool]) -> tuple[dict[str, PolicyScores], list[dict]]:
    """Score the reference and each policy on the held-out ``prompts`` with Ray Data.

    Returns:
        ({name: PolicyScores}, with ``"reference"`` first; the per-prompt rows, in prompt order, with the
        greedy answers of every policy).
    """
    import ray

    actors = max(1, min(settings.num_actors, math.ceil(len(prompts) / settings.batch_size)))  # no idle actors
    rows = map_prompts(prompts, settings.batch_size, PolicyEvaluator,
                       {"policies": dict(policies), "reference_path": reference_path, "settings": asdict(settings),
                        "verify": verify},
                       ray.data.ActorPoolStrategy(size=actors), settings.cpus_per_actor)
    scores = {}
    for name in [REFERENCE, *policies]:
        n = max(len(rows), 1)
        scores[name] = PolicyScores(
            task_accuracy=sum(r[f"{name}.correct"] for r in rows) / n,
            reward=sum(r[f"{name}.reward"] for r in rows) / n,
            kl=sum(r[f"{name}.kl"] for r in rows) / n,
            prompts=len(rows),
        )
    return scores, rows


# ------------------------------------------------------------------------------------ preference accuracy


def read_pairs(path: str | Path) -> list[dict]:
    """Rows of an explicit-format JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def compute_preference_accuracy(policy_path: str, reference_path: str, pairs: Sequence[dict],
                                batch_size: int = 256) -> float:
    """Share of pairs where ``log pi(chosen)/pi_ref(chosen) > log pi(rejected)/pi_ref(rejected)`` (ties 1/2).

    The sign of the implicit-reward margin does not depend on beta. Pairs are tokenized as the data
    pipeline tokenizes them.
    """
    from dpo_ray.data.formats import TextPair
    from dpo_ray.data.tokenize import encode_pairs
    from dpo_ray.losses import compute_pair_accuracy
    from dpo_ray.modeling import score_pairs

    policy, tok = load_generation_model(policy_path, torch.get_num_threads())
    reference, _ = load_generation_model(reference_path, torch.get_num_threads())
    encoded = encode_pairs(tok, [TextPair(r["prompt"], r["chosen"], r["rejected"]) for r in pairs])
    hits = 0.0
    for start in range(0, len(encoded), batch_size):
        chunk = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in encoded[start : start + batch_size]]
        pc, pr = score_pairs(policy, chunk, tok.pad_token_id)
        rc, rr = score_pairs(reference, chunk, tok.pad_token_id)
        hits += compute_pair_accuracy((pc - rc) - (pr - rr)).sum().item()
    return hits / max(len(encoded), 1)
