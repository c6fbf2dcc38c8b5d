"""Parquet input: a .parquet file or a folder of them, read by row group in small batches;
row groups outside the selection are never read."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job.config import JobConfigError
from batchgen.job.reader import BATCH_ROWS, NUM_SAMPLE_RECORDS, Reader, Row
from batchgen.job.row_selection import RowSelection


def parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))


class ParquetReader(Reader):
    """A .parquet file or a folder of them (sorted by path, read as one table)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.files = parquet_files(self.path) if self.path.is_dir() else [self.path]
        if not self.files:
            raise JobConfigError(f"no .parquet files in {path}")
        try:
            metas = [pq.ParquetFile(f) for f in self.files]
        except (pa.ArrowInvalid, OSError) as e:
            raise JobConfigError(f"cannot read {path} as Parquet: {e}") from None
        self.schema = metas[0].schema_arrow
        for f, meta in zip(self.files[1:], metas[1:]):
            if not meta.schema_arrow.equals(self.schema):
                raise JobConfigError(f"{f} has a different schema from {self.files[0]}")
        self.columns = list(self.schema.names)
        self.num_rows = sum(m.metadata.num_rows for m in metas)

    def identity(self) -> dict[str, Any]:
        # Each file's footer too: a file written again with other rows of the same count and
        # byte size has other statistics and offsets, and a resumed job must not mix the two.
        return {"kind": "parquet", "path": str(self.path.resolve()), "num_rows": self.num_rows,
                "files": [[str(f.relative_to(self.path)) if self.path.is_dir() else f.name,
                           f.stat().st_size, _footer_hash(f)] for f in self.files]}

    def sample(self) -> list[dict[str, Any]]:
        pf = pq.ParquetFile(self.files[0])
        for batch in pf.iter_batches(batch_size=NUM_SAMPLE_RECORDS):
            return batch.to_pylist()
        return []

    def iter_rows(self, selection: RowSelection) -> Iterator[Row]:
        offset = 0
        for path in self.files:
            pf = pq.ParquetFile(path)
            for group in range(pf.metadata.num_row_groups):
                num = pf.metadata.row_group(group).num_rows
                start = offset
                offset += num
                if selection.stop is not None and start >= selection.stop:
                    return
                if not selection.overlaps(start, start + num):
                    continue
                index = start
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                    if not selection.overlaps(index, index + batch.num_rows):
                        index += batch.num_rows
                        continue
                    for record in batch.to_pylist():
                        if selection.contains(index):
                            yield Row(index, record)
                        index += 1


def _footer_hash(path: Path) -> str:
    """The hash of a Parquet file's footer (schema, row groups, offsets, statistics), read
    from its last bytes: `<footer><footer length: 4 bytes LE>PAR1`."""
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        size = int.from_bytes(f.read(4), "little")
        f.seek(-8 - size, os.SEEK_END)
        return hashlib.sha256(f.read(size)).hexdigest()[:16]
