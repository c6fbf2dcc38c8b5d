"""Feeder: input rows -> tokenized WorkItems on a background thread, handed out in chunks
in admission order.

The tokenizer thread reads the rows still to do, renders and tokenizes each prompt, and puts
them on a bounded queue in batches of `_QUEUE_BATCH` (about 2 * `window` rows queued at most).
`take()` gives the run up to `window` good rows at a time in admission order (the longest
outputs first, then equal prompt prefixes and similar lengths together: engine/admission.py);
bad rows go straight to `on_error`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from batchgen.engine.admission import admission_order
from batchgen.job.config import JobConfig
from batchgen.job.openai_batch import BatchRequest, custom_id_of, parse_request
from batchgen.job.reader import Reader, Row
from batchgen.job.row_selection import RowSelection
from batchgen.job.writer import OutputSchema
from batchgen.recipe import PromptRenderer, RowError
from batchgen.sampling_params import SamplingParams

_QUEUE_BATCH = 64  # rows per tokenizer-queue item (fewer lock round trips)
# The thread checks its stop event between rows and every 0.2 s while the queue is full, so
# it ends within one row's read and tokenization; the bound keeps a stuck read (a network
# stream) from holding the exit past the stop grace.
_JOIN_TIMEOUT_S = 10.0


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


def row_seed(job_seed: int, row: int) -> int:
    """A 63-bit seed for row `row`: the same in a resumed run as in an uninterrupted one."""
    digest = hashlib.blake2b(f"{job_seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def base_params(job: JobConfig, llm) -> SamplingParams:
    """The job's sampling fields over the model's generation_config defaults."""
    params = job.sampling_params()
    get_defaults = getattr(llm, "get_default_sampling_params", None)
    if get_defaults is None:
        return params
    defaults = get_defaults()
    names = [f.name for f in dataclasses.fields(defaults) if not f.name.startswith("_")]
    return params.with_defaults({n: getattr(defaults, n) for n in names
                                 if defaults.is_user_set(n) and n != "seed"})


class Feeder:
    """Owns the tokenizer thread, its queue, and the rows taken but not yet handed out."""

    def __init__(self, job: JobConfig, reader: Reader, schema: OutputSchema | None,
                 selection: RowSelection, renderer: PromptRenderer, params: SamplingParams,
                 engine, window: int) -> None:
        self.job, self.reader, self.schema, self.selection = job, reader, schema, selection
        self.renderer, self.base_params, self.engine, self.window = renderer, params, engine, window
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, 2 * window // _QUEUE_BATCH + 1))
        self.backlog: deque[WorkItem] = deque()  # taken from the queue, not yet in a chunk
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batchgen-tokenizer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the tokenizer thread to end, without waiting (the run keeps stepping)."""
        self.stop_event.set()

    def stop(self, timeout: float = _JOIN_TIMEOUT_S) -> None:
        """Stop the tokenizer thread and wait for it: a thread still inside the tokenizer or
        torch while the interpreter shuts down can abort the process (exit 134, seen under
        Slurm), where an interrupted run must exit 75."""
        self.request_stop()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- the run's side ---------------------------------------------------------------

    def take(self, *, is_busy: bool, should_stop: Callable[[], bool],
             on_error: Callable[[WorkItem], None]) -> tuple[list[WorkItem], EndOfInput | None]:
        """Up to `window` good rows, in admission order, and the EndOfInput if it came.
        Waits for rows only while the engine is idle (`is_busy` False) and no stop was asked;
        each bad row is handed to `on_error` as it is met."""
        ready: list[WorkItem] = []
        end = None
        while len(ready) < self.window:
            if self.backlog:  # rows taken from the queue beyond the previous chunk
                item = self.backlog.popleft()
                if item.error is not None:
                    on_error(item)
                else:
                    ready.append(item)
                continue
            try:
                got = self.queue.get(timeout=0.1) if not is_busy and not ready \
                    else self.queue.get_nowait()
            except queue.Empty:
                if is_busy or ready or should_stop():
                    break
                continue
            if isinstance(got, BaseException):
                raise got
            if isinstance(got, EndOfInput):
                end = got
                break
            self.backlog.extend(got)
        order = admission_order([it.token_ids for it in ready],
                                [it.params.max_tokens for it in ready])
        return [ready[i] for i in order], end

    # ---- the tokenizer thread -----------------------------------------------------------

    def _produce(self) -> None:
        try:
            self._produce_rows()
        except BaseException as e:  # handed to the main thread, which raises it
            self._put(e)

    def _produce_rows(self) -> None:
        is_openai = self.schema is None
        # OpenAI input is scanned whole so a custom_id repeated across parts is caught.
        scan = RowSelection(self.selection.rows_per_part, stop=self.selection.stop) \
            if is_openai else self.selection
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
