"""StepTimer: host wall time per phase of a step (schedule, prepare, launch, wait for the GPU,
update), accumulated; a perf_counter call per phase, no device sync of its own."""
from __future__ import annotations

import time
from collections import defaultdict


class StepTimer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def reset(self) -> None:
        self.totals.clear()
        self._last = time.perf_counter()
