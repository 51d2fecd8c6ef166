"""Reference log-probs, computed once as a Ray Data batch-inference stage, and the parquet cache.

:class:`ReferenceScorer` is an actor UDF that loads the reference model once per actor and adds
``ref_chosen_logps`` / ``ref_rejected_logps`` (float64, summed response log-probs) to every pair.

Cache entries are directories of parquet files under ``cfg.resolved_cache_dir()``, named by a key that
hashes everything the content depends on. An entry is written to a temporary sibling (``mode="overwrite"``),
its done-marker JSON last, and then renamed into place, so a half-written entry is never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from dpo_ray.data.reading import fingerprint_files

logger = logging.getLogger(__name__)

DONE_MARKER = "done.json"
PAIRS_DIR = "pairs"
SMALL_FILE_BYTES = 1 << 20  # model files up to this size (configs, tokenizers) are fingerprinted by content
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


# ---------------------------------------------------------------------------- cache entries


def compute_cache_key(parts: Mapping[str, Any]) -> str:
    """A short stable hash of ``parts`` (JSON, keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_cache_complete(directory: Path) -> bool:
    return (directory / DONE_MARKER).is_file()


@contextlib.contextmanager
def v1_parquet_reader():
    """Read parquet with Ray's V1 reader: the V2 reader of Ray 2.60 starts 32 footer-reading
    actors per read, 5-12 s for a small cache on a 2-CPU machine against about 0.5 s."""
    import ray

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def read_cached_pairs(directory: Path):
    """The stored pairs of a complete cache entry, materialized; None when there is no complete entry."""
    import ray

    if not is_cache_complete(directory):
        return None
    with v1_parquet_reader():
        return ray.data.read_parquet(str(directory / PAIRS_DIR)).materialize()


def read_cached_json(directory: Path, name: str) -> dict:
    return json.loads((directory / name).read_text())


def write_cache_entry(dataset, directory: Path, marker: Mapping[str, Any], extras: Mapping[str, Any] = ()) -> None:
    """Store ``dataset`` as parquet in ``directory/pairs`` with JSON ``extras`` and the done marker.

    Everything is written to a temporary sibling first and renamed into place; an entry another process
    completed meanwhile is kept, an unfinished one is replaced.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        dataset.write_parquet(str(staging / PAIRS_DIR), mode="overwrite")
        for name, content in dict(extras).items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")
        (staging / DONE_MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
        if is_cache_complete(directory):
            return
        shutil.rmtree(directory, ignore_errors=True)
        try:
            os.replace(staging, directory)
        except OSError:
            if not is_cache_complete(directory):  # else another process finished the same entry first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- model fingerprint


def fingerprint_model(name_or_path: str) -> dict[str, Any]:
    """What identifies a reference model: a local directory's files (small ones by content, weights by
    size and mtime), or a hub id with the cached snapshot revision when there is one."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        return {"path": str(path.resolve()), "files": fingerprint_files(files, path, hash_limit=SMALL_FILE_BYTES)}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id=name_or_path, filename="config.json")
    return {"hub_id": name_or_path, "snapshot": Path(cached).parent.name if isinstance(cached, str) else None}


# ---------------------------------------------------------------------------- the scoring stage


class ReferenceScorer:
    """Ray Data actor UDF: tokenized pairs -> the same rows plus the reference log-probs.

    The reference model runs as the policy does at step 0: the same precision recipe (weights dtype and
    autocast, :func:`dpo_ray.precision.resolve_precision`), the same scorer settings (prefix sharing and
    response-only logits as configured, the layout resolved per family by
    :class:`~dpo_ray.modeling.PairLogProbs`), in eval mode. Rows of a batch are scored in micro-batches of
    similar length (little padding), then put back in their order.
    """

    def __init__(self, model_path: str, dtype: str, mixed_precision: str, attn_implementation: str,
                 trust_remote_code: bool, pad_id: int, use_gpu: bool, micro_batch_size: int, chunk_size: int,
                 prefix_sharing: bool, response_only: bool, num_threads: int, micro_batch_tokens: int | str = 0):
        import torch

        from dpo_ray.epochs import resolve_micro_batch_tokens
        from dpo_ray.modeling import PairLogProbs, load_causal_lm
        from dpo_ray.precision import resolve_precision

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        self.recipe = resolve_precision(dtype, mixed_precision, self.device)
        lm = load_causal_lm(
            model_path,
            dtype=self.recipe.weights_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            device=self.device,
        )
        lm.eval()
        lm.requires_grad_(False)
        self.scorer = PairLogProbs(lm, prefix_sharing, chunk_size, response_only).eval()
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = resolve_micro_batch_tokens(micro_batch_tokens, self.device)  # as training's

    def score(self, pairs: list, num_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([N] chosen, [N] rejected) float64 summed reference log-probs of ``pairs`` (prompt, chosen,
        rejected id lists), scored in length-sorted micro-batches (``micro_batch_size`` pairs and
        ``micro_batch_tokens``, as training cuts its steps) under the recipe's autocast."""
        import torch

        from dpo_ray.epochs import plan_micro_batches

        chosen = np.zeros(len(pairs), dtype=np.float64)
        rejected = np.zeros(len(pairs), dtype=np.float64)
        order = np.argsort(num_tokens, kind="stable")
        for micro in plan_micro_batches(num_tokens[order].tolist(), self.micro_batch_size, self.micro_batch_tokens):
            idx = order[micro]
            batch = self.scorer.build_batch([pairs[i] for i in idx], self.pad_id, self.device)
            with torch.no_grad(), self.recipe.autocast():
                c, r = self.scorer(batch)
            chosen[idx] = c.double().cpu().numpy()
            rejected[idx] = r.double().cpu().numpy()
        return chosen, rejected

    def __call__(self, batch: pa.Table) -> pa.Table:
        # to_pylist copies out of Ray's read-only buffers before torch sees the ids.
        pairs = list(zip(*(batch.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))))
        chosen, rejected = self.score(pairs, batch.column("num_tokens").to_numpy())
        return batch.append_column(REFERENCE_COLUMNS[0], pa.array(chosen)).append_column(
            REFERENCE_COLUMNS[1], pa.array(rejected)
        )


