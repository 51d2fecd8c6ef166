"""Finding and parsing preference data: local files, directories and Hugging Face datasets.

Every row gets a stable ``row_id``: ``"<file>:<line>"`` (1-based) for JSON lines, ``"<file>#<index>"``
(0-based) for JSON arrays, parquet and Hugging Face datasets. JSON is parsed by Arrow (strings stay
strings; pandas would turn ``" 3"`` into an int) with a line-by-line fallback that finds the bad lines.

The parsing functions are plain Python; :func:`read_parsed_dataset` runs them on Ray Data, one task per
file, and yields the intermediate rows of :data:`PARSED_SCHEMA`.

A file that cannot be read at all (a corrupt gzip or parquet file, no permission) stops a plain-Python
read with a :class:`DataValidationError` naming the file and the cause; on Ray Data it becomes one row
``unreadable_file`` named by the file (an exception raised in a Ray task reaches the driver without its
message), which the data report explains (:func:`explain_unreadable_file`) and the checks stop on.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import io
import itertools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from dpo_ray.config import resolve_data_path
from dpo_ray.data.formats import PAIR_FIELDS, DataValidationError, DropReason, apply_column_map, list_source_columns

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
GZIP_MAGIC = b"\x1f\x8b"
ARROW_BLOCK_BYTES = 64 << 20  # Arrow parses JSON in blocks; a line longer than this takes the slow path
CONTENT_HASH_LIMIT = 200 << 20  # data files up to this size are fingerprinted by content, larger by mtime
HF_ROWS_PER_BLOCK = 10_000
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException)  # what reading a broken file raises

PARSED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("file", pa.string()),  # the file name shown in row ids
        ("file_index", pa.int64()),  # order of the file in its source (for a deterministic order)
        ("position", pa.int64()),  # line number or row index inside the file
        ("record", pa.string()),  # JSON of the pair fields after the column mapping; null if unparseable
        ("drop_reason", pa.string()),
        ("drop_field", pa.string()),
    ]
)


class ParsedRecord(NamedTuple):
    """One row of a file: its id and position, and the record dict or the reason it has none."""

    row_id: str
    position: int
    record: dict | None
    problem: DropReason | None = None


@dataclass(frozen=True)
class DataFile:
    path: str  # absolute path
    name: str  # shown in row ids: the file name, or its path inside the source directory
    index: int  # order of the file inside its source


@dataclass(frozen=True)
class DataSource:
    """A resolved ``data.train`` / ``data.eval`` value."""

    key: str  # the config key it came from, for error messages
    spec: str  # the value as configured
    kind: str  # files | hf_disk | hf_hub
    location: str  # resolved local path, or the hub id
    split: str  # split of a Hugging Face dataset
    files: tuple[DataFile, ...] = ()
    ignored: tuple[str, ...] = ()  # files in a data directory that are not data files

    def display_name(self) -> str:
        """How rows of a Hugging Face dataset are named in row ids."""
        return f"{Path(self.location).name or self.location}[{self.split}]"


# ---------------------------------------------------------------------------- resolving sources


def has_data_suffix(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def is_saved_hf_dataset(path: Path) -> bool:
    """True for a ``save_to_disk`` directory (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def list_data_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """Data files under ``directory`` (sorted, recursive; hidden and ``_``-prefixed paths skipped) and
    the other files found there."""
    data, other = [], []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if any(part.startswith((".", "_")) for part in path.relative_to(directory).parts):
            continue
        (data if has_data_suffix(path.name) else other).append(path)
    return data, other


def resolve_source(spec: str, split: str, key: str = "data.train") -> DataSource:
    """Find what ``spec`` names: a data file, a directory of them, a ``save_to_disk`` directory, or a hub id.

    Raises:
        DataValidationError: the path does not exist (and is no hub id), or a directory holds no data files.
    """
    path = Path(resolve_data_path(spec))
    if path.is_file():
        if not has_data_suffix(path.name):
            raise DataValidationError(f"{key}: {path} is not a {'/'.join(DATA_SUFFIXES)} file")
        return DataSource(key, spec, "files", str(path), split, (DataFile(str(path), path.name, 0),))
    if path.is_dir():
        if is_saved_hf_dataset(path):
            return DataSource(key, spec, "hf_disk", str(path), split)
        data, other = list_data_files(path)
        if not data:
            raise DataValidationError(f"{key}: directory {path} holds no {'/'.join(DATA_SUFFIXES)} files")
        files = tuple(DataFile(str(p), p.relative_to(path).as_posix(), i) for i, p in enumerate(data))
        return DataSource(key, spec, "files", str(path), split, files, tuple(p.name for p in other))
    if HUB_ID.match(spec) and not has_data_suffix(spec):
        return DataSource(key, spec, "hf_hub", spec, split)
    raise DataValidationError(f"{key}: no such file or directory: {spec}")


@functools.lru_cache(maxsize=4)
def load_hf_dataset(source: DataSource):
    """The ``datasets.Dataset`` of a ``save_to_disk`` directory or a hub id, for ``source.split``."""
    import datasets

    if source.kind == "hf_disk":
        loaded = datasets.load_from_disk(source.location)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataValidationError(
                    f"{source.key}: {source.location} has splits {sorted(loaded)}, not '{source.split}' "
                    "(set data.split)"
                )
            return loaded[source.split]
        return loaded
    try:
        return datasets.load_dataset(source.location, split=source.split)
    except Exception as err:  # the hub raises many kinds; all mean "cannot use this value"
        raise DataValidationError(
            f"{source.key}: '{source.spec}' is not a local file or directory, and loading it as a Hugging Face "
            f"dataset (split '{source.split}') failed: {err}"
        ) from err


# ---------------------------------------------------------------------------- parsing bytes


def keep_present(columns: list[str] | None, names: Iterable[str]) -> list[str] | None:
    """The ``columns`` found among ``names`` (None, meaning all, stays None)."""
    present = set(names)
    return None if columns is None else [c for c in columns if c in present]


def select_fields(record: Mapping[str, Any], columns: Iterable[str] | None) -> dict:
    """The record restricted to ``columns`` (all of it when None)."""
    return dict(record) if columns is None else {c: record[c] for c in columns if c in record}


def is_json_native(tp: pa.DataType) -> bool:
    """True for Arrow types that JSON values map to; Arrow also infers timestamps from strings."""
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        return is_json_native(tp.value_type)
    if pa.types.is_struct(tp):
        return all(is_json_native(f.type) for f in tp)
    return any(
        check(tp)
        for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
                      pa.types.is_boolean, pa.types.is_null)
    )


def read_json_lines_with_arrow(data: bytes, expected_rows: int, columns: list[str] | None) -> list[dict] | None:
    """Parse JSON lines with Arrow; None when it cannot be trusted to give one exact record per line
    (a bad line, invalid UTF-8, mixed types, two objects on a line, an inferred timestamp)."""
    try:
        data.decode("utf-8")
        block = min(max(len(data), 1 << 20), ARROW_BLOCK_BYTES)
        table = pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=block))
    except (pa.ArrowException, UnicodeDecodeError):
        return None
    if table.num_rows != expected_rows:
        return None
    if columns is not None:
        table = table.select(keep_present(columns, table.column_names))
    if not all(is_json_native(f.type) for f in table.schema):
        return None
    return table.to_pylist()


def scan_json_lines(name: str, lines: Iterable[bytes], columns: list[str] | None = None) -> Iterator[ParsedRecord]:
    """Parse JSON lines one by one with the standard library; bad lines come back with their reason."""
    for number, raw in enumerate(lines, 1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        row_id = f"{name}:{number}"
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield ParsedRecord(row_id, number, None, DropReason.INVALID_UTF8)
            continue
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            yield ParsedRecord(row_id, number, None, DropReason.UNPARSEABLE_LINE)
            continue
        yield ParsedRecord(row_id, number, select_fields(value, columns))


def parse_json_lines(name: str, data: bytes, columns: list[str] | None = None) -> list[ParsedRecord]:
    """JSON lines: Arrow's fast path, or the line scanner when Arrow cannot be trusted."""
    lines = data.split(b"\n")
    numbers = [n for n, line in enumerate(lines, 1) if line.strip()]
    records = read_json_lines_with_arrow(data, len(numbers), columns)
    if records is None:
        return list(scan_json_lines(name, lines, columns))
    return [ParsedRecord(f"{name}:{n}", n, record) for n, record in zip(numbers, records)]


def parse_json_array(name: str, data: bytes, columns: list[str] | None = None) -> list[ParsedRecord]:
    """A JSON array of objects; a file that does not parse is one bad row at the line of the error."""
    try:
        values = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return [ParsedRecord(f"{name}:{line}", line, None, DropReason.INVALID_UTF8)]
    except json.JSONDecodeError as err:
        return [ParsedRecord(f"{name}:{err.lineno}", err.lineno, None, DropReason.UNPARSEABLE_LINE)]
    if not isinstance(values, list):
        return [ParsedRecord(f"{name}:1", 1, None, DropReason.UNPARSEABLE_LINE)]
    return [
        ParsedRecord(f"{name}#{i}", i, select_fields(v, columns))
        if isinstance(v, dict)
        else ParsedRecord(f"{name}#{i}", i, None, DropReason.UNPARSEABLE_LINE)
        for i, v in enumerate(values)
    ]


def records_from_table(name: str, table: pa.Table, start: int = 0) -> list[ParsedRecord]:
    """Rows of an Arrow table (parquet, Hugging Face) as records named ``<name>#<index>``."""
    return [ParsedRecord(f"{name}#{start + i}", start + i, record) for i, record in enumerate(table.to_pylist())]


def read_parquet_table(source: Any, columns: list[str] | None) -> pa.Table:
    """The ``columns`` (those present) of a parquet file or buffer."""
    parquet = pq.ParquetFile(source)
    return parquet.read(columns=keep_present(columns, parquet.schema_arrow.names))


def decompress(name: str, data: bytes) -> bytes:
    """Gunzip bytes that are gzip (Ray's file reader may already have done it from the suffix)."""
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise DataValidationError(f"{name}: not a readable gzip file ({err})") from err


def is_json_array(data: bytes) -> bool:
    return data.lstrip(codecs.BOM_UTF8 + b" \t\r\n")[:1] == b"["


def parse_file_bytes(name: str, data: bytes, columns: list[str] | None = None) -> list[ParsedRecord]:
    """Parse one data file's bytes (any of :data:`DATA_SUFFIXES`) into records."""
    data = decompress(name, data)
    if name.lower().endswith(".parquet"):
        return records_from_table(name, read_parquet_table(pa.BufferReader(data), columns))
    if name.lower().endswith((".json", ".json.gz")) and is_json_array(data):
        return parse_json_array(name, data.removeprefix(codecs.BOM_UTF8), columns)
    return parse_json_lines(name, data, columns)


# ---------------------------------------------------------------------------- plain-Python reading


def open_maybe_gzip(path: str):
    """A binary file object, gunzipping when the file starts with the gzip magic."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def describe_read_error(path: str, err: Exception) -> str:
    """``"<path>: cannot be read (<cause>)"``; a :class:`DataValidationError` already names its file."""
    if isinstance(err, DataValidationError):
        return str(err)
    return f"{path}: cannot be read ({type(err).__name__}: {err})"


def iter_file_records(file: DataFile, columns: list[str] | None = None) -> Iterator[ParsedRecord]:
    """Stream one file's records (JSON lines line by line, parquet batch by batch).

    Raises:
        DataValidationError: the file cannot be read (naming its path and the cause).
    """
    try:
        yield from stream_file_records(file, columns)
    except READ_ERRORS as err:
        raise DataValidationError(describe_read_error(file.path, err)) from err


def stream_file_records(file: DataFile, columns: list[str] | None = None) -> Iterator[ParsedRecord]:
    """:func:`iter_file_records` without the error translation."""
    if file.name.lower().endswith(".parquet"):
        parquet = pq.ParquetFile(file.path)
        start = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=keep_present(columns, parquet.schema_arrow.names)):
            yield from records_from_table(file.name, pa.Table.from_batches([batch]), start)
            start += batch.num_rows
        return
    with open_maybe_gzip(file.path) as f:
        if file.name.lower().endswith((".json", ".json.gz")) and is_json_array(f.peek(64)[:64]):
            yield from parse_json_array(file.name, f.read().removeprefix(codecs.BOM_UTF8), columns)
        else:
            yield from scan_json_lines(file.name, f, columns)


def iter_source_records(source: DataSource, columns: list[str] | None = None) -> Iterator[ParsedRecord]:
    """Stream the records of a whole source in order, without Ray (for format detection, tokenizer texts)."""
    if source.kind == "files":
        for file in source.files:
            yield from iter_file_records(file, columns)
        return
    dataset = load_hf_dataset(source)
    for start in range(0, len(dataset), 1024):
        table = dataset.with_format("arrow")[start : start + 1024]
        if columns is not None:
            table = table.select(keep_present(columns, table.column_names))
        yield from records_from_table(source.display_name(), table, start)


def peek_records(source: DataSource, column_map: Mapping[str, str], count: int = 200) -> list[ParsedRecord]:
    """The first ``count`` rows of ``source`` (unparseable ones included), column-mapped."""
    rows = itertools.islice(iter_source_records(source, list_source_columns(column_map)), count)
    return [r if r.record is None else r._replace(record=apply_column_map(r.record, column_map)) for r in rows]


def join_record_texts(record: Mapping[str, Any]) -> str:
    """The prompt/chosen/rejected texts of a record in one string (message contents for chat rows)."""
    parts = []
    for field in PAIR_FIELDS:
        value = record.get(field)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
    return "\n".join(p for p in parts if p.strip())


def read_preference_texts(source: str, limit: int) -> list[str]:
    """Up to ``limit`` texts (prompt, chosen and rejected joined) from a local file or directory.

    Plain Python, no Ray; used to train the tiny model's tokenizer. ``limit <= 0`` reads everything.
    """
    resolved = resolve_source(source, split="train")
    records = (r.record for r in iter_source_records(resolved, list(PAIR_FIELDS)) if r.record is not None)
    texts = (t for t in map(join_record_texts, records) if t)
    return list(itertools.islice(texts, limit if limit > 0 else None))


# ---------------------------------------------------------------------------- Ray Data reading


def encode_record(record: Mapping[str, Any]) -> str:
    """JSON text of a record; values JSON cannot hold become a marker dict (a non-string field)."""
    return json.dumps(record, ensure_ascii=False, default=lambda value: {"unsupported_type": type(value).__name__})


def build_parsed_table(parsed: list[ParsedRecord], file_name: str, file_index: int,
                       column_map: Mapping[str, str]) -> pa.Table:
    """Rows of :data:`PARSED_SCHEMA` from one file's parsed records."""
    return pa.table(
        {
            "row_id": [p.row_id for p in parsed],
            "file": [file_name] * len(parsed),
            "file_index": [file_index] * len(parsed),
            "position": [p.position for p in parsed],
            "record": [None if p.record is None else encode_record(apply_column_map(p.record, column_map))
                       for p in parsed],
            "drop_reason": [None if p.problem is None else p.problem.value for p in parsed],
            "drop_field": [None] * len(parsed),
        },
        schema=PARSED_SCHEMA,
    )


def read_file_records(file: DataFile, columns: list[str] | None = None) -> list[ParsedRecord]:
    """All records of one file, read whole and parsed by :func:`parse_file_bytes` (what a Ray task does).

    Raises:
        DataValidationError: the file cannot be read (naming it and the cause).
    """
    try:
        return parse_file_bytes(file.name, Path(file.path).read_bytes(), columns)
    except (*READ_ERRORS, DataValidationError) as err:
        raise DataValidationError(describe_read_error(file.name, err)) from err


def parse_file_batch(batch: pa.Table, columns: list[str], column_map: dict[str, str]) -> pa.Table:
    """Ray UDF: file rows (path, name, index) -> the parsed rows of each file; a file that cannot be read
    is one ``unreadable_file`` row whose row id is the file name."""
    tables = []
    for path, name, index in zip(*batch.select(["path", "name", "index"]).to_pydict().values()):
        try:
            parsed = read_file_records(DataFile(path, name, index), columns)
        except DataValidationError:
            parsed = [ParsedRecord(name, 0, None, DropReason.UNREADABLE_FILE)]
        tables.append(build_parsed_table(parsed, name, index, column_map))
    return pa.concat_tables(tables) if tables else PARSED_SCHEMA.empty_table()


def explain_unreadable_file(source: DataSource, name: str) -> str:
    """Why file ``name`` of ``source`` cannot be read, found by reading it again in this process."""
    for file in source.files:
        if file.name == name:
            try:
                read_file_records(file)
            except DataValidationError as err:
                return str(err)
            return f"{name}: a Ray task could not read it, but it reads here (is it on every node?)"
    return f"{name}: not a file of {source.key}"


def parse_hf_batch(batch: pa.Table, name: str, column_map: dict[str, str]) -> pa.Table:
    """Ray UDF: rows of a Hugging Face dataset (with their index in ``__position``) -> parsed rows."""
    positions = batch.column("__position").to_pylist()
    records = batch.drop_columns(["__position"]).to_pylist()
    parsed = [ParsedRecord(f"{name}#{pos}", pos, record) for pos, record in zip(positions, records)]
    return build_parsed_table(parsed, name, 0, column_map)


def read_parsed_dataset(source: DataSource, column_map: Mapping[str, str]):
    """A Ray dataset of :data:`PARSED_SCHEMA` rows for every row of ``source`` (bad ones included)."""
    import ray

    columns = list_source_columns(column_map)
    if source.kind == "files":
        # The task reads the bytes itself (no read_binary_files): Arrow would gunzip by suffix in the read
        # task, where a corrupt file fails the whole dataset with a message that does not name it.
        files = [{"path": f.path, "name": f.name, "index": f.index} for f in source.files]
        return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
            parse_file_batch, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"columns": columns, "column_map": dict(column_map)},
        )
    dataset = load_hf_dataset(source)
    table = dataset.with_format("arrow")[:]
    table = table.select(keep_present(columns, table.column_names))
    table = table.append_column("__position", pa.array(range(table.num_rows), pa.int64()))
    slices = [table.slice(i, HF_ROWS_PER_BLOCK) for i in range(0, max(table.num_rows, 1), HF_ROWS_PER_BLOCK)]
    return ray.data.from_arrow(slices).map_batches(
        parse_hf_batch, batch_format="pyarrow",
        fn_kwargs={"name": source.display_name(), "column_map": dict(column_map)},
    )


