"""Request: one sequence the engine works on, and its status."""
from __future__ import annotations

import enum
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from batchgen.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # EOS, a stop token or a stop string
    FINISHED_LENGTH = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # could not run (empty prompt, too long, ...)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    prompt_text: str | None = None
    # Seed of this request's random stream (counter-based: depends on seed and position only).
    seed: int = 0
    # max_tokens resolved against max_model_len.
    max_tokens: int = 16
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache (or served from the prefix cache).
    num_computed_tokens: int = 0
    # Of those, how many came from the prefix cache at the last admission.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    # Per generated token: (sampled logprob, top ids, top logprobs) when logprobs were asked.
    logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)
    # Row of this request's token in the previous step's sampled tensor (overlapped steps).
    pending_sample_row: int = -1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the concatenation."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)


def prompt_error(ids: list[int], params: SamplingParams, max_model_len: int, *,
                 has_tokenizer: bool) -> str | None:
    """Why this prompt cannot run (the request then finishes with this error), or None."""
    if not ids:
        return "empty prompt: nothing to generate from"
    if len(ids) >= max_model_len:
        return (f"prompt is {len(ids)} tokens; the model allows at most "
                f"{max_model_len - 1} prompt tokens (max_model_len {max_model_len})")
    if params.max_tokens is not None and len(ids) + params.max_tokens > max_model_len:
        return (f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({max_model_len})")
    if params.stop and not has_tokenizer:
        return "stop strings need a tokenizer (skip_tokenizer_init is set)"
    return None


_PLAIN_INT = {int}


def as_token_ids(ids: Iterable, vocab_size: int | None = None) -> list[int]:
    """ids as a list of ints; ValueError naming the first id that is not an integer (a float,
    a bool, a string) or, given vocab_size, not in [0, vocab_size)."""
    out = list(ids)
    if not set(map(type, out)) <= _PLAIN_INT:  # a 1,000-token list of ints: ~10 us, not ~70
        for i, t in enumerate(out):
            try:
                if isinstance(t, bool):
                    raise TypeError
                out[i] = operator.index(t)
            except TypeError:
                raise ValueError(f"prompt_token_ids[{i}] is {t!r}: token ids must be "
                                 f"integers") from None
    if vocab_size is not None and out and (min(out) < 0 or max(out) >= vocab_size):
        bad = next(t for t in out if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return out


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def child_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of an n > 1 request: a hash of (seed, index), so the samples of
    seed s never repeat those of seed s + 1 (as seed + index would). Sample 0 keeps the seed:
    it draws what the same request with n = 1 draws."""
    if index == 0:
        return seed
    return _splitmix64(_splitmix64(seed & _MASK64) ^ index) >> 1
