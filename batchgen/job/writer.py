"""Output parts: one file per range of `rows_per_part` input rows, committed atomically.

A part is written to `_tmp-part-00007-<pid>.<fmt>.tmp` in the output folder, fsynced, renamed
to `part-00007.<fmt>`, and the folder fsynced: the rename is the commit, so a reader (or a
resumed run) sees a part whole or not at all; the `.tmp` keeps a file being written (or left
by a killed run) out of `out/*.parquet` globs, which skip no `_` names. Every part has the same
schema (`OutputSchema`), and every other file starts with `_`, so pandas / polars / DuckDB read
the folder as one table.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job.config import OUTPUT_COLUMNS
from batchgen.job.strict_json import json_default, json_text

PART_PATTERN = re.compile(r"^part-(\d{5,})\.(parquet|jsonl)$")
TMP_PREFIX = "_tmp-part-"
TMP_PATTERN = re.compile(rf"^{TMP_PREFIX}(\d{{5,}})-")
_PARSED_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
                 "boolean": pa.bool_(), "json": pa.string()}


def part_name(part: int, fmt: str) -> str:
    return f"part-{part:05d}.{fmt}"


def list_parts(out_dir: Path) -> dict[int, Path]:
    """Committed parts in `out_dir`: part index -> path."""
    parts: dict[int, Path] = {}
    if not out_dir.is_dir():
        return parts
    for entry in os.scandir(out_dir):
        m = PART_PATTERN.match(entry.name)
        if m:
            parts[int(m.group(1))] = Path(entry.path)
    return parts


class OutputSchema:
    """Columns of every part: row, the kept input columns (renamed input_<name> on a clash),
    text, finish_reason, prompt_tokens, output_tokens, error, then parsed-JSON columns."""

    def __init__(self, input_schema: pa.Schema, keep: list[str] | None = None,
                 parse_json: dict[str, str] | None = None, keep_source: str = "--keep") -> None:
        keep = list(input_schema.names) if keep is None else keep
        missing = [c for c in keep if c not in input_schema.names]
        if missing:
            raise ValueError(f"{keep_source}: no input column(s) {', '.join(missing)} "
                             f"(columns: {', '.join(input_schema.names)})")
        self.parse_json = dict(parse_json or {})
        self.input_names = _input_names(keep, set(OUTPUT_COLUMNS) | set(self.parse_json))
        fields = [pa.field("row", pa.int64())]
        fields += [pa.field(out, input_schema.field(c).type) for c, out in self.input_names.items()]
        fields += [pa.field("text", pa.string()), pa.field("finish_reason", pa.string()),
                   pa.field("prompt_tokens", pa.int64()), pa.field("output_tokens", pa.int64()),
                   pa.field("error", pa.string())]
        fields += [pa.field(name, _PARSED_TYPES[kind]) for name, kind in self.parse_json.items()]
        self.arrow = pa.schema(fields)

    def describe(self) -> list[list[str]]:
        return [[f.name, str(f.type)] for f in self.arrow]


def _input_names(keep: list[str], reserved: set[str]) -> dict[str, str]:
    """Input column name -> output column name: `input_<name>` where it clashes with a
    reserved name, prefixed again while that is another input column too (an input with
    `text` and `input_text`, such as an earlier job's output), so no two columns share a name."""
    taken = reserved | set(keep)
    names = {}
    for column in keep:
        name = column
        if column in reserved:
            name = f"input_{column}"
            while name in taken:
                name = f"input_{name}"
            taken.add(name)
        names[column] = name
    return names


class PartWriter:
    """Writes parts of one format into `out_dir`; `schema` None means free-form JSONL
    records (OpenAI batch output lines)."""

    def __init__(self, out_dir: Path, fmt: str, schema: pa.Schema | None) -> None:
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"format must be parquet or jsonl, got {fmt!r}")
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.schema = schema

    def path(self, part: int) -> Path:
        return self.out_dir / part_name(part, self.fmt)

    def write(self, part: int, records: list[dict[str, Any]]) -> Path:
        """Commit `records` (in row order) as part `part`; returns the final path."""
        final = self.path(part)
        tmp = self.out_dir / f"{TMP_PREFIX}{part:05d}-{os.getpid()}.{self.fmt}.tmp"
        try:
            if self.fmt == "parquet":
                table = pa.Table.from_pylist(records, schema=self.schema)
                with open(tmp, "wb") as f:
                    pq.write_table(table, f, compression="zstd")
                    f.flush()
                    os.fsync(f.fileno())
            else:
                with open(tmp, "w", encoding="utf-8") as f:
                    for record in records:
                        f.write(json_text(record))
                        f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(self.out_dir)
        return final

    def remove_stale_tmp(self, parts: Iterable[int]) -> None:
        """Temp files a killed run of these parts left behind."""
        wanted = set(parts)
        for entry in os.scandir(self.out_dir):
            m = TMP_PATTERN.match(entry.name)
            if m and int(m.group(1)) in wanted:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass


