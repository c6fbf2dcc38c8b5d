"""Progress while a job runs (a rich bar on a terminal, plain log lines otherwise), the final
summary table, and the metrics JSON."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn)
from rich.table import Table

from batchgen.job.exit_codes import EXIT_INTERRUPTED, EXIT_OK


@dataclass
class JobMetrics:
    """Counters of one run (this process); the summary and `--metrics-json` show them."""
    output_dir: str = ""
    shard: str = "0/1"
    num_rows_total: int | None = None  # rows of the job (all shards), when known
    num_rows_done_before: int = 0  # committed by earlier runs (this shard)
    num_rows: int = 0  # rows finished by this run (committed or not)
    num_rows_committed: int = 0
    num_errors: int = 0
    num_parts_committed: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    kv_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    elapsed_s: float = 0.0
    exit_code: int = 0
    status: str = "running"  # running | done | nothing to do | interrupted | failed
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.num_rows / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), rows_per_s=round(self.rows_per_s, 3),
                    output_tokens_per_s=round(self.output_tokens_per_s, 3))


class ProgressReporter:
    """`update(metrics)` as often as you like: it redraws (terminal) or logs a line every
    `log_every_s` seconds (not a terminal: cron, Slurm logs)."""

    def __init__(self, stream: TextIO | None = None, *, is_terminal: bool | None = None,
                 log_every_s: float = 10.0, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.is_terminal = self.stream.isatty() if is_terminal is None else is_terminal
        self.log_every_s = log_every_s
        self.enabled = enabled
        self._last_log = 0.0
        self._progress: Progress | None = None
        self._task = None
        self.console = Console(file=self.stream, force_terminal=self.is_terminal,
                               highlight=False, soft_wrap=True)

    def start(self, metrics: JobMetrics) -> None:
        if not self.enabled:
            return
        if self.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]batchgen"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                TextColumn("KV {task.fields[kv]}"), console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(
                "rows", total=self._total(metrics), completed=metrics.num_rows_done_before,
                rate="", kv="")
        else:
            self.log(f"batchgen: {metrics.output_dir} shard {metrics.shard}: "
                     f"{metrics.num_rows_done_before} rows done before, "
                     f"{self._total(metrics) or '?'} in all")
        self._last_log = time.monotonic()

    @staticmethod
    def _total(metrics: JobMetrics) -> int | None:
        return metrics.num_rows_total

    def update(self, metrics: JobMetrics, *, force: bool = False) -> None:
        if not self.enabled:
            return
        done = metrics.num_rows_done_before + metrics.num_rows
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, total=self._total(metrics),
                rate=f"{metrics.rows_per_s:.1f} rows/s {metrics.output_tokens_per_s:.0f} tok/s",
                kv=f"{metrics.kv_usage:.0%}")
            return
        now = time.monotonic()
        if force or now - self._last_log >= self.log_every_s:
            self._last_log = now
            total = self._total(metrics)
            eta = ""
            if total and metrics.rows_per_s > 0:
                eta = f" eta {max(0.0, (total - done) / metrics.rows_per_s):.0f}s"
            self.log(f"batchgen: {done}/{total or '?'} rows, {metrics.num_parts_committed} parts "
                     f"committed, {metrics.num_errors} errors, {metrics.rows_per_s:.1f} rows/s, "
                     f"{metrics.output_tokens_per_s:.0f} output tok/s, "
                     f"KV {metrics.kv_usage:.0%}{eta}")

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self, metrics: JobMetrics) -> None:
        self.stop()
        if not self.enabled:
            return
        table = Table(title=f"batchgen {metrics.status}", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        for name, value in summary_rows(metrics):
            table.add_row(name, value)
        self.console.print(table)


def summary_rows(metrics: JobMetrics) -> list[tuple[str, str]]:
    rows = [
        ("output", metrics.output_dir), ("shard", metrics.shard),
        ("rows this run", str(metrics.num_rows)),
        ("rows done before", str(metrics.num_rows_done_before)),
        ("rows in the job", "?" if metrics.num_rows_total is None else str(metrics.num_rows_total)),
        ("parts committed", str(metrics.num_parts_committed)),
        ("error rows", str(metrics.num_errors)),
        ("prompt tokens", str(metrics.num_prompt_tokens)),
        ("output tokens", str(metrics.num_output_tokens)),
        ("rows/s", f"{metrics.rows_per_s:.2f}"),
        ("output tokens/s", f"{metrics.output_tokens_per_s:.1f}"),
        ("prefix cache hit rate", f"{metrics.prefix_cache_hit_rate:.0%}"),
        ("elapsed", f"{metrics.elapsed_s:.1f} s"),
    ]
    rows += [(f"  errors: {kind}", str(n)) for kind, n in sorted(metrics.errors_by_kind.items())]
    return rows


def shard_metrics_path(path: Path, shard_index: int, num_shards: int) -> Path:
    """Where a run of shard I/N writes `--metrics-json PATH`: PATH for a whole job, else PATH
    with `.shard-I-of-N` before its suffix (metrics.json -> metrics.shard-3-of-8.json), so the
    tasks of a Slurm array, given one PATH, do not overwrite each other's file."""
    path = Path(path)
    if num_shards == 1:
        return path
    return path.with_name(f"{path.stem}.shard-{shard_index}-of-{num_shards}{path.suffix}")