def build_scoring_resources(cfg) -> dict[str, Any]:
    """map_batches resources for the scorer: one GPU per actor on GPU clusters; on CPU a fraction of a
    CPU per actor (whole-CPU actors can starve the rest of a small cluster), up to one per train worker."""
    import ray

    if cfg.scaling.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return {"num_gpus": 1, "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, gpus))}
    return {
        "num_cpus": cfg.scaling.cpus_per_worker / 2,
        "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.scaling.num_workers)),
    }


def add_reference_logps(pairs, cfg, model_path: str, pad_id: int):
    """``pairs`` (a Ray dataset of tokenized pairs) with the two reference columns, materialized."""
    from dpo_ray.precision import count_cpu_threads

    batch_size = 4 * cfg.train.micro_batch_size
    return pairs.map_batches(
        ReferenceScorer,
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "model_path": model_path,
            "dtype": cfg.model.dtype,
            "mixed_precision": cfg.train.mixed_precision,
            "attn_implementation": cfg.model.attn_implementation,
            "trust_remote_code": cfg.model.trust_remote_code,
            "pad_id": pad_id,
            "use_gpu": cfg.scaling.use_gpu,
            "micro_batch_size": cfg.train.micro_batch_size,
            "chunk_size": cfg.train.logits_chunk_size,
            "prefix_sharing": cfg.train.prefix_sharing,
            "response_only": cfg.train.response_only_logits,
            "num_threads": count_cpu_threads(cfg.scaling.cpus_per_worker),  # as the training workers
            "micro_batch_tokens": cfg.train.micro_batch_tokens,
        },
        **build_scoring_resources(cfg),
    ).materialize()


def build_reference_key(data_key: str, cfg, model_path: str) -> dict[str, Any]:
    """Everything the reference log-probs depend on besides the tokenized data (named by ``data_key``):
    the model, the resolved precision recipe on the scoring device, the attention implementation and
    the scorer's layout switches."""
    from dpo_ray.modeling import LENGTH_MULTIPLE
    from dpo_ray.precision import resolve_config_precision

    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    return {
        "data_key": data_key,
        "model": fingerprint_model(model_path),
        "precision": resolve_config_precision(cfg, device).describe(),  # weights, autocast, device
        "length_multiple": LENGTH_MULTIPLE,  # batches are padded to it, which can move the last bits
        "attn_implementation": cfg.model.attn_implementation,
        "prefix_sharing": cfg.train.prefix_sharing,
        "response_only_logits": cfg.train.response_only_logits,
    }


def prepare_reference_logps(pairs, data_dir: Path, data_key: str, cfg, model_path: str, pad_id: int):
    """Reference log-probs for ``pairs``, from the cache when the key matches, else computed and stored.

    Returns:
        (dataset with the reference columns, whether it was computed in this call, the cache directory).
    """
    parts = build_reference_key(data_key, cfg, model_path)
    key = compute_cache_key(parts)
    directory = data_dir / f"ref-{key}"
    cached = read_cached_pairs(directory)
    if cached is not None:
        logger.info("reference log-probs: reusing cache %s (key %s)", directory, key)
        return cached, False, directory
    logger.info("reference log-probs: computing with %s (key %s) -> %s", model_path, key, directory)
    scored = add_reference_logps(pairs, cfg, model_path, pad_id)
    write_cache_entry(scored, directory, {"key": key, "parts": parts, "rows": scored.count()})
    return scored, True, directory
