"""Job bookkeeping in the output folder: the fingerprint (`_job.json`), committed parts,
what is left to do, per-shard counters (`_shard-I-of-N.json`), and `status` / `verify`.

`_job.json` is written once, atomically and exclusively, by whichever run or shard comes
first; later runs only read and compare it. Nothing here takes a lock.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.reader import RowSelection
from batchgen.job.writer import (TMP_PREFIX, count_part_rows, list_parts, write_json_atomic)

JOB_FILE = "_job.json"
FORMAT_VERSION = 1


class JobMismatchError(JobConfigError):
    """The output folder holds a different job."""


def model_identity(model: str | None) -> dict[str, Any]:
    """What identifies the model in the fingerprint; raises JobConfigError for an unknown one."""
    from batchgen.models.gguf import DEFAULT_MODEL_NAME, default_gguf_path
    if model is None:
        try:
            gguf = default_gguf_path()
        except FileNotFoundError as e:
            raise JobConfigError(str(e)) from None
        return {"default": DEFAULT_MODEL_NAME, "file": gguf.name, "size": gguf.stat().st_size}
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise JobConfigError(f"model folder {model} has no config.json")
        return {"path": str(path.resolve()),
                "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()[:16]}
    if path.is_file() and path.suffix == ".gguf":
        return {"path": str(path.resolve()), "size": path.stat().st_size}
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(model, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return {"hub_id": model, "config_sha256":
                hashlib.sha256(Path(cached).read_bytes()).hexdigest()[:16]}
    raise JobConfigError(f"unknown model {model!r}: not a local folder with config.json, "
                         "a .gguf file, or a model in the Hugging Face cache")


def fingerprint_fields(job: JobConfig, model: dict[str, Any],
                       input_identity: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes what the parts contain (not --limit, shards, engine sizes)."""
    return {
        "model": model, "input": input_identity, "input_format": job.input_format,
        "split": job.split, "prompt_column": job.prompt_column, "template": job.template,
        "system": job.system, "chat": job.chat,
        "sampling": {k: job.sampling[k] for k in sorted(job.sampling) if k != "seed"},
        "max_tokens": job.sampling_params().max_tokens, "seed": job.seed,
        "rows_per_part": job.rows_per_part, "format": job.output_format, "keep": job.keep,
        "parse_json": job.parse_json, "load_format": job.load_format,
        "dtype": job.dtype, "max_model_len": job.max_model_len, "tokenizer": job.tokenizer,
    }


