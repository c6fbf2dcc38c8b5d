"""Which input rows a run still has to do: row ranges by part, parts by shard, resume points."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RowSelection:
    """The rows a run still has to do: parts `p % num_shards == shard_index`, minus the
    committed ones; a part committed short (by --limit) resumes after its last row."""
    rows_per_part: int
    shard_index: int = 0
    num_shards: int = 1
    done_parts: frozenset[int] = frozenset()
    resume_from: dict[int, int] = field(default_factory=dict)  # part -> first row not done
    stop: int | None = None  # exclusive row bound (--limit, or the input's length)

    def contains(self, row: int) -> bool:
        if self.stop is not None and row >= self.stop:
            return False
        part = row // self.rows_per_part
        return (part % self.num_shards == self.shard_index and part not in self.done_parts
                and row >= self.resume_from.get(part, 0))

    def overlaps(self, start: int, stop: int) -> bool:
        """Whether any row in [start, stop) is selected (to skip whole row groups)."""
        if self.stop is not None:
            stop = min(stop, self.stop)
        for part in range(start // self.rows_per_part, (stop - 1) // self.rows_per_part + 1):
            if part % self.num_shards != self.shard_index or part in self.done_parts:
                continue
            first = max(start, part * self.rows_per_part, self.resume_from.get(part, 0))
            if first < min(stop, (part + 1) * self.rows_per_part):
                return True
        return False
