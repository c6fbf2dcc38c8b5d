"""`batchgen status`: committed parts, rows done and errors, and the shards' throughput."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.job.checkpoint import (JOB_FILE, JobRecord, known_num_input_rows, load_record,
                                     num_parts, read_json)
from batchgen.job.config import JobConfigError
from batchgen.job.overwrite import OVERWRITTEN_DIR
from batchgen.job.slurm import LOG_DIR_NAME
from batchgen.job.writer import count_part_rows, list_parts


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


def load_job_record(out_dir: Path) -> JobRecord:
    """`out_dir`'s _job.json, or a JobConfigError saying why there is none. A folder a job is
    starting in (a run loading its model, Slurm tasks still queued, an --overwrite whose new
    job has not started its engine) has no _job.json yet, but it is no stranger's folder."""
    try:
        return load_record(out_dir)
    except JobConfigError:
        if not out_dir.exists():
            raise JobConfigError(f"{out_dir} does not exist") from None
        if (out_dir / OVERWRITTEN_DIR / JOB_FILE).exists():
            raise JobConfigError(
                f"{out_dir}: no job has started yet: an --overwrite set the previous job aside in "
                f"{OVERWRITTEN_DIR}/ until the new job's engine starts") from None
        if any(out_dir.glob("_lock-*.json")) or (out_dir / LOG_DIR_NAME).is_dir():
            raise JobConfigError(f"{out_dir}: no job has started yet ({JOB_FILE} is written "
                                 "once the first run's engine has started)") from None
        raise


def part_num_errors(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        column = pq.read_table(path, columns=["error"]).column("error")
        return len(column) - column.null_count
    from batchgen.job.writer import read_part
    return sum(1 for r in read_part(path) if r.get("error") is not None)


def job_status(out_dir: Path) -> JobStatus:
    out_dir = Path(out_dir)
    record = load_job_record(out_dir)
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