def read_part(path: Path) -> list[dict[str, Any]]:
    """A committed part's records (raises on a damaged file)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def count_part_rows(path: Path) -> int:
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any, *, exclusive: bool = False) -> bool:
    """Write JSON to `path` via a temp file + rename. `exclusive`: only if `path` does not
    exist yet (a hard link, atomic on POSIX filesystems); returns False when it did."""
    tmp = path.with_name(f"_tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return True


class PartCollector:
    """Holds finished rows until their part is whole, then commits it through `writer`.
    Rows of a part are `[part * rows_per_part, min((part + 1) * rows_per_part, stop))`;
    `stop` may be unknown (None) until the end of a streamed input is reached."""

    def __init__(self, writer: PartWriter, rows_per_part: int, stop: int | None) -> None:
        self.writer = writer
        self.rows_per_part = rows_per_part
        self.stop = stop
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}  # part -> row -> record

    def expected(self, part: int) -> int | None:
        if self.stop is None:
            return None
        return max(0, min(self.rows_per_part, self.stop - part * self.rows_per_part))

    def num_pending(self, part: int) -> int:
        return len(self.pending.get(part, ()))

    def prefill(self, part: int, records: list[dict[str, Any]], rows: list[int]) -> None:
        """Rows of a part committed short by an earlier run (with a smaller --limit)."""
        self.pending.setdefault(part, {}).update(zip(rows, records))

    def add(self, row: int, record: dict[str, Any]) -> list[tuple[int, Path]]:
        part = row // self.rows_per_part
        self.pending.setdefault(part, {})[row] = record
        return self._commit_if_whole(part)

    def set_stop(self, stop: int) -> list[tuple[int, Path]]:
        self.stop = stop
        committed = []
        for part in sorted(self.pending):
            committed += self._commit_if_whole(part)
        return committed

    def _commit_if_whole(self, part: int) -> list[tuple[int, Path]]:
        expected = self.expected(part)
        rows = self.pending.get(part, {})
        is_whole = len(rows) == (self.rows_per_part if expected is None else expected)
        if not is_whole or not rows:
            return []
        records = [rows[r] for r in sorted(rows)]
        path = self.writer.write(part, records)
        del self.pending[part]
        return [(part, path)]


def parse_json_columns(text: str | None, columns: dict[str, str]) -> dict[str, Any]:
    """The first JSON object in generated `text` that holds any of `columns` -> the typed
    columns (None when absent or of the wrong type; the row's `text` keeps the raw output
    either way). A `{` that starts no such object (prose, a half-written try) is skipped."""
    out: dict[str, Any] = dict.fromkeys(columns)
    obj = _first_json_object(text or "", columns)
    if obj is not None:
        for name, kind in columns.items():
            out[name] = _coerce(obj.get(name), kind)
    return out


_MAX_JSON_STARTS = 64  # `{`s tried: a long output full of braces stays cheap


def _first_json_object(text: str, keys: dict[str, str]) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    for _ in range(_MAX_JSON_STARTS):
        if start < 0:
            return None
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and not obj.keys().isdisjoint(keys):
            return obj
        start = text.find("{", start + 1)
    return None


def _coerce(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return json_text(value)
    if kind == "string":
        return value if isinstance(value, str) else json_text(value)
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind == "integer":
        if isinstance(value, int):
            return value if -2**63 <= value < 2**63 else None
        return int(value) if isinstance(value, float) and value.is_integer() else None
    return float(value) if isinstance(value, (int, float)) else None  # number
