"""Sampling a model's answers with Ray Data.

:class:`AnswerSampler` is a Ray Data actor UDF: it loads a causal LM once per actor and, for each batch of
prompts, runs ``transformers``' ``generate`` (temperature sampling, or greedy) to get several answers per
prompt. :func:`sample_answers` runs it over a list of prompts with a small actor pool whose actors take a
fraction of a CPU each (a 1-CPU actor pool can starve a 2-CPU machine, see the Ray notes).

:mod:`dpo_ray.pairing` turns the sampled answers into preference pairs; this module knows no task.

Prompts are tokenized as the data pipeline tokenizes them (:mod:`dpo_ray.data.tokenize`): no special tokens,
then BOS in front, so a model sees its prompts the same way in training and in generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import pyarrow as pa
import ray
import torch

from dpo_ray.data.tokenize import prepend_bos
from dpo_ray.modeling import load_causal_lm, load_tokenizer

SAMPLES_COLUMN = "samples"


@dataclass
class GenerationSettings:
    """How :func:`sample_answers` samples."""

    num_samples: int = 8  # answers per prompt
    temperature: float = 1.0  # 0 = greedy (then num_samples is 1)
    max_new_tokens: int = 6
    seed: int = 0
    batch_size: int = 256  # prompts per generate call
    num_actors: int = 2  # actor pool size; each actor holds one copy of the model
    cpus_per_actor: float = 0.5  # fractional: leaves room for Ray Data's other tasks on 2 CPUs
    threads_per_actor: int = 1  # torch threads in each actor


# ------------------------------------------------------------------------------------ plain functions


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids as the DPO data pipeline builds them: the text's tokens with BOS in front."""

    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [prepend_bos(ids, tokenizer.bos_token_id) for ids in encoded]


def pad_prompts_left(tokenizer, prompt_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` [B, P] and ``attention_mask`` [B, P], the layout ``generate`` continues from."""
    return tokenizer.pad({"input_ids": [list(p) for p in prompt_ids]}, padding_side="left", return_tensors="pt")


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: Sequence[str], num_samples: int = 1, temperature: float = 0.0,
                       max_new_tokens: int = 6) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Continue each prompt ``num_samples`` times with ``model.generate``.

    ``temperature`` 0 is greedy decoding; otherwise plain sampling from the model's distribution at that
    temperature (top-k and top-p off, so at temperature 1 the samples follow the model exactly). Seed
    ``torch`` beforehand for reproducible samples.

    Returns:
        (prompt inputs: input_ids / attention_mask [B*num_samples, P], each prompt repeated num_samples
        times in a row; generated token ids [B*num_samples, G], padded after EOS with the pad token).
    """
    inputs = pad_prompts_left(tokenizer, encode_prompts(tokenizer, prompts))
    inputs = {k: v.repeat_interleave(num_samples, dim=0).to(model.device) for k, v in inputs.items()}
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **sampling)
    return inputs, output[:, inputs["input_ids"].shape[1] :]


def decode_responses(tokenizer, generated: torch.Tensor) -> list[str]:
    """Texts of generated ids [N, G], cut at the first EOS (special tokens dropped)."""
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


def group_samples(texts: Sequence[str], num_samples: int) -> list[list[str]]:
    """[B * k] texts, k per prompt in a row -> B lists of k."""
    return [list(texts[i : i + num_samples]) for i in range(0, len(texts), num_samples)]


def load_generation_model(model_path: str, threads: int = 1):
    """The model (fp32, eval mode) and its tokenizer, for generation in a Ray actor or a test."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per loaded model floods the driver's log
    torch.set_num_threads(max(1, threads))
    model = load_causal_lm(model_path, dtype=torch.float32)
    model.eval()
    return model, load_tokenizer(model_path)


def seed_for_batch(seed: int, first_index: int) -> int:
    """One seed per batch, fixed by the run seed and the batch's first prompt index (not by the actor)."""
    return (seed * 1_000_003 + first_index) % (2**31 - 1)


# ------------------------------------------------------------------------------------ Ray Data


class AnswerSampler:
    """Ray Data actor UDF: ``{index, prompt}`` rows -> the same rows plus ``samples`` (list of answer texts).

    The model is loaded once per actor. Each batch is seeded from the run seed and its first row's index,
    so the samples do not depend on which actor handles the batch.
    """

    def __init__(self, model_path: str, settings: dict):
        self.settings = GenerationSettings(**settings)
        self.model, self.tokenizer = load_generation_model(model_path, self.settings.threads_per_actor)

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.settings
        prompts = batch.column("prompt").to_pylist()
        indices = batch.column("index").to_pylist()
        torch.manual_seed(seed_for_batch(s.seed, min(indices)))
        k = s.num_samples if s.temperature > 0 else 1
        _, generated = generate_responses(self.model, self.tokenizer, prompts, k, s.temperature, s.max_new_tokens)
        samples = group_samples(decode_responses(self.tokenizer, generated), k)
        return batch.append_column(SAMPLES_COLUMN, pa.array(samples, pa.list_(pa.string())))


def build_prompt_dataset(prompts: Sequence[str], batch_size: int):
    """A Ray dataset of ``{index, prompt}`` rows, one block per ``batch_size`` prompts (fixed batches)."""

    table = pa.table({"index": pa.array(range(len(prompts)), pa.int64()),
                      "prompt": pa.array(list(prompts), pa.string())})
    return ray.data.from_arrow([table.slice(i, batch_size) for i in range(0, len(prompts), batch_size)])


def map_prompts(prompts: Sequence[str], batch_size: int, udf: type, constructor_kwargs: dict[str, Any], compute,
                num_cpus: float) -> list[dict[str, Any]]:
    """Run the actor UDF ``udf`` over the ``{index, prompt}`` rows of ``prompts`` (fixed batches of
    ``batch_size``) with Ray Data; returns its output rows in prompt order."""
    rows = (
        build_prompt_dataset(prompts, batch_size)
        .map_batches(udf, batch_size=batch_size, batch_format="pyarrow", compute=compute, num_cpus=num_cpus,
                     fn_constructor_kwargs=constructor_kwargs)
        .take_all()
    )
    return sorted(rows, key=lambda r: r["index"])


def sample_answers(prompts: Sequence[str], model_path: str, settings: GenerationSettings) -> list[list[str]]:
    """Answers of the model at ``model_path`` to each prompt (``settings.num_samples`` each), in prompt order.

    Runs :class:`AnswerSampler` on Ray Data with an actor pool of up to ``settings.num_actors`` actors.
    """

    if not prompts:
        return []
    rows = map_prompts(prompts, settings.batch_size, AnswerSampler,
                       {"model_path": model_path, "settings": asdict(settings)},
                       ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, settings.num_actors)),
                       settings.cpus_per_actor)
    return [list(r[SAMPLES_COLUMN]) for r in rows]
