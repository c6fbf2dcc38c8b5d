"""RunTally: the counts of one shard's run — the live metrics, each part's stats until the
part commits, and the shard state file they are added to (`_shard-<i>-of-<n>.json`)."""
from __future__ import annotations

import time
from pathlib import Path

from batchgen.job import checkpoint as ckpt
from batchgen.job.progress import JobMetrics
from batchgen.job.records import error_kind


class RunTally:
    def __init__(self, out_dir: Path, plan: ckpt.ShardPlan) -> None:
        self.out_dir, self.rpp = out_dir, plan.rows_per_part
        self.shard_index, self.num_shards = plan.shard_index, plan.num_shards
        self.state = ckpt.load_shard_state(out_dir, plan.shard_index, plan.num_shards)
        self.metrics = JobMetrics(output_dir=str(out_dir),
                                  shard=f"{plan.shard_index}/{plan.num_shards}",
                                  num_rows_total=self.shard_rows(plan.stop),
                                  num_rows_done_before=plan.num_rows_committed)
        self.num_input_rows = plan.num_input_rows
        self.part_stats: dict[int, list[int]] = {}  # part -> [rows, errors, prompt tok, output tok]
        self.t0: float | None = None  # set when the run starts working

    def start_clock(self) -> None:
        self.t0 = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.t0 if self.t0 is not None else 0.0

    def shard_rows(self, stop: int | None) -> int | None:
        """How many of the rows below `stop` belong to this shard."""
        if stop is None:
            return None
        n, i, r = self.num_shards, self.shard_index, self.rpp
        return sum(min(r, stop - p * r) for p in range(i, -(-stop // r), n))

    def row_finished(self, row: int, num_prompt: int, num_output: int, error: str | None) -> None:
        m = self.metrics
        m.num_rows += 1
        m.num_prompt_tokens += num_prompt
        m.num_output_tokens += num_output
        if error is not None:
            m.num_errors += 1
            kind = error_kind(error)
            m.errors_by_kind[kind] = m.errors_by_kind.get(kind, 0) + 1
        stats = self.part_stats.setdefault(row // self.rpp, [0, 0, 0, 0])
        stats[0] += 1
        stats[1] += error is not None
        stats[2] += num_prompt
        stats[3] += num_output

    def parts_committed(self, parts: list) -> None:
        """Move the committed parts' stats into the state file (saved)."""
        for part, _path in parts:
            rows, errors, num_prompt, num_output = self.part_stats.pop(part, [0, 0, 0, 0])
            self.metrics.num_parts_committed += 1
            self.metrics.num_rows_committed += rows
            for key, value in (("num_rows", rows), ("num_errors", errors),
                               ("num_prompt_tokens", num_prompt), ("num_output_tokens", num_output)):
                self.state[key] += value
        self.save_state(is_finished=False)

    def save_state(self, is_finished: bool) -> None:
        state = dict(self.state, elapsed_s=self.state["elapsed_s"] + self.elapsed_s,
                     num_runs=self.state["num_runs"] + 1, is_finished=is_finished,
                     num_input_rows=self.num_input_rows)
        ckpt.save_shard_state(self.out_dir, state)
