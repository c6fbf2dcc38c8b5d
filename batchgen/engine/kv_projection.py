"""KVProjection: the KV tokens the running requests will hold at each future step if every one
runs to its max_tokens, and whether one more request fits under that curve.

A batch job knows each request's output cap up front. Request i, with u_i tokens of its own
(not shared through the prefix cache) and d_i steps left, holds u_i + t tokens at step t < d_i
and none after. The pool's demand at step t is then

    D(t) = shared + sum over {i : d_i > t} of (u_i + t)

where `shared` is the prefix-cache blocks in use now (held until their last user ends; never
grown). D rises by one token per live request per step and drops as each request ends, so
its peak is at some t = d_k - 1. Admitting past `max_num_seqs`'s first part only while that
peak fits the pool gives more concurrency than a fixed cap where outputs are short, and never
preempts (the cap is an upper bound: a request stopped early by EOS frees its blocks sooner).
"""
from __future__ import annotations

import numpy as np


class KVProjection:
    def __init__(self, shared_tokens: int, own_tokens: np.ndarray, steps_left: np.ndarray) -> None:
        # own_tokens, steps_left: [n] per running request (steps_left >= 1)
        self.shared = int(shared_tokens)
        order = np.argsort(steps_left, kind="stable")
        self.steps_left = np.asarray(steps_left, dtype=np.int64)[order]
        self.own = np.asarray(own_tokens, dtype=np.int64)[order]
        self._refresh()

    def _refresh(self) -> None:
        d = self.steps_left
        n = d.shape[0]
        # alive_from[k]: the first request (in ascending d) still alive at t = d_k - 1
        self.alive_from = np.searchsorted(d, d, side="left")
        own_suffix = np.concatenate([np.cumsum(self.own[::-1])[::-1], [0]])
        self.own_suffix = own_suffix
        self.demand = (self.shared + own_suffix[self.alive_from]
                       + (n - self.alive_from) * (d - 1))  # D(d_k - 1) for every k

    def demand_at(self, t: int) -> int:
        """D(t): the tokens held t steps from now."""
        first = int(np.searchsorted(self.steps_left, t, side="right"))  # d_i > t
        n = self.steps_left.shape[0]
        return int(self.shared + self.own_suffix[first] + (n - first) * t)

    @property
    def peak(self) -> int:
        return int(self.demand.max()) if self.demand.size else self.shared

    def peak_with(self, own_tokens: int, steps_left: int) -> int:
        """The peak if a request of own_tokens tokens and steps_left steps joined now."""
        t = self.steps_left - 1
        grown = self.demand + np.where(t < steps_left, own_tokens + t, 0)
        own_end = self.demand_at(steps_left - 1) + own_tokens + steps_left - 1
        return max(int(grown.max()) if grown.size else 0, own_end)

    def add(self, own_tokens: int, steps_left: int) -> None:
        k = int(np.searchsorted(self.steps_left, steps_left, side="right"))
        self.steps_left = np.insert(self.steps_left, k, steps_left)
        self.own = np.insert(self.own, k, own_tokens)
        self._refresh()