def fingerprint(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def shard_file(out_dir: Path, shard_index: int, num_shards: int) -> Path:
    return out_dir / f"_shard-{shard_index}-of-{num_shards}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class JobRecord:
    """The content of `_job.json`."""
    fingerprint: str
    fields: dict[str, Any]
    rows_per_part: int
    format: str
    num_input_rows: int | None
    is_openai_batch: bool = False
    created: float = field(default_factory=time.time)
    version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobRecord":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def tag(self) -> str:
        return self.fingerprint[:8]


def open_job(out_dir: Path, record: JobRecord, *, overwrite: bool = False) -> JobRecord:
    """Create `_job.json` or check that the folder holds the same job; returns the record
    in force. `overwrite` removes the old parts and bookkeeping first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JOB_FILE
    if overwrite:
        old = read_json(path)
        if old is not None and old.get("fingerprint") != record.fingerprint:
            remove_job_files(out_dir)
    if write_json_atomic(path, record.__dict__, exclusive=True):
        return record
    old = read_json(path)
    if old is None:
        raise JobConfigError(f"{path} is unreadable; remove it or pass --overwrite")
    if old.get("fingerprint") != record.fingerprint:
        changed = sorted(k for k in record.fields
                         if old.get("fields", {}).get(k) != json.loads(
                             json.dumps(record.fields[k], default=str)))
        raise JobMismatchError(
            f"{out_dir} holds a different job (changed: {', '.join(changed) or 'format'}); "
            "use another --output, or --overwrite to delete its parts and start again")
    return JobRecord.from_dict(old)


def remove_job_files(out_dir: Path) -> None:
    for path in list(list_parts(out_dir).values()) + [out_dir / JOB_FILE]:
        path.unlink(missing_ok=True)
    for pattern in ("_shard-*.json", f"{TMP_PREFIX}*", "_metrics*.json"):
        for name in glob.glob(str(out_dir / pattern)):
            Path(name).unlink(missing_ok=True)


def known_num_input_rows(out_dir: Path, record: JobRecord) -> int | None:
    """The input's length: from `_job.json`, else as found by a run that reached the end."""
    if record.num_input_rows is not None:
        return record.num_input_rows
    for name in glob.glob(str(out_dir / "_shard-*.json")):
        data = read_json(Path(name)) or {}
        if isinstance(data.get("num_input_rows"), int):
            return data["num_input_rows"]
    return None


def expected_part_rows(part: int, rows_per_part: int, total: int | None) -> int:
    if total is None:
        return rows_per_part
    return max(0, min(rows_per_part, total - part * rows_per_part))


def num_parts(total: int | None, rows_per_part: int) -> int | None:
    return None if total is None else math.ceil(total / rows_per_part)


def plan_selection(out_dir: Path, record: JobRecord, *, shard_index: int, num_shards: int,
                   limit: int | None) -> RowSelection:
    """The rows this run (shard) still has to do, given the committed parts."""
    rpp = record.rows_per_part
    total = known_num_input_rows(out_dir, record)
    target = total if limit is None else (limit if total is None else min(limit, total))
    done: set[int] = set()
    resume_from: dict[int, int] = {}
    for part, path in list_parts(out_dir).items():
        if part % num_shards != shard_index:
            continue
        try:
            num = count_part_rows(path)
        except Exception:
            continue  # damaged: redo it (verify reports it)
        first = part * rpp
        full = expected_part_rows(part, rpp, total)
        if num >= full or (target is not None and first + num >= min(first + rpp, target)):
            done.add(part)
        else:
            resume_from[part] = first + num
    return RowSelection(rpp, shard_index, num_shards, frozenset(done), resume_from, target)


def load_shard_state(out_dir: Path, shard_index: int, num_shards: int) -> dict[str, Any]:
    state = read_json(shard_file(out_dir, shard_index, num_shards)) or {}
    base = {"shard_index": shard_index, "num_shards": num_shards, "num_runs": 0,
            "elapsed_s": 0.0, "num_rows": 0, "num_errors": 0, "num_prompt_tokens": 0,
            "num_output_tokens": 0, "num_input_rows": None, "is_finished": False}
    base.update({k: v for k, v in state.items() if k in base})
    return base


def save_shard_state(out_dir: Path, state: dict[str, Any]) -> None:
    state = dict(state, updated=time.time(), pid=os.getpid())
    write_json_atomic(shard_file(out_dir, state["shard_index"], state["num_shards"]), state)


# ---- status / verify ----------------------------------------------------------------


@dataclass
class JobStatus:
    out_dir: Path
    fingerprint: str
    num_parts_committed: int
    num_parts_total: int | None  # None: the input's length is not known yet
    num_rows_done: int
    num_rows_total: int | None
    num_errors: int
    rows_per_s: float  # summed over shards: each shard's rows / its running time
    output_tokens_per_s: float
    elapsed_s: float  # the longest-running shard
    shards: list[dict[str, Any]]

    @property
    def is_complete(self) -> bool:
        return self.num_rows_total is not None and self.num_rows_done >= self.num_rows_total


def load_record(out_dir: Path) -> JobRecord:
    data = read_json(out_dir / JOB_FILE)
    if data is None or "fingerprint" not in data:
        raise JobConfigError(f"{out_dir} is not a batchgen output folder (no readable {JOB_FILE})")
    return JobRecord.from_dict(data)


def part_num_errors(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        column = pq.read_table(path, columns=["error"]).column("error")
        return len(column) - column.null_count
    from batchgen.job.writer import read_part
    return sum(1 for r in read_part(path) if r.get("error") is not None)


def job_status(out_dir: Path) -> JobStatus:
    out_dir = Path(out_dir)
    record = load_record(out_dir)
    total = known_num_input_rows(out_dir, record)
    parts = list_parts(out_dir)
    num_rows = num_errors = 0
    for path in parts.values():
        try:
            num_rows += count_part_rows(path)
            num_errors += part_num_errors(path)
        except Exception:
            pass  # verify reports damaged parts
    shards = [read_json(Path(p)) or {} for p in sorted(glob.glob(str(out_dir / "_shard-*.json")))]
    rows_per_s = sum(s.get("num_rows", 0) / s["elapsed_s"] for s in shards if s.get("elapsed_s"))
    tokens_per_s = sum(s.get("num_output_tokens", 0) / s["elapsed_s"]
                       for s in shards if s.get("elapsed_s"))
    return JobStatus(out_dir, record.fingerprint, len(parts), num_parts(total, record.rows_per_part),
                     num_rows, total, num_errors, rows_per_s, tokens_per_s,
                     max((s.get("elapsed_s", 0.0) for s in shards), default=0.0), shards)


@dataclass
class VerifyReport:
    num_parts_checked: int = 0
    num_rows: int = 0
    problems: list[str] = field(default_factory=list)  # damaged or inconsistent output
    gaps: list[str] = field(default_factory=list)  # rows not written yet

    @property
    def is_ok(self) -> bool:
        return not self.problems and not self.gaps


def _part_rows(path: Path, record: JobRecord) -> tuple[list[int], Any]:
    """Row indices of a part and its schema (raises on a damaged part)."""
    from batchgen.job.writer import read_part
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        return table.column("row").to_pylist(), table.schema
    records = read_part(path)
    if record.is_openai_batch:
        prefix = f"batch_req_{record.tag}-"
        rows = []
        for r in records:
            rid = r.get("id", "")
            if not rid.startswith(prefix) or "response" not in r:
                raise ValueError(f"not a response line of this job: {str(r)[:80]}")
            rows.append(int(rid[len(prefix):]))
        return rows, None
    return [r["row"] for r in records], tuple(records[0]) if records else None


def verify_job(out_dir: Path) -> VerifyReport:
    out_dir = Path(out_dir)
    record = load_record(out_dir)
    rpp = record.rows_per_part
    total = known_num_input_rows(out_dir, record)
    parts = list_parts(out_dir)
    report = VerifyReport()
    first_schema = None
    for part in sorted(parts):
        path = parts[part]
        report.num_parts_checked += 1
        if path.suffix != f".{record.format}":
            report.problems.append(f"{path.name}: format is not the job's {record.format}")
        try:
            rows, schema = _part_rows(path, record)
        except Exception as e:
            report.problems.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
            continue
        if first_schema is None:
            first_schema = schema
        elif schema is not None and schema != first_schema:
            report.problems.append(f"{path.name}: schema differs from the first part's")
        report.num_rows += len(rows)
        start, stop = part * rpp, part * rpp + expected_part_rows(part, rpp, total)
        if total is not None and part * rpp >= total:
            report.problems.append(f"{path.name}: beyond the input's {total} rows")
            continue
        bad = [r for r in rows if not start <= r < stop]
        if len(set(rows)) != len(rows):
            report.problems.append(f"{path.name}: duplicate rows")
        elif bad:
            report.problems.append(f"{path.name}: rows outside {start}..{stop - 1}: {bad[:5]}")
        elif rows != list(range(start, start + len(rows))):
            report.problems.append(f"{path.name}: rows out of order or with holes")
        elif len(rows) < stop - start:
            report.gaps.append(f"rows {start + len(rows)}..{stop - 1} ({path.name} is short)")
    known_parts = num_parts(total, rpp)
    last = known_parts if known_parts is not None else (max(parts) + 1 if parts else 0)
    missing = [p for p in range(last) if p not in parts]
    for run in _runs(missing):
        a, b = run[0], run[-1]
        rows_b = (b + 1) * rpp - 1 if total is None else min((b + 1) * rpp, total) - 1
        report.gaps.append(f"parts {a}..{b} missing (rows {a * rpp}..{rows_b})" if a != b
                           else f"part {a} missing (rows {a * rpp}..{rows_b})")
    if total is None:
        report.gaps.append("the end of the input has not been reached yet")
    return report


def _runs(values: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][-1] == v - 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs
