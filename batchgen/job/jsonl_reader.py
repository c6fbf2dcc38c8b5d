"""JSONL (.gz) input: every line is a record; blank, malformed or undecodable lines are rows
with `error` set. Columns and their types are inferred over the whole file, so no value is
lost to a type or a column first seen late."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from batchgen.job.config import JobConfigError
from batchgen.job.reader import NUM_SAMPLE_RECORDS, Reader, Row
from batchgen.job.row_selection import RowSelection


# JSON value kind -> arrow type of the output column
_KIND_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "string": pa.string(),
               "json": pa.string()}
# A column of ints beyond this and floats cannot be float64 without rounding the ints.
_MAX_EXACT_FLOAT_INT = 2**53
# Columns one file may have: each costs the scan a dict entry and every part an output column,
# so keys that differ per record (ids as keys) stop here rather than exhaust memory.
MAX_COLUMNS = 10_000
_ABSENT = object()
# A \u escape of half a surrogate pair, as written (only lines with one are checked further:
# an escaped backslash before it makes it plain text).
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                                    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F]")


# exact type -> kind (a dict look-up: the scan calls this for every value of the file)
_TYPE_KINDS = {type(None): None, bool: "bool", int: "int", float: "float", str: "string"}


def _kind(value: Any) -> str | None:
    kind = _TYPE_KINDS.get(type(value), "json")
    if kind == "int" and not -2**63 <= value < 2**63:
        return "json"
    return kind


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
    Columns are every key of every JSON object in the file (in order of first appearance);
    a column's type fits all its values: int and float widen to float, other mixes (and
    objects, lists, ints beyond int64) are JSON text, where a string is kept as it is."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        with self._reading():
            self.num_rows, self.kinds, self.sha256 = self._scan()
        self.columns = list(self.kinds)
        self.schema = kinds_schema(self.kinds)

    def _scan(self) -> tuple[int, dict[str, str], str]:
        """One streaming pass: the number of records, each column's kind (only the kinds
        are kept, never the rows, so memory does not grow with the file) and the content's
        hash."""
        num_rows = 0
        content = hashlib.sha256()
        kinds: dict[str, str | None] = {}
        has_big_int: set[str] = set()
        with self._open() as f:
            for index, raw in enumerate(f):
                num_rows = index + 1
                content.update(raw)
                row = parse_jsonl_line(index, raw)
                for name, value in row.fields.items():
                    kind = _kind(value)
                    if kind == "int" and abs(value) > _MAX_EXACT_FLOAT_INT:
                        has_big_int.add(name)
                    old = kinds.get(name, _ABSENT)
                    if old == kind:
                        continue
                    if old is _ABSENT and len(kinds) >= MAX_COLUMNS:
                        raise JobConfigError(
                            f"{self.path}: more than {MAX_COLUMNS} distinct keys (line "
                            f"{index + 1} adds {name!r}); keys that vary per record belong "
                            "in a value, not a column")
                    kinds[name] = _merge_kinds(None if old is _ABSENT else old, kind)
        final = {name: "json" if kind == "float" and name in has_big_int else kind or "string"
                 for name, kind in kinds.items()}
        return num_rows, final, content.hexdigest()[:16]

    @contextlib.contextmanager
    def _reading(self):
        """A file that cannot be read (a folder, no permission, a truncated or false .gz) is
        the user's to fix: one line, exit 2. The scan reads it all, so later reads are safe."""
        try:
            yield
        except (OSError, EOFError, zlib.error) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise JobConfigError(f"cannot read input {self.path}: {reason}") from None

    def _open(self):
        if self.path.name.lower().endswith(".gz"):
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")

    def identity(self) -> dict[str, Any]:
        # The whole content (the scan reads it anyway): a resumed job whose file was edited
        # anywhere, even keeping its size, is refused rather than mixing two inputs' rows
        # (and two schemas) in one output.
        return {"kind": "jsonl", "path": str(self.path.resolve()),
                "size": self.path.stat().st_size, "sha256": self.sha256}

    def sample(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with self._reading(), self._open() as f:
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
        return fit_value(self.kinds.get(name), value)


def record_kinds(records: list[dict[str, Any]]) -> dict[str, str]:
    """Each column's kind over `records` (the start of a stream that declares no types),
    by the rules of a JSONL file's scan."""
    kinds: dict[str, str | None] = {}
    for record in records:
        for name, value in record.items():
            kinds[name] = _merge_kinds(kinds.get(name), _kind(value))
    return {name: kind or "string" for name, kind in kinds.items()}


def kinds_schema(kinds: dict[str, str]) -> pa.Schema:
    return pa.schema([(name, _KIND_TYPES[kind]) for name, kind in kinds.items()])


def fit_value(kind: str | None, value: Any) -> Any:
    """`value` as stored in a column of `kind`. A value the kind does not cover (a JSONL file
    changed after its scan; a stream's record past the sample its kinds came from) is JSON
    text in a text column, else None: one lost value rather than a part that cannot be written."""
    if value is None or kind is None:
        return None
    if kind in ("json", "string"):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                                default=str)
    if _merge_kinds(kind, _kind(value)) != kind:
        return None
    return float(value) if kind == "float" else value


def parse_jsonl_line(index: int, raw: bytes) -> Row:
    line = raw.rstrip(b"\r\n")
    try:
        # A byte-order mark (Windows editors write one) starts the file, not the record.
        text = line.decode("utf-8-sig" if index == 0 else "utf-8")
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
    if _LONE_SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(record):
        return Row(index, {}, f"line {index + 1}: undecodable bytes (a \\u escape of half a "
                              "surrogate pair, not Unicode)")
    return Row(index, record)


def _has_lone_surrogate(record: dict[str, Any]) -> bool:
    """Whether a string of `record` holds half a surrogate pair (`"\\ud83d"`, JSON that
    Python reads but no UTF-8 file can hold): it would fail the part's write, every run."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
