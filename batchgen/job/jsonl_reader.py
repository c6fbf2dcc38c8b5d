"""JSONL (.gz) input: every line is a record; blank, malformed or undecodable lines are rows
with `error` set. Column types are inferred from the first records."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from batchgen.job.reader import NUM_SAMPLE_RECORDS, Reader, Row
from batchgen.job.row_selection import RowSelection


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
