"""run_job: reader -> prompts (tokenized in a background thread) -> engine -> parts.

The engine is kept fed from a bounded look-ahead window: rows are taken in input order in
chunks of `window` rows, each chunk is admitted sorted (equal prompt prefixes together,
similar lengths together), and the writer restores input order per part. At most `window`
requests are in the engine and the tokenizer queue holds about 2 * `window` rows, so memory
stays flat however large the input, and parts commit steadily.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from batchgen.job import checkpoint as ckpt
from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.openai_batch import BatchRequest, custom_id_of, parse_request, response_line
from batchgen.job.progress import JobMetrics, ProgressReporter, write_metrics_json
from batchgen.job.reader import JsonlReader, Reader, Row, RowSelection, open_reader
from batchgen.job.writer import (OutputSchema, PartCollector, PartWriter, count_part_rows,
                                 list_parts, parse_json_columns, read_part)
from batchgen.recipe import PromptRenderer, PromptTemplateError, RowError, template_variables
from batchgen.sampling_params import SamplingParams

EXIT_OK, EXIT_INTERNAL, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 75
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
_QUEUE_BATCH = 64  # rows per tokenizer-queue item (fewer lock round trips)
_STATS_EVERY_S = 0.5


@dataclass
class WorkItem:
    row: int
    fields: dict[str, Any]  # the kept input fields
    token_ids: list[int] | None = None
    params: SamplingParams | None = None
    error: str | None = None
    request: BatchRequest | None = None  # OpenAI batch
    custom_id: str | None = None


@dataclass
class EndOfInput:
    num_input_rows: int | None  # the input's length, when the reader knows it now


@dataclass
class PreparedJob:
    """Everything checked before any work: the reader, output schema and job record."""
    job: JobConfig
    reader: Reader
    schema: OutputSchema | None  # None: OpenAI batch output lines
    record: ckpt.JobRecord


def default_make_engine(job: JobConfig):
    from batchgen.llm import LLM
    return LLM(model=job.model, device=job.device, dtype=job.dtype,
               max_model_len=job.max_model_len, max_num_seqs=job.max_num_seqs,
               max_num_batched_tokens=job.max_num_batched_tokens,
               gpu_memory_utilization=job.gpu_memory_utilization, tokenizer=job.tokenizer,
               seed=job.seed, load_format=job.load_format)


def row_seed(job_seed: int, row: int) -> int:
    """A 63-bit seed for row `row`: the same in a resumed run as in an uninterrupted one."""
    digest = hashlib.blake2b(f"{job_seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def is_openai_sample(records: list[dict[str, Any]]) -> bool:
    return bool(records) and all("custom_id" in r and "body" in r for r in records[:10])


def prepare_job(job: JobConfig) -> PreparedJob:
    """Open the input and check the columns and the model; JobConfigError on a mistake."""
    model = ckpt.model_identity(job.model)
    reader = open_reader(job)
    sample = reader.sample()
    if job.input_format == "auto" and isinstance(reader, JsonlReader) and is_openai_sample(sample):
        job = dataclasses.replace(job, input_format="openai")
    if job.is_openai_batch:
        if not any("custom_id" in r for r in sample):
            raise JobConfigError(f"{job.input}: no OpenAI batch request lines (custom_id, body) "
                                 "in its first records")
        schema = None
    else:
        _check_prompt_columns(job, reader)
        try:
            schema = OutputSchema(reader.schema, job.keep, job.parse_json)
        except ValueError as e:
            raise JobConfigError(str(e)) from None
    fields = ckpt.fingerprint_fields(job, model, reader.identity())
    record = ckpt.JobRecord(ckpt.fingerprint(fields), fields, job.rows_per_part, job.output_format,
                            reader.num_rows, job.is_openai_batch)
    return PreparedJob(job, reader, schema, record)


def _check_prompt_columns(job: JobConfig, reader: Reader) -> None:
    where = "the first 100 records" if isinstance(reader, JsonlReader) else "the schema"
    columns = ", ".join(reader.columns) or "none"
    if job.template is not None:
        missing = sorted(template_variables(job.template) - set(reader.columns))
        if missing:
            raise JobConfigError(f"the template uses {', '.join(missing)}, not in {where} "
                                 f"of {job.input} (columns: {columns})")
        return
    column = job.prompt_column or "prompt"
    if column not in reader.columns:
        hint = "" if job.prompt_column else " (pass --prompt-column or --template)"
        raise JobConfigError(f"prompt column {column!r} is not in {where} of {job.input} "
                             f"(columns: {columns}){hint}")


def run_job(job: JobConfig, *, make_engine: Callable[[JobConfig], Any] = default_make_engine,
            reporter: ProgressReporter | None = None) -> JobMetrics:
    """Run (or resume) the job; returns its metrics, `exit_code` included. Configuration
    mistakes raise JobConfigError before the engine is made."""
    prepared = prepare_job(job)
    job = prepared.job
    reporter = reporter or ProgressReporter()
    record = ckpt.open_job(job.output_dir, prepared.record, overwrite=job.overwrite)
    from batchgen.job.lock import ShardLock
    lock = ShardLock(job.output_dir, job.shard_index, job.num_shards)
    if not lock.acquire():
        reporter.log(f"batchgen: shard {job.shard_index}/{job.num_shards} is already running: "
                     f"{lock.holder_description()}")
        return JobMetrics(output_dir=str(job.output_dir), status="already running")
    try:
        return JobRun(prepared, record, make_engine, reporter, lock).run()
    finally:
        lock.release()


class JobRun:
    """One run of one shard: owns the engine, the tokenizer thread and the part collector."""

    def __init__(self, prepared: PreparedJob, record: ckpt.JobRecord, make_engine, reporter,
                 lock) -> None:
        self.job, self.reader, self.schema = prepared.job, prepared.reader, prepared.schema
        self.record, self.make_engine, self.reporter, self.lock = record, make_engine, reporter, lock
        self.rpp = record.rows_per_part
        self.out_dir = self.job.output_dir
        self.selection = ckpt.plan_selection(
            self.out_dir, record, shard_index=self.job.shard_index,
            num_shards=self.job.num_shards, limit=self.job.limit)
        self.writer = PartWriter(self.out_dir, record.format, self.schema.arrow if self.schema else None)
        self.collector = PartCollector(self.writer, self.rpp, self.selection.stop)
        self.state = ckpt.load_shard_state(self.out_dir, self.job.shard_index, self.job.num_shards)
        total = ckpt.known_num_input_rows(self.out_dir, record)
        self.metrics = JobMetrics(output_dir=str(self.out_dir),
                                  shard=f"{self.job.shard_index}/{self.job.num_shards}",
                                  num_rows_total=self._shard_rows(self.selection.stop),
                                  num_rows_done_before=self._rows_done_before())
        self.num_input_rows = total
        self.stop_reason: str | None = None
        self.stop_event = threading.Event()
        self.part_stats: dict[int, list[int]] = {}  # part -> [rows, errors, prompt tok, output tok]
        self.in_flight: dict[str, WorkItem] = {}
        self.backlog: deque[WorkItem] = deque()  # taken from the queue, not yet in a chunk
        self.in_flight_per_part: dict[int, int] = {}
        self._old_handlers: dict[int, Any] = {}

    # ---- setup ----------------------------------------------------------------------

    def _shard_rows(self, stop: int | None) -> int | None:
        if stop is None:
            return None
        n, i, r = self.job.num_shards, self.job.shard_index, self.rpp
        return sum(min(r, stop - p * r) for p in range(i, -(-stop // r), n))

    def _rows_done_before(self) -> int:
        num = 0
        for part, path in list_parts(self.out_dir).items():
            if part % self.job.num_shards == self.job.shard_index:
                try:
                    num += count_part_rows(path)
                except Exception:
                    pass
        return num

    def _is_nothing_to_do(self) -> bool:
        stop = self.selection.stop
        if stop is None:
            return False
        return stop == 0 or not self.selection.overlaps(0, stop)

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

    # ---- the run --------------------------------------------------------------------

    def run(self) -> JobMetrics:
        m = self.metrics
        if self._is_nothing_to_do():
            m.status = "nothing to do"
            self._finish_state(is_finished=True)
            self.reporter.log(f"batchgen: {self.out_dir} shard {m.shard}: nothing left to do")
            return self._done(EXIT_OK)
        self.writer.remove_stale_tmp(self._todo_parts())
        self._prefill_short_parts()
        self.t0 = time.monotonic()
        self._install_signals()  # before loading the model: a stop then exits 75 right after
        try:
            self._start_engine()
            producer = threading.Thread(target=self._produce, name="batchgen-tokenizer",
                                        daemon=True)
            self.reporter.start(m)
            producer.start()
            is_done = self._loop()
        finally:
            self.stop_event.set()
            self._restore_signals()
            self.reporter.stop()
        m.elapsed_s = time.monotonic() - self.t0
        self._finish_state(is_finished=is_done)
        if is_done:
            m.status = "done"
            return self._done(EXIT_OK)
        m.status = f"interrupted ({self.stop_reason}): re-run to resume"
        return self._done(EXIT_INTERRUPTED)

    def _start_engine(self) -> None:
        llm = self.make_engine(self.job)
        try:
            self.renderer = PromptRenderer(llm.tokenizer, prompt_column=self.job.prompt_column,
                                           template=self.job.template, system=self.job.system,
                                           chat=self.job.chat)
        except PromptTemplateError as e:
            raise JobConfigError(str(e)) from None
        self.llm, self.engine = llm, llm.engine
        self.base_params = _base_params(self.job, llm)
        self.window = 2 * _max_num_seqs(self.engine, self.job)
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, 2 * self.window // _QUEUE_BATCH + 1))

    def _todo_parts(self) -> list[int]:
        stop = self.selection.stop
        last = -(-stop // self.rpp) if stop is not None else max(list_parts(self.out_dir), default=0) + 64
        return [p for p in range(self.job.shard_index, last, self.job.num_shards)
                if p not in self.selection.done_parts]

    def _done(self, code: int) -> JobMetrics:
        self.metrics.exit_code = code
        self.reporter.summary(self.metrics)
        if self.job.metrics_json is not None:
            write_metrics_json(self.job.metrics_json, self.metrics)
        return self.metrics

    def _loop(self) -> bool:
        """Feed, step, collect until the input is done (True) or a stop was asked (False)."""
        window: deque[WorkItem] = deque()
        is_eof, deadline, last_stats = False, None, 0.0
        while True:
            if self.lock is not None and getattr(self.lock, "is_lost", False) and not self.stop_reason:
                self.stop_reason = "lock lost"
            if self.stop_reason and deadline is None:
                deadline = time.monotonic() + self.job.stop_grace_s
                window.clear()
                self.stop_event.set()
                self._abort(lambda item: not self._is_completable(item.row // self.rpp))
            if deadline is not None and (not self.in_flight or time.monotonic() > deadline):
                self._abort(lambda item: True)
                return False
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

    def _refill(self, window: deque[WorkItem]) -> bool:
        """Take up to `window` rows from the tokenizer queue (waiting only while the engine
        is idle), finish the bad ones, queue the rest sorted. Returns True at the end."""
        ready: list[WorkItem] = []
        is_eof = False
        while len(ready) < self.window:
            if self.backlog:  # rows taken from the queue beyond the previous chunk
                item = self.backlog.popleft()
                if item.error is not None:
                    self._finish(item, None, "error", len(item.token_ids or ()), 0, item.error)
                else:
                    ready.append(item)
                continue
            try:
                got = self.queue.get(timeout=0.1) if not self.in_flight and not ready \
                    else self.queue.get_nowait()
            except queue.Empty:
                if self.in_flight or ready or self.stop_reason:
                    break
                continue
            if isinstance(got, BaseException):
                raise got
            if isinstance(got, EndOfInput):
                is_eof = True
                self._end_of_input(got)
                break
            self.backlog.extend(got)
        ready.sort(key=lambda it: (tuple(it.token_ids[:64]), len(it.token_ids)))
        window.extend(ready)
        return is_eof

    def _end_of_input(self, end: EndOfInput) -> None:
        if end.num_input_rows is None:
            return
        self.num_input_rows = end.num_input_rows
        stop = end.num_input_rows if self.selection.stop is None \
            else min(self.selection.stop, end.num_input_rows)
        if self.collector.stop != stop:
            self._committed(self.collector.set_stop(stop))
            self.metrics.num_rows_total = self._shard_rows(stop)

    def _admit(self, item: WorkItem) -> None:
        request_id = str(item.row)
        self.engine.add_request(request_id, item.token_ids, item.params)
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
        m = self.metrics
        m.num_rows += 1
        m.num_prompt_tokens += num_prompt
        m.num_output_tokens += num_output
        if error is not None:
            m.num_errors += 1
            kind = error_kind(error)
            m.errors_by_kind[kind] = m.errors_by_kind.get(kind, 0) + 1
        stats = self.part_stats.setdefault(item.row // self.rpp, [0, 0, 0, 0])
        stats[0] += 1
        stats[1] += error is not None
        stats[2] += num_prompt
        stats[3] += num_output
        record = self._record(item, text, reason, num_prompt, num_output, error)
        self._committed(self.collector.add(item.row, record))

    def _record(self, item: WorkItem, text, reason, num_prompt, num_output, error) -> dict:
        if self.schema is None:
            return response_line(row=item.row, job_tag=self.record.tag, request=item.request,
                                 custom_id=item.custom_id, model_name=_model_name(self.job),
                                 text=text, finish_reason=reason, prompt_tokens=num_prompt,
                                 output_tokens=num_output, error=error)
        record = {"row": item.row}
        for column, name in self.schema.input_names.items():
            record[name] = self.reader.output_value(column, item.fields.get(column))
        record.update(text=text, finish_reason=reason, prompt_tokens=num_prompt,
                      output_tokens=num_output, error=error)
        if self.schema.parse_json:
            record.update(parse_json_columns(text, self.schema.parse_json))
        return record

    def _committed(self, parts: list) -> None:
        if not parts:
            return
        for part, _path in parts:
            rows, errors, num_prompt, num_output = self.part_stats.pop(part, [0, 0, 0, 0])
            self.metrics.num_parts_committed += 1
            self.metrics.num_rows_committed += rows
            for key, value in (("num_rows", rows), ("num_errors", errors),
                               ("num_prompt_tokens", num_prompt), ("num_output_tokens", num_output)):
                self.state[key] += value
        self._save_state(is_finished=False)
        self._update_progress(force=True)

    # ---- bookkeeping ----------------------------------------------------------------

    def _save_state(self, is_finished: bool) -> None:
        elapsed = time.monotonic() - self.t0 if hasattr(self, "t0") else 0.0
        state = dict(self.state, elapsed_s=self.state["elapsed_s"] + elapsed,
                     num_runs=self.state["num_runs"] + 1, is_finished=is_finished,
                     num_input_rows=self.num_input_rows)
        ckpt.save_shard_state(self.out_dir, state)

    def _finish_state(self, is_finished: bool) -> None:
        self._save_state(is_finished)

    def _update_progress(self, force: bool = False) -> None:
        m = self.metrics
        m.elapsed_s = time.monotonic() - self.t0
        stats = getattr(self.engine, "stats", None)
        if stats is not None:
            try:
                s = stats()
                m.kv_usage = s.num_kv_blocks_used / max(1, s.num_kv_blocks_total)
                m.prefix_cache_hit_rate = float(s.prefix_cache_hit_rate)
            except Exception:
                pass
        self.reporter.update(m, force=force)

    # ---- signals --------------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in _STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, _frame) -> None:
        if self.stop_reason is not None and signum == signal.SIGINT:
            os.write(2, b"\nbatchgen: interrupted again, exiting now (committed parts are safe)\n")
            os._exit(EXIT_INTERRUPTED)
        if self.stop_reason is None:
            self.stop_reason = signal.Signals(signum).name
            os.write(2, f"\nbatchgen: {self.stop_reason}: committing complete parts, then "
                        "exiting (Ctrl-C again to exit at once)\n".encode())

    # ---- the tokenizer thread -------------------------------------------------------

    def _produce(self) -> None:
        try:
            self._produce_rows()
        except BaseException as e:  # handed to the main thread, which raises it
            self._put(e)

    def _produce_rows(self) -> None:
        is_openai = self.schema is None
        # OpenAI input is scanned whole so a custom_id repeated across parts is caught.
        scan = RowSelection(self.rpp, stop=self.selection.stop) if is_openai else self.selection
        seen: set[str] = set()
        batch: list[WorkItem] = []
        for row in self.reader.iter_rows(scan):
            if self.stop_event.is_set():
                return
            is_repeat = False
            if is_openai and row.error is None:
                custom_id = custom_id_of(row.fields)
                is_repeat = custom_id in seen
                if custom_id is not None:
                    seen.add(custom_id)
            if is_openai and not self.selection.contains(row.index):
                continue
            batch.append(self._make_item(row, is_repeat))
            if len(batch) >= _QUEUE_BATCH:
                if not self._put(batch):
                    return
                batch = []
        if batch and not self._put(batch):
            return
        self._put(EndOfInput(self.reader.num_rows))

    def _put(self, item: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _make_item(self, row: Row, is_repeat: bool) -> WorkItem:
        if row.error is not None:
            return WorkItem(row.index, {}, error=row.error)
        fields = row.fields
        item = WorkItem(row.index, fields if self.schema is None
                        else {c: fields.get(c) for c in self.schema.input_names})
        try:
            params = self.base_params
            if self.schema is None:
                item.custom_id = custom_id_of(fields)
                if is_repeat:
                    raise RowError(f"repeated custom_id {item.custom_id!r}")
                item.request = request = parse_request(fields)
                item.fields = {}
                if request.messages is not None:
                    item.token_ids = self.renderer.encode_messages(request.messages)
                else:
                    item.token_ids = self.renderer.encode_plain(request.prompt)
                if request.sampling:
                    try:
                        params = params.clone(**request.sampling)
                    except (ValueError, TypeError) as e:
                        raise RowError(f"body: {e}") from None
            else:
                item.token_ids = self.renderer.encode_row(fields)
            max_len = self.engine.max_model_len
            if len(item.token_ids) >= max_len:
                raise RowError(f"prompt too long: {len(item.token_ids)} tokens, the model "
                               f"allows {max_len - 1} (max_model_len {max_len})")
            if not params.is_greedy and not (self.schema is None and "seed" in request.sampling):
                params = params.clone(seed=row_seed(self.job.seed, row.index))
            item.params = params
        except RowError as e:
            item.error = str(e)
        return item


def _base_params(job: JobConfig, llm) -> SamplingParams:
    """The job's sampling fields over the model's generation_config defaults."""
    params = job.sampling_params()
    get_defaults = getattr(llm, "get_default_sampling_params", None)
    if get_defaults is None:
        return params
    defaults = get_defaults()
    names = [f.name for f in dataclasses.fields(defaults) if not f.name.startswith("_")]
    return params.with_defaults({n: getattr(defaults, n) for n in names
                                 if defaults.is_user_set(n) and n != "seed"})


def _max_num_seqs(engine, job: JobConfig) -> int:
    config = getattr(engine, "config", None)
    value = getattr(config, "max_num_seqs", None) or job.max_num_seqs
    return int(value or 64)


def _model_name(job: JobConfig) -> str:
    from batchgen.models.gguf import DEFAULT_MODEL_NAME
    return DEFAULT_MODEL_NAME if job.model is None else os.path.basename(job.model.rstrip("/"))


_ERROR_KINDS = ("malformed JSON", "blank line", "undecodable bytes", "not an object",
                "missing field", "is null", "not a string", "empty prompt", "prompt too long",
                "repeated custom_id", "prompt template", "chat template", "custom_id", "url",
                "method", "body", "n=")


def error_kind(error: str) -> str:
    for kind in _ERROR_KINDS:
        if kind in error:
            return kind
    return "other"
