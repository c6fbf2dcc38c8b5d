"""Job bookkeeping in the output folder: the job record (`_job.json`, holding the
fingerprint), committed parts, what is left to do, per-shard counters (`_shard-I-of-N.json`).
The fingerprint itself is in `fingerprint`; `status` and `verification` read what is here.

`_job.json` is written once, atomically and exclusively, by whichever run or shard first
has its engine started (so a job whose engine never starts leaves no record of its settings
behind); until then runs only read and compare it. Nothing here takes a lock. --overwrite
(setting the old job aside until the new one starts) is in `overwrite`.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgen.job.config import JobConfigError
from batchgen.job.row_selection import RowSelection
from batchgen.job.writer import (TMP_PREFIX, count_part_rows, list_parts, read_part,
                                 write_json_atomic)

JOB_FILE = "_job.json"
FORMAT_VERSION = 1


class JobMismatchError(JobConfigError):
    """The output folder holds a different job."""


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


@contextlib.contextmanager
def writing_to(out_dir: Path) -> Iterator[None]:
    """An output folder that cannot be made or written (a file in its path, read-only, full)
    is the user's to fix: one line, not a traceback."""
    try:
        yield
    except OSError as e:
        raise JobConfigError(f"cannot write to output {out_dir}: {e.strerror or e}") from None


def make_output_dir(out_dir: Path) -> None:
    with writing_to(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)


def existing_job(out_dir: Path, record: JobRecord) -> JobRecord | None:
    """The folder's job record if it holds this same job; None if it holds none yet.
    Raises JobMismatchError for a different job. Reads only."""
    path = out_dir / JOB_FILE
    if not path.exists():
        return None
    old = read_json(path)
    if old is None:
        raise JobConfigError(f"{path} is unreadable; remove it or pass --overwrite")
    if not is_same_job(old, record):
        changed = changed_fields(old.get("fields") or {}, record.fields)
        raise JobMismatchError(
            f"{out_dir} holds a different job (changed: {', '.join(changed) or 'format'}); "
            "use another --output, or --overwrite to delete its parts and start again")
    return JobRecord.from_dict(old)


def is_same_job(old: dict[str, Any], record: JobRecord) -> bool:
    """Same fingerprint, or the same fields up to int vs float (`temperature: 0` in a recipe
    against `--temperature 0`): a folder written before fingerprints normalised numbers."""
    if old.get("fingerprint") == record.fingerprint:
        return True
    return _canonical(old.get("fields")) == _canonical(_as_json(record.fields))


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The top-level fields that differ (int vs float aside), for the mismatch message."""
    new = _as_json(new)
    return sorted(k for k in set(old) | set(new)
                  if _canonical(old.get(k)) != _canonical(new.get(k)))


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _canonical(value: Any) -> Any:
    """Numbers as floats (bools kept), recursively, so 0 and 0.0 compare equal but 0 and
    False do not."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", float(value))
    return value


def open_job(out_dir: Path, record: JobRecord) -> JobRecord:
    """Create `_job.json` or check that the folder holds the same job; returns the record
    in force. Called once the engine has started (see the module docstring)."""
    make_output_dir(out_dir)
    with writing_to(out_dir):
        if write_json_atomic(out_dir / JOB_FILE, record.__dict__, exclusive=True):
            return record
    found = existing_job(out_dir, record)
    if found is None:  # removed between our create and our read: only --overwrite does that
        raise JobConfigError(f"{out_dir / JOB_FILE} was removed while this run started")
    return found


def holds_other_job(out_dir: Path, record: JobRecord) -> bool:
    """Whether the folder's record is unreadable or of another job (what --overwrite deletes)."""
    path = out_dir / JOB_FILE
    if not path.exists():
        return False
    old = read_json(path)
    return old is None or not is_same_job(old, record)


def job_files(out_dir: Path) -> list[Path]:
    """A job's parts and bookkeeping (not the locks, nor the logs)."""
    paths = list(list_parts(out_dir).values()) + [out_dir / JOB_FILE]
    for pattern in ("_shard-*.json", f"{TMP_PREFIX}*", "_metrics*.json"):
        paths += [Path(name) for name in glob.glob(str(out_dir / pattern))]
    return [p for p in paths if p.exists()]


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


@dataclass
class ShardPlan(RowSelection):
    """A shard's RowSelection plus what the scan that made it counted on the way, so the
    run's tally does not list and count the parts, or read the shard files, a second time."""
    num_rows_committed: int = 0  # rows in this shard's readable committed parts
    num_input_rows: int | None = None  # the input's length, where known (_job.json or a shard)


def plan_selection(out_dir: Path, record: JobRecord, *, shard_index: int, num_shards: int,
                   limit: int | None) -> ShardPlan:
    """The rows this run (shard) still has to do, given the committed parts."""
    rpp = record.rows_per_part
    total = known_num_input_rows(out_dir, record)
    target = total if limit is None else (limit if total is None else min(limit, total))
    done: set[int] = set()
    resume_from: dict[int, int] = {}
    num_committed = 0
    for part, path in list_parts(out_dir).items():
        if part % num_shards != shard_index:
            continue
        try:
            num = _count_rows(path)
        except Exception:
            continue  # damaged: redo it (verify reports it)
        num_committed += num
        first = part * rpp
        full = expected_part_rows(part, rpp, total)
        if num >= full or (target is not None and first + num >= min(first + rpp, target)):
            done.add(part)
        else:
            resume_from[part] = first + num
    return ShardPlan(rpp, shard_index, num_shards, frozenset(done), resume_from, target,
                     num_rows_committed=num_committed, num_input_rows=total)


def _count_rows(path: Path) -> int:
    """A committed part's rows; raises on a damaged part. A JSONL part is parsed, line by
    line, as `verify` reads it: a damaged line keeps the line count, so counting lines would
    take a part verify calls unreadable for done."""
    if path.suffix == ".parquet":
        return count_part_rows(path)
    return len(read_part(path))


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


def load_record(out_dir: Path) -> JobRecord:
    data = read_json(out_dir / JOB_FILE)
    if data is None or "fingerprint" not in data:
        raise JobConfigError(f"{out_dir} is not a batchgen output folder (no readable {JOB_FILE})")
    return JobRecord.from_dict(data)

