"""Parquet input: a .parquet file or a folder of them, read by row group in small batches;
row groups outside the selection are never read.

A folder downloaded from the Hugging Face hub holds several splits side by side
(`data/train-00000-of-00002.parquet` + `data/test-00000-of-00001.parquet`, `train/*.parquet` +
`test/*.parquet`, `train.parquet` + `validation.parquet`); read as one table they would mix
them, so a folder whose files name more than one split is read as the split `--split` picks.
File names follow `datasets`' rules, simplified: a `<split>-NNNNN-of-NNNNN` shard name, a folder
named for a split, or a name starting with one and then `-`, `_` or `.`; the keywords are
`datasets`' own (train/training, validation/valid/val/dev, test/testing/eval/evaluation).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job.config import JobConfigError
from batchgen.job.reader import BATCH_ROWS, NUM_SAMPLE_RECORDS, Reader, Row
from batchgen.job.row_selection import RowSelection

_SPLIT_KEYWORDS = {"train": ("train", "training"),
                   "validation": ("validation", "valid", "val", "dev"),
                   "test": ("test", "testing", "eval", "evaluation")}
_CANONICAL_SPLITS = {kw: split for split, kws in _SPLIT_KEYWORDS.items() for kw in kws}
_SHARD_NAME = re.compile(r"^(.+?)-\d{5}-of-\d{5}")
_KEYWORD_PREFIX = re.compile(rf"^({'|'.join(_CANONICAL_SPLITS)})[-_.]")


def parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))


def split_of(relative: Path) -> str | None:
    """The split a data file's path (below the input folder) names, if any: the innermost
    folder named for a split, else a shard name's split, else a split keyword prefix."""
    for folder in reversed(relative.parts[:-1]):
        if folder.lower() in _CANONICAL_SPLITS:
            return _CANONICAL_SPLITS[folder.lower()]
    match = _SHARD_NAME.match(relative.name) or _KEYWORD_PREFIX.match(relative.name.lower())
    return None if match is None else canonical_split(match.group(1))


def canonical_split(name: str) -> str:
    """A `datasets` keyword is its split's name (`dev` is `validation`, `eval` is `test`, any
    case); other names are their own."""
    return _CANONICAL_SPLITS.get(name.lower(), name)


def select_split(folder: Path, files: list[Path], split: str) -> tuple[list[Path], str | None]:
    """The files of `split` and its name, where the files name more than one split; else all
    of them (one split, or none named) and None. Files naming no split are then left out."""
    splits = {f: split_of(f.relative_to(folder)) for f in files}
    names = sorted({s for s in splits.values() if s is not None})
    if len(names) <= 1:
        return files, None
    wanted = canonical_split(split)
    if wanted not in names:
        raise JobConfigError(f"input folder {folder} has no split {split!r} "
                             f"(splits: {', '.join(names)}); pick one with --split")
    return [f for f in files if splits[f] == wanted], wanted


class ParquetReader(Reader):
    """A .parquet file or a folder of them (sorted by path, read as one table); a folder of
    several splits is read as `split` alone."""

    def __init__(self, path: str, split: str = "train") -> None:
        self.path = Path(path)
        self.files = parquet_files(self.path) if self.path.is_dir() else [self.path]
        if not self.files:
            raise JobConfigError(f"no .parquet files in {path}")
        self.split = None
        if self.path.is_dir():
            self.files, self.split = select_split(self.path, self.files, split)
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
        ident = {"kind": "parquet", "path": str(self.path.resolve()), "num_rows": self.num_rows,
                 "files": [[str(f.relative_to(self.path)) if self.path.is_dir() else f.name,
                            f.stat().st_size, _footer_hash(f)] for f in self.files]}
        if self.split is not None:  # only where one was chosen: other jobs keep their identity
            ident["split"] = self.split
        return ident

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
