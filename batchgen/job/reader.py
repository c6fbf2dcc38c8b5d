"""Input readers: JSONL (.gz), Parquet files/folders, Hugging Face datasets -> Row(index, fields).

Every reader streams: JSONL line by line, Parquet by row group in small batches (row groups
outside the selection are never read), datasets by slices or as a stream. `Row.index` is the
0-based input record index; for JSONL every line is a record, so a blank or malformed line
is a Row with `error` set (the job writes it as an error row and goes on).
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job.config import JobConfig, JobConfigError

NUM_SAMPLE_RECORDS = 100  # records the column checks and JSONL type inference look at
_BATCH_ROWS = 1024


@dataclass
class Row:
    index: int
    fields: dict[str, Any]
    error: str | None = None  # the record itself is unreadable


@dataclass
class RowSelection:
    """The rows a run still has to do: parts `p % num_shards == shard_index`, minus the
    committed ones; a part committed short (by --limit) resumes after its last row."""
    rows_per_part: int
    shard_index: int = 0
    num_shards: int = 1
    done_parts: frozenset[int] = frozenset()
    resume_from: dict[int, int] = field(default_factory=dict)  # part -> first row not done
    stop: int | None = None  # exclusive row bound (--limit, or the input's length)

    def contains(self, row: int) -> bool:
        if self.stop is not None and row >= self.stop:
            return False
        part = row // self.rows_per_part
        return (part % self.num_shards == self.shard_index and part not in self.done_parts
                and row >= self.resume_from.get(part, 0))

    def overlaps(self, start: int, stop: int) -> bool:
        """Whether any row in [start, stop) is selected (to skip whole row groups)."""
        if self.stop is not None:
            stop = min(stop, self.stop)
        for part in range(start // self.rows_per_part, (stop - 1) // self.rows_per_part + 1):
            if part % self.num_shards != self.shard_index or part in self.done_parts:
                continue
            first = max(start, part * self.rows_per_part, self.resume_from.get(part, 0))
            if first < min(stop, (part + 1) * self.rows_per_part):
                return True
        return False


class Reader:
    """Base: `columns` (input column names), `schema` (their arrow types), `num_rows`
    (None when unknown until the end), `iter_rows(selection)`, `sample()`."""
    columns: list[str]
    schema: pa.Schema
    num_rows: int | None

    def iter_rows(self, selection: RowSelection) -> Iterator[Row]:
        raise NotImplementedError

    def sample(self) -> list[dict[str, Any]]:
        """Up to NUM_SAMPLE_RECORDS readable records from the start (for column checks)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the job fingerprint records about the input."""
        raise NotImplementedError

    def output_value(self, name: str, value: Any) -> Any:
        """`value` of input column `name` as stored in the parts (fits `schema`)."""
        return value


def open_reader(job: JobConfig) -> Reader:
    path = job.input
    kind = job.input_format
    if kind in ("auto", "openai"):
        kind = detect_format(path) if kind == "auto" else "jsonl"
    if kind == "jsonl":
        return JsonlReader(path)
    if kind == "parquet":
        return ParquetReader(path)
    if kind == "hf":
        return HFDatasetReader(path, split=job.split)
    raise JobConfigError(f"cannot read input {path}")


def detect_format(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() \
                or (p / "dataset_dict.json").is_file():
            return "hf"
        if any(_parquet_files(p)):
            return "parquet"
        raise JobConfigError(f"input folder {path} holds no .parquet files and no saved dataset")
    if not p.exists():
        return "hf"  # a hub dataset id (config validation let it through)
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".gz")):
        return "jsonl"
    raise JobConfigError(f"cannot tell the format of {path}; pass --input-format")


# ---- JSONL --------------------------------------------------------------------------

# JSON value kind -> arrow type of the output column
_KIND_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "string": pa.string(),
               "json": pa.string()}


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -2**63 <= value < 2**63 else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "json"


def _merge_kinds(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    if {a, b} == {"int", "float"}:
        return "float"
    return "json"


class JsonlReader(Reader):
    """One record per line (blank and malformed lines included); `.gz` is decompressed.
    Columns and their types come from the first NUM_SAMPLE_RECORDS JSON objects; a value
    that does not fit its column's type is stored as null (json-kind columns hold JSON text)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._num_rows: int | None = None
        kinds: dict[str, str | None] = {}
        for record in self.sample():
            for name, value in record.items():
                kinds[name] = _merge_kinds(kinds.get(name), _kind(value))
        self.kinds = {name: kind or "string" for name, kind in kinds.items()}
        self.columns = list(self.kinds)
        self.schema = pa.schema([(name, _KIND_TYPES[k]) for name, k in self.kinds.items()])

    def _open(self):
        if self.path.name.lower().endswith(".gz"):
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")

    @property
    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = count_lines(self._open)
        return self._num_rows

    def identity(self) -> dict[str, Any]:
        st = self.path.stat()
        return {"kind": "jsonl", "path": str(self.path.resolve()), "size": st.st_size,
                "head_sha256": _head_hash(self.path)}

    def sample(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with self._open() as f:
            for index, raw in enumerate(f):
                if len(out) >= NUM_SAMPLE_RECORDS or index >= 10 * NUM_SAMPLE_RECORDS:
                    break
                row = parse_jsonl_line(index, raw)
                if row.error is None:
                    out.append(row.fields)
        return out

    def iter_rows(self, selection: RowSelection) -> Iterator[Row]:
        with self._open() as f:
            for index, raw in enumerate(f):
                if selection.stop is not None and index >= selection.stop:
                    return
                if selection.contains(index):
                    yield parse_jsonl_line(index, raw)

    def output_value(self, name: str, value: Any) -> Any:
        kind = self.kinds.get(name)
        if value is None or kind is None:
            return None
        if kind == "json":
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if _merge_kinds(kind, _kind(value)) != kind:
            return None
        return float(value) if kind == "float" else value


def parse_jsonl_line(index: int, raw: bytes) -> Row:
    line = raw.rstrip(b"\r\n")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Row(index, {}, f"line {index + 1}: undecodable bytes (not UTF-8) at byte {e.start}")
    if not text.strip():
        return Row(index, {}, f"line {index + 1}: blank line")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return Row(index, {}, f"line {index + 1}: malformed JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return Row(index, {}, f"line {index + 1}: malformed JSON: nested too deeply")
    if not isinstance(record, dict):
        return Row(index, {}, f"line {index + 1}: a JSON {type(record).__name__}, not an object")
    return Row(index, record)


def count_lines(open_binary) -> int:
    """Records in a JSONL stream: newlines, plus one for a last line without one."""
    num, last = 0, b"\n"
    with open_binary() as f:
        while chunk := f.read(1 << 20):
            num += chunk.count(b"\n")
            last = chunk[-1:]
    return num + (last != b"\n")


def _head_hash(path: Path, num_bytes: int = 1 << 20) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(num_bytes)).hexdigest()[:16]


# ---- Parquet ------------------------------------------------------------------------


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))


