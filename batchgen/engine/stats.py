"""EngineStats (what `Engine.stats()` reports) and PeakTracker (the peaks it keeps per step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from batchgen.engine.kv_cache_manager import KVCacheManager
from batchgen.engine.request import Request


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    block_size: int
    kv_pool_tokens: int
    prefix_cache_hit_rate: float
    num_prompt_tokens: int
    num_generated_tokens: int
    num_preemptions: int
    num_steps: int
    peak_num_running: int
    peak_kv_slots_allocated: int
    peak_kv_tokens_held: int
    startup_seconds: float
    # Host seconds per phase of step() since the last reset (wait_gpu: blocked on the device).
    step_seconds: dict[str, float]

    @property
    def kv_usage(self) -> float:
        return self.num_kv_blocks_used / max(self.num_kv_blocks_total, 1)

    @property
    def peak_kv_waste(self) -> float:
        if not self.peak_kv_slots_allocated:
            return 0.0
        return 1 - self.peak_kv_tokens_held / self.peak_kv_slots_allocated


class PeakTracker:
    """Highest running count and KV slots allocated, with the slots holding tokens at that peak
    (their difference is the KV waste the bench reports)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.reset()

    def reset(self) -> None:
        self.num_running = 0
        self.num_slots = 0
        self.num_held = 0

    def track(self, kv: KVCacheManager, running: Sequence[Request]) -> None:
        used = kv.num_used_blocks * self.block_size
        self.num_running = max(self.num_running, len(running))
        if used > self.num_slots:
            self.num_slots = used
            # Slots held by tokens: each running request wastes only its last block's tail.
            waste = sum(len(kv.get_block_ids(r)) * self.block_size - r.num_computed_tokens
                        for r in running)
            self.num_held = used - max(waste, 0)