def write_metrics_json(path: Path, metrics: JobMetrics | dict[str, Any]) -> None:
    path = Path(path)
    data = metrics.to_dict() if isinstance(metrics, JobMetrics) else metrics
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # writers never share a temp file
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


_SUMMED = ("num_rows_done_before", "num_rows", "num_rows_committed", "num_errors",
           "num_parts_committed", "num_prompt_tokens", "num_output_tokens")


def merge_metrics_files(paths: list[Path], dest: Path, *, output_dir: Path,
                        exit_code: int) -> None:
    """--data-parallel: the job's metrics, from its workers' files (counters summed, the
    longest worker's time), each worker's own under "workers" (null: it wrote none)."""
    workers = [_read_metrics(p) for p in paths]
    found = [w for w in workers if w is not None]
    total = JobMetrics(output_dir=str(output_dir), shard=f"0-{len(paths) - 1}/{len(paths)}",
                       exit_code=exit_code, status=_STATUS_OF_EXIT.get(exit_code, "failed"))
    for name in _SUMMED:
        setattr(total, name, sum(int(w.get(name) or 0) for w in found))
    totals = [w.get("num_rows_total") for w in workers]
    total.num_rows_total = sum(totals) if all(isinstance(t, int) for t in totals) else None
    total.elapsed_s = max((float(w.get("elapsed_s") or 0.0) for w in found), default=0.0)
    for w in found:
        for kind, n in (w.get("errors_by_kind") or {}).items():
            total.errors_by_kind[kind] = total.errors_by_kind.get(kind, 0) + int(n)
    write_metrics_json(dest, dict(total.to_dict(), workers=workers))


_STATUS_OF_EXIT = {EXIT_OK: "done", EXIT_INTERRUPTED: "interrupted: re-run to resume"}


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---- status / verify output ---------------------------------------------------------


def print_status(out_dir: Path, *, as_json: bool = False, stream: TextIO | None = None) -> int:
    """`batchgen status DIR`; returns the exit code (0, or 2 when DIR is not a job)."""
    from batchgen.job.status import job_status
    s = job_status(out_dir)
    stream = stream or sys.stdout
    info = {
        "output_dir": str(s.out_dir), "fingerprint": s.fingerprint,
        "num_parts_committed": s.num_parts_committed, "num_parts_total": s.num_parts_total,
        "num_rows_done": s.num_rows_done, "num_rows_total": s.num_rows_total,
        "num_errors": s.num_errors, "rows_per_s": round(s.rows_per_s, 3),
        "output_tokens_per_s": round(s.output_tokens_per_s, 3),
        "elapsed_s": round(s.elapsed_s, 1), "is_complete": s.is_complete,
        "shards": [{k: sh.get(k) for k in ("shard_index", "num_shards", "num_runs", "num_rows",
                                           "is_finished")} for sh in s.shards],
    }
    if as_json:
        print(json.dumps(info, indent=2), file=stream)
        return 0
    def of(done: int, total: int | None) -> str:
        return f"{done} / {'?' if total is None else total}" + (
            f" ({done / total:.0%})" if total else "")
    table = Table(title=f"batchgen status: {'complete' if s.is_complete else 'incomplete'}",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in (("output", str(s.out_dir)), ("parts committed", of(s.num_parts_committed, s.num_parts_total)),
                        ("rows", of(s.num_rows_done, s.num_rows_total)), ("error rows", str(s.num_errors)),
                        ("rows/s", f"{s.rows_per_s:.2f}"), ("output tokens/s", f"{s.output_tokens_per_s:.1f}"),
                        ("running time", f"{s.elapsed_s:.1f} s"), ("shards seen", str(len(s.shards)))):
        table.add_row(name, value)
    Console(file=stream, highlight=False, soft_wrap=True).print(table)
    return 0


def print_verify(out_dir: Path, *, stream: TextIO | None = None) -> int:
    """`batchgen verify DIR`: 0 when complete and intact, 1 otherwise (problems and gaps listed)."""
    from batchgen.job.verification import verify_job
    report = verify_job(out_dir)
    stream = stream or sys.stdout
    for problem in report.problems:
        print(f"PROBLEM: {problem}", file=stream)
    for gap in report.gaps[:50]:
        print(f"GAP: {gap}", file=stream)
    if len(report.gaps) > 50:
        print(f"... and {len(report.gaps) - 50} more gaps", file=stream)
    verdict = "ok" if report.is_ok else ("damaged" if report.problems else "incomplete")
    print(f"{verdict}: {report.num_parts_checked} parts, {report.num_rows} rows checked, "
          f"{len(report.problems)} problems, {len(report.gaps)} gaps", file=stream)
    return 0 if report.is_ok else 1