# ---------------------------------------------------------------------------- fingerprints


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint_files(paths: Iterable[Path], root: Path | None = None,
                      hash_limit: int = CONTENT_HASH_LIMIT) -> list[dict]:
    """Name (relative to ``root``), size and content hash of each file; mtime instead of the hash for
    files above ``hash_limit`` bytes."""
    prints = []
    for path in sorted(paths):
        stat = path.stat()
        entry: dict[str, Any] = {"name": path.relative_to(root).as_posix() if root else str(path), "size": stat.st_size}
        if stat.st_size <= hash_limit:
            entry["sha256"] = hash_file(path)
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
        prints.append(entry)
    return prints


def fingerprint_source(source: DataSource) -> dict:
    """What identifies the data of ``source``: its files' names, sizes and hashes (hub: its cache files)."""
    base = {"kind": source.kind, "location": source.location, "split": source.split}
    if source.kind == "files":
        root = Path(source.location)
        root = root if root.is_dir() else root.parent
        return {**base, "files": fingerprint_files([Path(f.path) for f in source.files], root)}
    if source.kind == "hf_disk":
        root = Path(source.location)
        return {**base, "files": fingerprint_files([p for p in root.rglob("*") if p.is_file()], root)}
    cache_files = [Path(c["filename"]) for c in load_hf_dataset(source).cache_files]
    return {**base, "files": fingerprint_files(cache_files, hash_limit=0)}
