#!/usr/bin/env python
"""How much memory a training worker's shard takes: Python lists of ints (the previous reader) against int32
columns (:mod:`dpo_ray.shard_columns`), at 1x, 10x and 50x the pairs given.

    python benchmarks/worker_data_memory.py --pairs <cache_dir>/<key>/pairs   # the data stage's output
    python benchmarks/worker_data_memory.py                                   # synthetic pairs, see below

``--pairs``: the data stage's parquet (the train pairs of a run's cache: token columns and reference
log-probs, tokenized by the real pipeline); it is replicated (row ids suffixed ``#k``) to scale it. Without
it, 1,800 synthetic pairs with HH-like lengths (log-normal prompt and response lengths) stand in.

Each (reader, scale) runs in a fresh process, which memory-maps the rows from an Arrow IPC file (as a
worker maps its shard from Ray's object store) and reads them with the worker's reader, from Arrow batches
converted by Ray's own block accessor. It reports the bytes the rows hold, and their peak while being read
(traced with ``tracemalloc`` in a second fresh process; Arrow's own buffers, the row ids of the new reader,
added from their sizes), and the process's resident memory before and after the read: RSS, and its
anonymous part (RssAnon, without the mapped rows: what the worker itself holds). No Ray cluster is started.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("row_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
READERS = ("python_lists", "int32_columns")
MIB = 1 << 20


class IpcShard:
    """A worker shard stand-in: the mapped table's record batches as its blocks, in ``batch_size``-row batches
    (``None``: whole blocks), in the format asked for, converted the way Ray Data converts its Arrow blocks."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, batch_size: int | None, batch_format: str, prefetch_batches: int = 0):
        from ray.data.block import BlockAccessor

        if batch_size is None:
            slices = (pa.Table.from_batches([b]) for b in self.table.to_batches())
        else:
            slices = (self.table.slice(s, batch_size) for s in range(0, self.table.num_rows, batch_size))
        for block in slices:
            yield BlockAccessor.for_block(block).to_batch_format(batch_format)


def collect_rows_as_python_lists(shard) -> list:
    """The previous worker reader (``collect_shard_rows`` before int32 columns): a PairRow of lists per row."""
    from dpo_ray.dpo import PairRow

    rows = []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy", prefetch_batches=0):
        has_ref = "ref_chosen_logps" in batch
        for i in range(len(batch["row_id"])):
            rows.append(
                PairRow(
                    row_id=str(batch["row_id"][i]),
                    prompt=[int(t) for t in batch["prompt_ids"][i]],
                    chosen=[int(t) for t in batch["chosen_ids"][i]],
                    rejected=[int(t) for t in batch["rejected_ids"][i]],
                    ref_chosen=float(batch["ref_chosen_logps"][i]) if has_ref else 0.0,
                    ref_rejected=float(batch["ref_rejected_logps"][i]) if has_ref else 0.0,
                )
            )
    return rows


def make_synthetic_pairs(n: int = 1800, seed: int = 0) -> pa.Table:
    """``n`` pairs with HH-like lengths: log-normal prompts (median ~90 tokens), responses (median ~50)."""
    rng = np.random.default_rng(seed)

    def lengths(median: float) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(median), 0.8, n).astype(np.int64), 1, 900)

    def tokens(lens: np.ndarray) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(3, 2048, offsets[-1], np.int32)))

    return pa.table({
        "row_id": pa.array([f"synthetic.jsonl:{i}" for i in range(n)]),
        "prompt_ids": tokens(lengths(90)),
        "chosen_ids": tokens(lengths(50)),
        "rejected_ids": tokens(lengths(50)),
        "ref_chosen_logps": pa.array(-rng.random(n) * 100),
        "ref_rejected_logps": pa.array(-rng.random(n) * 100),
    })


def load_pairs(path: str | None) -> tuple[pa.Table, str]:
    """(the pairs, where they come from): the data stage's parquet, else synthetic pairs."""
    if path is None:
        return make_synthetic_pairs(), "synthetic (HH-like lengths)"
    table = pq.read_table(path)
    missing = [c for c in COLUMNS[:4] if c not in table.column_names]
    if missing:
        raise SystemExit(f"{path}: no column {', '.join(missing)}; pass the data stage's pairs parquet")
    return table.select([c for c in COLUMNS if c in table.column_names]), f"data stage output {path}"


def write_scaled(table: pa.Table, scale: int, path: Path) -> None:
    """``scale`` copies of ``table`` (row ids suffixed ``#k`` from the second copy on) to an Arrow IPC file."""
    copies = [table] + [
        table.set_column(0, "row_id", pa.array([f"{r}#{k}" for r in table.column("row_id").to_pylist()]))
        for k in range(1, scale)
    ]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for copy in copies:
            writer.write_table(copy, max_chunksize=4096)


