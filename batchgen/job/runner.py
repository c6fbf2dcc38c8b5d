"""run_job: reader -> prompts (tokenized in a background thread) -> engine -> parts.

The engine is kept fed from a bounded look-ahead window: rows are taken in input order in
chunks of `window` rows, each chunk is admitted in admission order (the most output tokens
first, then equal prompt prefixes and similar lengths together: engine/admission.py), and the
writer restores input order per part. At most `window`
requests are in the engine and the tokenizer queue holds about 2 * `window` rows, so memory
stays flat however large the input, and parts commit steadily.

Around it: prepare.py (checks before any work), feeder.py (the tokenizer thread and the
admission order), records.py (one output record per row), tally.py (metrics and the shard
state file), signals.py (stop signals).
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from typing import Any, Callable

from batchgen.job import checkpoint as ckpt
from batchgen.job import overwrite
from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.engine_start import default_make_engine, start_engine
from batchgen.job.exit_codes import EXIT_CONFIG, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK
from batchgen.job.feeder import EndOfInput, Feeder, WorkItem, base_params, row_seed
from batchgen.job.prepare import PreparedJob, is_openai_sample, prepare_job
from batchgen.job.progress import (JobMetrics, ProgressReporter, shard_metrics_path,
                                   write_metrics_json)
from batchgen.job.records import RecordMaker, error_kind
from batchgen.job.signals import StopSignals
from batchgen.job.tally import RunTally
from batchgen.job.writer import PartCollector, PartWriter, list_parts, read_part

__all__ = ["EXIT_OK", "EXIT_INTERNAL", "EXIT_CONFIG", "EXIT_INTERRUPTED", "JobRun",
           "PreparedJob", "WorkItem", "EndOfInput", "default_make_engine", "error_kind",
           "is_openai_sample", "prepare_job", "row_seed", "run_job"]

_STATS_EVERY_S = 0.5


def run_job(job: JobConfig, *, make_engine: Callable[[JobConfig], Any] = default_make_engine,
            reporter: ProgressReporter | None = None,
            stop: StopSignals | None = None) -> JobMetrics:
    """Run (or resume) the job; returns its metrics, `exit_code` included. Configuration
    mistakes raise JobConfigError before any part is written (the engine's own included:
    see JobRun._start_engine). `stop`: signals the caller installed earlier (the CLI, from
    before its heavy imports); a stop already requested there ends the run before the model
    is loaded."""
    prepared = prepare_job(job)
    job = prepared.job
    reporter = reporter or ProgressReporter()
    out_dir = job.output_dir
    if not job.overwrite:
        ckpt.existing_job(out_dir, prepared.record)  # another job's folder: refused at once
    ckpt.make_output_dir(out_dir)
    from batchgen.job.lock import ShardLock
    lock = ShardLock(out_dir, job.shard_index, job.num_shards)
    # Stop signals are caught from before the lock is taken until after it is released: a
    # stop in between is a stop request, never a process killed with the lock left behind.
    with contextlib.nullcontext(stop) if stop is not None else StopSignals() as stop:
        with ckpt.writing_to(out_dir):
            is_locked = lock.acquire()
        if not is_locked:
            if job.overwrite and ckpt.holds_other_job(out_dir, prepared.record):
                raise JobConfigError(
                    f"--overwrite: {out_dir} is in use by another run (shard {job.shard_index}/"
                    f"{job.num_shards} held by {lock.holder_description()}); stop it first, "
                    "or use another --output")
            reporter.log(f"batchgen: shard {job.shard_index}/{job.num_shards} is already running: "
                         f"{lock.holder_description()}")
            return JobMetrics(output_dir=str(out_dir), status="already running")
        try:
            # Only under our lock, and only with no other run's lock live in the folder. The
            # old job is only set aside: finish_overwrite puts it back unless our engine starts;
            # what a killed --overwrite left is settled first (overwrite.py).
            note = overwrite.clear_or_recover(out_dir, prepared.record,
                                              is_overwrite=job.overwrite, own_lock=lock.path)
            if note is not None:
                reporter.log(note)
            existing = ckpt.existing_job(out_dir, prepared.record)
            return JobRun(prepared, existing, make_engine, reporter, lock, stop).run()
        finally:
            try:
                if job.overwrite:
                    overwrite.finish_overwrite(out_dir, own_lock=lock.path)
            finally:
                lock.release()


class JobRun:
    """One run of one shard: owns the engine, the feeder and the part collector."""

    def __init__(self, prepared: PreparedJob, existing: ckpt.JobRecord | None, make_engine,
                 reporter, lock, stop: StopSignals) -> None:
        """`existing`: the folder's record of this job, None while no run has written it
        (this run writes it once its engine has started)."""
        self.job, self.reader, self.schema = prepared.job, prepared.reader, prepared.schema
        record = existing or prepared.record  # equal fingerprints: equal parts and tag
        self.new_record = None if existing is not None else prepared.record
        self.record, self.make_engine, self.reporter, self.lock = record, make_engine, reporter, lock
        self.stop = stop  # installed by run_job until the lock is released
        self.rpp = record.rows_per_part
        self.out_dir = self.job.output_dir
        self.selection = ckpt.plan_selection(
            self.out_dir, record, shard_index=self.job.shard_index,
            num_shards=self.job.num_shards, limit=self.job.limit)
        self.writer = PartWriter(self.out_dir, record.format, self.schema.arrow if self.schema else None)
        self.collector = PartCollector(self.writer, self.rpp, self.selection.stop)
        self.records = RecordMaker(self.job, self.reader, self.schema, record.tag)
        self.tally = RunTally(self.out_dir, self.selection)
        self.metrics = self.tally.metrics
        self.feeder: Feeder | None = None
        self.in_flight: dict[str, WorkItem] = {}
        self.in_flight_per_part: dict[int, int] = {}
        self.committed_parts: set[int] = set()  # by this run

    # ---- setup ----------------------------------------------------------------------

    def _is_nothing_to_do(self) -> bool:
        stop = self.selection.stop
        if stop is None:
            return False
        return stop == 0 or not self.selection.overlaps(0, stop)

    def _todo_parts(self) -> list[int]:
        stop = self.selection.stop
        last = -(-stop // self.rpp) if stop is not None else max(list_parts(self.out_dir), default=0) + 64
        return [p for p in range(self.job.shard_index, last, self.job.num_shards)
                if p not in self.selection.done_parts]

    def _prefill_short_parts(self) -> None:
        parts = list_parts(self.out_dir)
        for part in list(self.selection.resume_from):
            try:
                records = read_part(parts[part])
            except Exception:  # damaged: redo the whole part
                self.selection.resume_from[part] = part * self.rpp
                continue
            rows = list(range(part * self.rpp, part * self.rpp + len(records)))
            self.collector.prefill(part, records, rows)

    def _start_engine(self) -> None:
        llm, renderer = start_engine(self.make_engine, self.job)
        self.llm, self.engine = llm, llm.engine
        self.window = 2 * _max_num_seqs(self.engine, self.job)
        self.feeder = Feeder(self.job, self.reader, self.schema, self.selection, renderer,
                             base_params(self.job, llm), self.engine, self.window)

    def _record_job(self) -> None:
        """Write `_job.json` unless the folder has it: only once the job can run, so a bad
        setting found by the engine leaves no record that would refuse the corrected command."""
        if self.new_record is not None:
            ckpt.open_job(self.out_dir, self.new_record)  # another job won the race: refused
            overwrite.discard(self.out_dir)  # the new job has begun: the old one is gone for good
            self.new_record = None

    # ---- the run --------------------------------------------------------------------

    def run(self) -> JobMetrics:
        m = self.metrics
        if self._is_nothing_to_do():
            m.status = "nothing to do"
            # Only a job with no rows at all is recorded here. A shard without parts (an array
            # larger than the job) leaves the record to the shards whose engines start: its
            # record would discard an --overwrite's old job before any engine took the settings.
            if self.selection.stop == 0:
                self._record_job()
            if self.new_record is None:
                self.tally.save_state(is_finished=True)
            self.reporter.log(f"batchgen: {self.out_dir} shard {m.shard}: nothing left to do")
            return self._done(EXIT_OK)
        self.writer.remove_stale_tmp(self._todo_parts())
        self._prefill_short_parts()
        self.tally.start_clock()  # stop signals are caught already (run_job): before the model
        try:
            is_done = False
            if self.stop.reason is None:  # a stop while starting: no model to load
                self._start_engine()
                self._record_job()
                self.reporter.start(m)
                self.feeder.start()
                is_done = self._loop()
        finally:
            if self.feeder is not None:
                self.feeder.stop()
            self.reporter.stop()
        m.elapsed_s = self.tally.elapsed_s
        if self.new_record is None:  # no shard state for a job the folder does not record
            self.tally.save_state(is_finished=is_done)
        if is_done:
            m.status = "done"
            return self._done(EXIT_OK)
        m.status = f"interrupted ({self.stop.reason}): re-run to resume"
        return self._done(EXIT_INTERRUPTED)

    def _done(self, code: int) -> JobMetrics:
        self.metrics.exit_code = code
        self.reporter.summary(self.metrics)
        if self.job.metrics_json is not None:
            path = shard_metrics_path(self.job.metrics_json, self.job.shard_index,
                                      self.job.num_shards)
            try:  # checked up front (JobConfig); a failure now must not turn 75 into 1
                write_metrics_json(path, self.metrics)
            except OSError as e:
                print(f"batchgen: warning: cannot write --metrics-json {path}: "
                      f"{e.strerror or e}", file=sys.stderr)
        return self.metrics

    def _loop(self) -> bool:
        """Feed, step, collect until the input is done (True) or a stop was asked (False)."""
        window: deque[WorkItem] = deque()
        is_eof, deadline, last_stats = False, None, 0.0
        while True:
            if self.lock is not None and getattr(self.lock, "is_lost", False):
                self.stop.request("lock lost")
            if self.stop.reason and deadline is None:
                deadline = time.monotonic() + self.job.stop_grace_s
                window.clear()
                self.feeder.request_stop()  # waited for when the run ends, not out of the grace
                self._abort(lambda item: not self._is_completable(item.row // self.rpp))
            if deadline is not None and (not self.in_flight or time.monotonic() > deadline):
                self._abort(lambda item: True)
                # The grace may have finished the whole shard: then it is done, not "resume me"
                # (a Slurm task would be requeued for nothing).
                return self._is_shard_complete()
            if not window and not is_eof and deadline is None:
                is_eof = self._refill(window)
            while window and len(self.in_flight) < self.window:
                self._admit(window.popleft())
            if self.in_flight:
                for out in self.engine.step():
                    item = self.in_flight.pop(out.request_id, None)
                    if item is not None:
                        self.in_flight_per_part[item.row // self.rpp] -= 1
                        self._finish_from_output(item, out)
            elif is_eof and not window:
                return not self.collector.pending
            now = time.monotonic()
            if now - last_stats >= _STATS_EVERY_S:
                last_stats = now
                self._update_progress()

    def _is_shard_complete(self) -> bool:
        """Every part of this shard below the known end of the job is committed."""
        stop = self.collector.stop
        if stop is None or self.collector.pending:
            return False
        done = self.selection.done_parts | self.committed_parts
        return all(p in done for p in range(self.job.shard_index, -(-stop // self.rpp),
                                            self.job.num_shards))

    def _refill(self, window: deque[WorkItem]) -> bool:
        """Queue the feeder's next chunk (finishing its bad rows). Returns True at the end."""
        ready, end = self.feeder.take(
            is_busy=bool(self.in_flight), should_stop=lambda: self.stop.reason is not None,
            on_error=lambda item: self._finish(item, None, "error", len(item.token_ids or ()),
                                               0, item.error))
        if end is not None:
            self._end_of_input(end)
        window.extend(ready)
        return end is not None

    def _end_of_input(self, end: EndOfInput) -> None:
        if end.num_input_rows is None:
            return
        self.tally.num_input_rows = end.num_input_rows
        stop = end.num_input_rows if self.selection.stop is None \
            else min(self.selection.stop, end.num_input_rows)
        if self.collector.stop != stop:
            self._committed(self.collector.set_stop(stop))
            self.metrics.num_rows_total = self.tally.shard_rows(stop)

    def _admit(self, item: WorkItem) -> None:
        request_id = str(item.row)
        try:
            self.engine.add_request(request_id, item.token_ids, item.params)
        except ValueError as e:  # ids the model lacks (a --tokenizer larger than its vocabulary)
            self._finish(item, None, "error", len(item.token_ids), 0, str(e))
            return
        self.in_flight[request_id] = item
        part = item.row // self.rpp
        self.in_flight_per_part[part] = self.in_flight_per_part.get(part, 0) + 1

    def _abort(self, should_abort: Callable[[WorkItem], bool]) -> None:
        for request_id, item in list(self.in_flight.items()):
            if should_abort(item):
                self.engine.abort(request_id)
                del self.in_flight[request_id]
                self.in_flight_per_part[item.row // self.rpp] -= 1

    def _is_completable(self, part: int) -> bool:
        expected = self.collector.expected(part)
        return expected is not None and (self.collector.num_pending(part)
                                         + self.in_flight_per_part.get(part, 0)) == expected

    # ---- finished rows and committed parts ------------------------------------------

    def _finish_from_output(self, item: WorkItem, out) -> None:
        completion = out.outputs[0] if out.outputs else None
        reason = completion.finish_reason if completion is not None else "error"
        if reason == "abort":
            return
        num_prompt = len(out.prompt_token_ids or item.token_ids or ())
        if reason == "error" or out.error is not None or completion is None:
            self._finish(item, None, "error", num_prompt, 0, out.error or "the engine failed this row")
            return
        self._finish(item, completion.text, reason, num_prompt, len(completion.token_ids), None)

    def _finish(self, item: WorkItem, text: str | None, reason: str, num_prompt: int,
                num_output: int, error: str | None) -> None:
        self.tally.row_finished(item.row, num_prompt, num_output, error)
        record = self.records.make(item, text, reason, num_prompt, num_output, error)
        self._committed(self.collector.add(item.row, record))

    def _committed(self, parts: list) -> None:
        if not parts:
            return
        self.committed_parts.update(part for part, _path in parts)
        self.tally.parts_committed(parts)
        self._update_progress(force=True)

    def _update_progress(self, force: bool = False) -> None:
        m = self.metrics
        m.elapsed_s = self.tally.elapsed_s
        stats = getattr(self.engine, "stats", None)
        if stats is not None:
            try:
                s = stats()
                m.kv_usage = s.num_kv_blocks_used / max(1, s.num_kv_blocks_total)
                m.prefix_cache_hit_rate = float(s.prefix_cache_hit_rate)
            except Exception:
                pass
        self.reporter.update(m, force=force)


def _max_num_seqs(engine, job: JobConfig) -> int:
    config = getattr(engine, "config", None)
    value = getattr(config, "max_num_seqs", None) or job.max_num_seqs
    return int(value or 64)
