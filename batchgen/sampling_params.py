"""SamplingParams: how one request is decoded (shaped like vLLM's)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Names of the fields the caller set explicitly; generation_config.json fills the rest.
    _user_set: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - _field_names(self)
        if unknown:
            raise ValueError(f"SamplingParams: unknown field(s) {sorted(unknown)}")
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            setattr(self, f.name, kwargs.get(f.name, f.default))
        self._user_set = frozenset(kwargs)
        self.__post_init__()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"SamplingParams.stop must be a string or a list of strings, "
                             f"got {self.stop!r}")
        self.stop = list(self.stop or [])
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"SamplingParams.stop_token_ids must be a list of integers, "
                             f"got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (off) or a positive integer")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be an integer >= 0 or None")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not _is_number(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not _is_number(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def is_user_set(self, name: str) -> bool:
        return name in self._user_set

    def with_defaults(self, defaults: dict[str, Any]) -> "SamplingParams":
        """A copy where fields the caller did not set take `defaults` (generation_config);
        names that are not fields are ignored."""
        out = copy.copy(self)
        names = _field_names(self)
        for name, value in defaults.items():
            if name in names and name not in self._user_set:
                setattr(out, name, value)
        out.__post_init__()
        return out

    def clone(self, **changes: Any) -> "SamplingParams":
        unknown = set(changes) - _field_names(self)
        if unknown:
            raise ValueError(f"SamplingParams: unknown field(s) {sorted(unknown)}")
        out = copy.copy(self)
        for name, value in changes.items():
            setattr(out, name, value)
        out._user_set = self._user_set | frozenset(changes)
        out.__post_init__()
        return out


def _is_number(x: Any) -> bool:
    """A finite int or float (bool, NaN and inf are not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _field_names(params: SamplingParams) -> set[str]:
    return {f.name for f in fields(params) if not f.name.startswith("_")}