class ParquetReader(Reader):
    """A .parquet file or a folder of them (sorted by path, read as one table)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.files = _parquet_files(self.path) if self.path.is_dir() else [self.path]
        if not self.files:
            raise JobConfigError(f"no .parquet files in {path}")
        try:
            metas = [pq.ParquetFile(f) for f in self.files]
        except (pa.ArrowInvalid, OSError) as e:
            raise JobConfigError(f"cannot read {path} as Parquet: {e}") from None
        self.schema = metas[0].schema_arrow
        for f, meta in zip(self.files[1:], metas[1:]):
            if not meta.schema_arrow.equals(self.schema):
                raise JobConfigError(f"{f} has a different schema from {self.files[0]}")
        self.columns = list(self.schema.names)
        self.num_rows = sum(m.metadata.num_rows for m in metas)

    def identity(self) -> dict[str, Any]:
        return {"kind": "parquet", "path": str(self.path.resolve()), "num_rows": self.num_rows,
                "files": [[str(f.relative_to(self.path)) if self.path.is_dir() else f.name,
                           f.stat().st_size] for f in self.files]}

    def sample(self) -> list[dict[str, Any]]:
        pf = pq.ParquetFile(self.files[0])
        for batch in pf.iter_batches(batch_size=NUM_SAMPLE_RECORDS):
            return batch.to_pylist()
        return []

    def iter_rows(self, selection: RowSelection) -> Iterator[Row]:
        offset = 0
        for path in self.files:
            pf = pq.ParquetFile(path)
            for group in range(pf.metadata.num_row_groups):
                num = pf.metadata.row_group(group).num_rows
                start = offset
                offset += num
                if selection.stop is not None and start >= selection.stop:
                    return
                if not selection.overlaps(start, start + num):
                    continue
                index = start
                for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group]):
                    if not selection.overlaps(index, index + batch.num_rows):
                        index += batch.num_rows
                        continue
                    for record in batch.to_pylist():
                        if selection.contains(index):
                            yield Row(index, record)
                        index += 1


# ---- Hugging Face datasets ----------------------------------------------------------


class HFDatasetReader(Reader):
    """A folder written by `save_to_disk` (memory-mapped, read by slices) or a hub dataset id
    (streamed through `datasets`; its length may only be known at the end)."""

    def __init__(self, path: str, split: str = "train") -> None:
        import datasets

        self.path, self.split = path, split
        try:
            if os.path.isdir(path):
                ds = datasets.load_from_disk(path)
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise JobConfigError(f"dataset {path} has no split {split!r} "
                                             f"(splits: {', '.join(ds)})")
                    ds = ds[split]
            else:
                ds = datasets.load_dataset(path, split=split, streaming=True)
        except JobConfigError:
            raise
        except Exception as e:
            raise JobConfigError(f"cannot open dataset {path}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        self.dataset = ds
        self.is_streaming = isinstance(ds, datasets.IterableDataset)
        features = ds.features
        if features is None:  # a stream without declared features: infer from the start
            first = next(iter(ds.take(1)), {})
            features = datasets.Features.from_arrow_schema(
                pa.Table.from_pylist([first]).schema) if first else datasets.Features()
        self.schema = features.arrow_schema
        self.columns = list(self.schema.names)
        self.num_rows = None if self.is_streaming else len(ds)
        if self.is_streaming:
            info = getattr(ds, "info", None)
            splits = getattr(info, "splits", None) or {}
            if split in splits and splits[split].num_examples:
                self.num_rows = splits[split].num_examples

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"kind": "hf", "path": self.path, "split": self.split}
        if not self.is_streaming:
            ident["path"] = str(Path(self.path).resolve())
            ident["fingerprint"] = getattr(self.dataset, "_fingerprint", None)
            ident["num_rows"] = self.num_rows
        return ident

    def sample(self) -> list[dict[str, Any]]:
        if self.is_streaming:
            return list(self.dataset.take(NUM_SAMPLE_RECORDS))
        view = self.dataset.with_format("arrow")  # respects select()/shuffle() indices
        return view[:NUM_SAMPLE_RECORDS].to_pylist()

    def iter_rows(self, selection: RowSelection) -> Iterator[Row]:
        if self.is_streaming:
            for index, record in enumerate(self.dataset):
                if selection.stop is not None and index >= selection.stop:
                    return
                if selection.contains(index):
                    yield Row(index, record)
            return
        view = self.dataset.with_format("arrow")  # slices are memory-mapped arrow tables
        stop = self.num_rows if selection.stop is None else min(selection.stop, self.num_rows)
        for start in range(0, stop, _BATCH_ROWS):
            end = min(start + _BATCH_ROWS, stop)
            if not selection.overlaps(start, end):
                continue
            for index, record in enumerate(view[start:end].to_pylist(), start):
                if selection.contains(index):
                    yield Row(index, record)