def read_memory() -> dict[str, float]:
    """This process's resident memory, in MiB: all of it (RSS) and its anonymous part (RssAnon: the heap and
    arrays, without the mapped rows, which a worker maps from the object store's shared memory)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {k: float(status[k].split()[0]) for k in ("VmRSS", "RssAnon")}
    return {"rss_mib": kib["VmRSS"] / 1024, "anon_mib": kib["RssAnon"] / 1024}


def read_rows(reader: str, shard):
    """The rows of ``shard`` read the ``reader`` way."""
    from dpo_ray.dpo import collect_shard_rows

    return collect_rows_as_python_lists(shard) if reader == "python_lists" else collect_shard_rows(shard)


def measure_child(reader: str, ipc_path: str, trace: bool) -> dict:
    """In a fresh process: read the mapped rows with ``reader``; bytes held and memory before/after."""
    import dpo_ray.dpo  # noqa: F401  torch, transformers: what a worker has loaded before it reads its shard

    table = pa.ipc.open_file(pa.memory_map(ipc_path)).read_all()
    read_rows(reader, IpcShard(table.slice(0, 8)))  # warm-up: lazy imports (Ray Data's batch conversion) load now
    shard = IpcShard(table)
    gc.collect()
    before = read_memory()
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    rows = read_rows(reader, shard)
    seconds = time.perf_counter() - start
    gc.collect()
    result = {"rows": len(rows), "read_seconds": seconds, "before": before, "after": read_memory()}
    if trace:
        result["traced_bytes"], result["traced_peak_bytes"] = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if reader == "int32_columns":
            result["traced_bytes"] += rows.row_ids.nbytes  # Arrow's buffers: not seen by tracemalloc
            result["tokens"] = int(rows.num_tokens.sum())
    return result


def run_child(reader: str, ipc_path: Path, trace: bool) -> dict:
    """:func:`measure_child` in a fresh interpreter (this script, ``--child``)."""
    cmd = [sys.executable, __file__, "--child", reader, str(ipc_path)] + (["--trace"] if trace else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    """A markdown table of the measurements, one row per scale and reader."""
    lines = [
        "| scale | pairs | tokens | reader | rows hold (peak while reading) | bytes/token | "
        "RSS before -> after (MiB) | RssAnon before -> after (MiB) | read s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, a = r["memory"]["before"], r["memory"]["after"]
        lines.append(
            f"| {r['scale']}x | {r['rows']} | {r['tokens']} | {r['reader']} | {r['bytes'] / MIB:.1f} MiB "
            f"({r['peak_bytes'] / MIB:.1f}) | {r['bytes'] / r['tokens']:.1f} | "
            f"{b['rss_mib']:.0f} -> {a['rss_mib']:.0f} | "
            f"{b['anon_mib']:.0f} -> {a['anon_mib']:.0f} (+{a['anon_mib'] - b['anon_mib']:.0f}) | "
            f"{r['memory']['read_seconds']:.1f} |"
        )
    return "\n".join(lines)


def measure_all(table: pa.Table, scales: list[int], workdir: Path) -> list[dict]:
    """Every (scale, reader): traced bytes from one fresh process, resident memory from another."""
    results = []
    for scale in scales:
        ipc_path = workdir / f"pairs_x{scale}.arrow"
        write_scaled(table, scale, ipc_path)
        tokens = None
        for reader in READERS:
            traced = run_child(reader, ipc_path, trace=True)
            tokens = traced.get("tokens", tokens)
            memory = run_child(reader, ipc_path, trace=False)
            results.append({"scale": scale, "reader": reader, "rows": traced["rows"], "bytes": traced["traced_bytes"],
                            "peak_bytes": traced["traced_peak_bytes"], "memory": memory})
        for r in results[-len(READERS):]:
            r["tokens"] = tokens
        ipc_path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", help="the data stage's pairs parquet (file or directory); default: synthetic")
    parser.add_argument("--scales", default="1,10,50", help="comma-separated replication factors")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("READER", "IPC"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child(args.child[0], args.child[1], args.trace)))
        return
    table, source = load_pairs(args.pairs)
    with tempfile.TemporaryDirectory(prefix="worker-data-memory-") as tmp:
        results = measure_all(table, [int(s) for s in args.scales.split(",")], Path(tmp))
    print(f"pairs: {source}, {table.num_rows} rows at 1x\n")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "results": results}, indent=1))


if __name__ == "__main__":
    main()
