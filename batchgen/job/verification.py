"""`batchgen verify`: every committed part readable, of the job's format and schema, holding
exactly its own rows in order; what is still missing reported as gaps."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgen.job.checkpoint import JobRecord, expected_part_rows, known_num_input_rows, num_parts
from batchgen.job.status import load_job_record
from batchgen.job.writer import list_parts


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
    record = load_job_record(out_dir)
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
        _check_part_rows(report, path.name, part, rows, rpp, total)
    report.gaps.extend(_missing_parts(parts, rpp, total))
    if total is None:
        report.gaps.append("the end of the input has not been reached yet")
    return report


def _check_part_rows(report: VerifyReport, name: str, part: int, rows: list[int], rpp: int,
                     total: int | None) -> None:
    """A part must hold its own row range, each row once and in order (short: a gap)."""
    start, stop = part * rpp, part * rpp + expected_part_rows(part, rpp, total)
    if total is not None and part * rpp >= total:
        report.problems.append(f"{name}: beyond the input's {total} rows")
        return
    bad = [r for r in rows if not start <= r < stop]
    if len(set(rows)) != len(rows):
        report.problems.append(f"{name}: duplicate rows")
    elif bad:
        report.problems.append(f"{name}: rows outside {start}..{stop - 1}: {bad[:5]}")
    elif rows != list(range(start, start + len(rows))):
        report.problems.append(f"{name}: rows out of order or with holes")
    elif len(rows) < stop - start:
        report.gaps.append(f"rows {start + len(rows)}..{stop - 1} ({name} is short)")


def _missing_parts(parts: dict[int, Path], rpp: int, total: int | None) -> list[str]:
    """One gap line per run of missing parts, up to the last part known to exist."""
    known_parts = num_parts(total, rpp)
    last = known_parts if known_parts is not None else (max(parts) + 1 if parts else 0)
    missing = [p for p in range(last) if p not in parts]
    gaps = []
    for run in _runs(missing):
        a, b = run[0], run[-1]
        rows_b = (b + 1) * rpp - 1 if total is None else min((b + 1) * rpp, total) - 1
        gaps.append(f"parts {a}..{b} missing (rows {a * rpp}..{rows_b})" if a != b
                    else f"part {a} missing (rows {a * rpp}..{rows_b})")
    return gaps


def _runs(values: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][-1] == v - 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs
