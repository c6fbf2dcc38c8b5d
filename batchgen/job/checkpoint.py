"""Job bookkeeping in the output folder: the job record (`_job.json`, holding the
fingerprint), committed parts, what is left to do, per-shard counters (`_shard-I-of-N.json`).
The fingerprint itself is in `fingerprint`; `status` and `verification` read what is here.

`_job.json` is written once, atomically and exclusively, by whichever run or shard comes
first; later runs only read and compare it. Nothing here takes a lock.
"""
from __future__ import annotations

import glob
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgen.job.config import JobConfigError
from batchgen.job.row_selection import RowSelection
from batchgen.job.writer import (TMP_PREFIX, count_part_rows, list_parts, write_json_atomic)

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
            num = count_part_rows(path)
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

