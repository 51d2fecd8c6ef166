"""A worker's dataset shard held as columns, so that a worker's rows cost about 4 bytes per token.

Holding a shard as Python objects (a ``list[int]`` per field per row) costs about 36 bytes per token: an 8-byte
pointer plus a 28-byte ``int`` for every id above 256. :class:`ShardColumns` keeps each token field as one
concatenated int32 array with int64 offsets, each float field (reference log-probs) as one float64 array, and
the row ids as one Arrow string array. A row object (with small Python lists, as the batch builders take
them) is made only when a step or an evaluation asks for that row, so what :mod:`dpo_ray.modeling` sees is
unchanged.

Rows keep the shard's order (the driver cuts deterministic shards, see :func:`dpo_ray.trainer.split_for_workers`)
and a row's fields come back with the same values as the Arrow columns hold, so epoch plans, batches and
resumes are the same as with Python lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class RaggedTokens:
    """One token field of every row: ``values[offsets[i]:offsets[i + 1]]`` are row ``i``'s ids."""

    values: np.ndarray  # [total tokens] int32
    offsets: np.ndarray  # [rows + 1] int64, offsets[0] == 0

    @property
    def lengths(self) -> np.ndarray:
        """[rows] int64 token count of each row."""
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes

    def row(self, i: int) -> list[int]:
        """Row ``i``'s ids as a Python list (what the batch builders take)."""
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()


class ShardColumns(Sequence):
    """The rows of a shard, columnar. ``store[i]`` makes row ``i`` with ``make_row(row_id, **fields)``.

    ``tokens``: row attribute -> :class:`RaggedTokens`; ``floats``: row attribute -> [rows] float64 array.
    ``num_tokens`` ([rows] int64, all token fields added) is what length bucketing sorts by.
    """

    def __init__(self, row_ids: pa.Array, tokens: Mapping[str, RaggedTokens], floats: Mapping[str, np.ndarray],
                 make_row: Callable[..., Any]):
        self.row_ids, self.tokens, self.floats, self.make_row = row_ids, dict(tokens), dict(floats), make_row
        n = len(row_ids)
        for name, field in self.tokens.items():
            if len(field.offsets) != n + 1:
                raise ValueError(f"token field {name!r} has {len(field.offsets) - 1} rows, the row ids {n}")
        for name, values in self.floats.items():
            if len(values) != n:
                raise ValueError(f"float field {name!r} has {len(values)} rows, the row ids {n}")
        self.num_tokens = sum((f.lengths for f in self.tokens.values()), np.zeros(n, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of a shard of {n} rows")
        i = int(i) % n
        fields = {name: field.row(i) for name, field in self.tokens.items()}
        fields.update((name, float(values[i])) for name, values in self.floats.items())
        return self.make_row(self.row_ids[i].as_py(), **fields)

    @property
    def nbytes(self) -> int:
        """Bytes the columns hold (token values and offsets, floats, row ids)."""
        return (
            sum(f.nbytes for f in self.tokens.values())
            + sum(v.nbytes for v in self.floats.values())
            + self.row_ids.nbytes
            + self.num_tokens.nbytes
        )


def count_row_tokens(rows: Sequence) -> list[int]:
    """Each row's ``num_tokens``, read from the columns when ``rows`` is a :class:`ShardColumns`."""
    if isinstance(rows, ShardColumns):
        return rows.num_tokens.tolist()
    return [r.num_tokens for r in rows]


def list_row_ids(rows: Sequence) -> list[str]:
    """Each row's ``row_id``, read from the columns when ``rows`` is a :class:`ShardColumns`."""
    if isinstance(rows, ShardColumns):
        return rows.row_ids.to_pylist()
    return [r.row_id for r in rows]


def find_first_null_row(column: pa.Array, row_ids: pa.Array) -> str:
    """The row id of ``column``'s first null (for error messages)."""
    first = pc.index(pc.is_null(column), True).as_py()
    return str(row_ids[first].as_py())


def read_column(batch: pa.Table, name: str) -> pa.Array:
    """Column ``name`` of ``batch`` as one array: the chunk itself when there is one (``combine_chunks`` would
    copy it, and Arrow's allocator keeps the freed copies' pages)."""
    column = batch.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def convert_tensor_column(column: pa.Array) -> pa.Array:
    """A tensor column as a list column; any other column as it is.

    A ``map_batches(..., batch_format="numpy")`` upstream (a user's transform, or a test's) turns Ray Data's list
    columns into its tensor extension types (``ArrowVariableShapedTensorType``, ``ArrowTensorType``); this reads
    them back into lists, one copy.
    """
    if not isinstance(column.type, pa.ExtensionType) or not hasattr(column, "to_numpy"):
        return column
    rows = column.to_numpy(zero_copy_only=False)
    return pa.array([None if r is None else np.asarray(r).ravel() for r in rows])


def read_token_column(batch: pa.Table, name: str, row_ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """([tokens] int32 values, [rows] int64 lengths) of list column ``name`` of ``batch``.

    The values are a view of the batch's own buffer where they are int32 already (a worker's batches are
    blocks mapped from the object store): :func:`join_ragged` copies them once, so reading a shard needs
    about the memory of its columns and no more.
    """
    column = convert_tensor_column(read_column(batch, name))
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise ValueError(f"column {name!r} holds {column.type}, not lists of token ids")
    if column.null_count:
        raise ValueError(f"row {find_first_null_row(column, row_ids)}: {name} is null; the data stage must drop it")
    values = column.flatten()  # honours the slice a batch may be of its block
    if values.null_count:
        raise ValueError(f"column {name!r} holds a null token id")
    if values.type != pa.int32():
        try:
            values = values.cast(pa.int32())  # safe cast: an id that does not fit int32 raises
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(f"column {name!r}: token ids must be int32-sized integers ({err})") from err
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return values.to_numpy(zero_copy_only=False), lengths


def read_float_column(batch: pa.Table, name: str, row_ids: pa.Array) -> np.ndarray:
    """[rows] values of column ``name`` of ``batch`` (a view where they are float64 already; float64 holds
    float32 values exactly)."""
    column = read_column(batch, name)
    if column.null_count:
        raise ValueError(f"row {find_first_null_row(column, row_ids)}: {name} is null")
    return column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def read_row_ids(batch: pa.Table) -> pa.Array:
    """The batch's ``row_id`` column as one string array."""
    column = read_column(batch, "row_id")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    if column.null_count:
        raise ValueError("a row has a null row_id; the data stage gives every row one")
    return column


def require_columns(batch: pa.Table, names: list[str]) -> None:
    missing = [n for n in names if n not in batch.column_names]
    if missing:
        raise ValueError(f"the shard has no column {', '.join(map(repr, missing))} (it has {batch.column_names})")


def join_ragged(values: list[np.ndarray], lengths: list[np.ndarray]) -> RaggedTokens:
    """One :class:`RaggedTokens` from per-batch values and lengths (copied: no view of a batch is kept)."""
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    return RaggedTokens(np.concatenate(values, dtype=np.int32) if values else np.zeros(0, dtype=np.int32), offsets)


def read_shard_columns(shard, token_fields: Mapping[str, str], make_row: Callable[..., Any],
                       float_fields: Mapping[str, str] | None = None) -> ShardColumns:
    """All rows of ``shard`` (a Ray Data iterator or dataset; None: no rows), in shard order, as columns.

    ``token_fields`` / ``float_fields``: row attribute -> column. Float fields are optional: a shard without
    those columns gives rows without them (the row type's defaults); a shard with only some is an error.
    """
    float_fields = dict(float_fields or {})
    ids: list[pa.Array] = []
    values: dict[str, list[np.ndarray]] = {a: [] for a in token_fields}
    lengths: dict[str, list[np.ndarray]] = {a: [] for a in token_fields}
    floats: dict[str, list[np.ndarray]] = {}
    # whole blocks (batch_size=None): Ray then hands them over as mapped, neither sliced nor joined into copies
    batches = [] if shard is None else shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        require_columns(batch, ["row_id", *token_fields.values()])
        present = {a for a, c in float_fields.items() if c in batch.column_names}
        if ids and present != set(floats):
            raise ValueError(f"shard batches differ in their float columns: {sorted(present)} vs {sorted(floats)}")
        ids.append(read_row_ids(batch))
        for attr, name in token_fields.items():
            v, n = read_token_column(batch, name, ids[-1])
            values[attr].append(v)
            lengths[attr].append(n)
        for attr in present:
            floats.setdefault(attr, []).append(read_float_column(batch, float_fields[attr], ids[-1]))
    row_ids = pa.concat_arrays(ids) if ids else pa.array([], type=pa.string())
    tokens = {a: join_ragged(values[a], lengths[a]) for a in token_fields}
    return ShardColumns(row_ids, tokens, {a: np.concatenate(v, dtype=np.float64) for a, v in floats.items()}, make_row)
