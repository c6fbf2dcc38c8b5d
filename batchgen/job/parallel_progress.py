"""The one progress display of a --data-parallel launch (parallel.py), polled from the output
folder: committed parts are the truth, whoever wrote them."""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from batchgen.job.exit_codes import EXIT_INTERRUPTED, EXIT_OK
from batchgen.job.slurm import LOG_DIR_NAME


class DataParallelProgress:
    """One display for all workers, polled from the output folder (committed parts are the
    truth, whoever wrote them): a rich bar on a terminal, a plain line every `log_every_s`
    seconds otherwise."""

    def __init__(self, output_dir: Path, stream: TextIO, *, is_terminal: bool | None = None,
                 log_every_s: float = 10.0) -> None:
        self.output_dir = output_dir
        self.stream = stream
        self.is_terminal = stream.isatty() if is_terminal is None else is_terminal
        self.log_every_s = log_every_s
        self.console = Console(file=stream, force_terminal=self.is_terminal, highlight=False,
                               soft_wrap=True)
        self._bar: Progress | None = None
        self._task = None
        self._start = time.monotonic()
        self._last_log = 0.0
        self._rows_at_start: int | None = None
        self._num_running = 0

    def start(self, num_workers: int, gpus: list[str | None]) -> None:
        self._start = time.monotonic()
        self._num_running = num_workers
        where = "CPU" if None in gpus else f"GPUs {','.join(gpus)}"
        self.log(f"batchgen: {num_workers} data-parallel workers ({where}) writing to "
                 f"{self.output_dir}; logs in {self.output_dir / LOG_DIR_NAME}")
        if self.is_terminal:
            self._bar = Progress(TextColumn("[bold]batchgen x{task.fields[workers]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("parts {task.fields[rows]}"),
                                 console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("parts", total=None, workers=num_workers, rows="")

    def update(self, *, force: bool = False) -> None:
        polled = self._poll()
        if polled is None:
            return
        parts, total_parts, rows, total_rows = polled
        if self._rows_at_start is None:
            self._rows_at_start = rows
        elapsed = time.monotonic() - self._start
        rate = (rows - self._rows_at_start) / elapsed if elapsed > 0 else 0.0
        text = (f"{rows}/{total_rows if total_rows is not None else '?'} rows, "
                f"{rate:.1f} rows/s, {self._num_running} running")
        if self._bar is not None:
            self._bar.update(self._task, completed=parts, total=total_parts, rows=text)
        elif force or time.monotonic() - self._last_log >= self.log_every_s:
            self._last_log = time.monotonic()
            self.log(f"batchgen: {parts}/{total_parts if total_parts is not None else '?'} "
                     f"parts, {text}")

    def worker_exited(self, index: int, returncode: int, log_path: Path) -> None:
        self._num_running -= 1
        if returncode != EXIT_OK:
            self.log(f"batchgen: worker {index} exited with {_describe_exit(returncode)}; "
                     f"log: {log_path}")
        self.update(force=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def summary(self, code: int, workers: list[tuple[int, int | None, Path]]) -> None:
        failed = [(i, rc, log) for i, rc, log in workers
                  if rc not in (EXIT_OK, EXIT_INTERRUPTED)]
        for index, returncode, log_path in failed:
            self.log(f"batchgen: worker {index} FAILED ({_describe_exit(returncode)}); "
                     f"see {log_path}")
        if code == EXIT_OK:
            self.log(f"batchgen: all {len(workers)} workers done")
        elif code == EXIT_INTERRUPTED:
            self.log("batchgen: interrupted; committed parts are kept: run the same command "
                     "again to resume")
        else:
            self.log("batchgen: re-run the same command to redo the failed workers' parts")

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, file=self.stream, flush=True)

    def _poll(self) -> tuple[int, int | None, int, int | None] | None:
        """(parts committed, parts in all, rows done, rows in all); None before the first
        worker has written the job's record."""
        from batchgen.job.status import job_status
        try:
            status = job_status(self.output_dir)
        except Exception:
            return None
        return (status.num_parts_committed, status.num_parts_total, status.num_rows_done,
                status.num_rows_total)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "no exit code"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
