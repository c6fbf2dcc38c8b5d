"""Hugging Face datasets input: a `save_to_disk` folder (memory-mapped, read by slices) or a
hub dataset id (streamed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from batchgen.job.config import JobConfigError
from batchgen.job.jsonl_reader import fit_value, kinds_schema, record_kinds
from batchgen.job.reader import BATCH_ROWS, NUM_SAMPLE_RECORDS, Reader, Row
from batchgen.job.row_selection import RowSelection


class HFDatasetReader(Reader):
    """A folder written by `save_to_disk` (memory-mapped, read by slices) or a hub dataset id
    (streamed through `datasets`; its length may only be known at the end)."""

    def __init__(self, path: str, split: str = "train") -> None:
        import datasets

        self.path, self.split = path, split
        try:
            if os.path.isdir(path):
                ds = datasets.load_from_disk(path)
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise JobConfigError(f"dataset {path} has no split {split!r} "
                                             f"(splits: {', '.join(ds)})")
                    ds = ds[split]
                elif split != "train" and str(ds.split) != split:
                    # One saved split: a split asked for (not the default) must be this one.
                    raise JobConfigError(f"dataset {path} is one split ({ds.split or 'unnamed'}), "
                                         f"not a DatasetDict: no split {split!r}")
            else:
                ds = datasets.load_dataset(path, split=split, streaming=True)
        except JobConfigError:
            raise
        except Exception as e:
            raise JobConfigError(f"cannot open dataset {path}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        self.dataset = ds
        self.is_streaming = isinstance(ds, datasets.IterableDataset)
        # A stream without declared features: column kinds from its first records, as a
        # JSONL file's (a null or an int there must not fix a column's type for good).
        self.kinds = record_kinds(self.sample()) if ds.features is None else None
        self.schema = ds.features.arrow_schema if self.kinds is None else kinds_schema(self.kinds)
        self.columns = list(self.schema.names)
        self.num_rows = None if self.is_streaming else len(ds)
        if self.is_streaming:
            info = getattr(ds, "info", None)
            splits = getattr(info, "splits", None) or {}
            if split in splits and splits[split].num_examples:
                self.num_rows = splits[split].num_examples

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"kind": "hf", "path": self.path, "split": self.split}
        if not self.is_streaming:
            ident["path"] = str(Path(self.path).resolve())
            ident["fingerprint"] = getattr(self.dataset, "_fingerprint", None)
            ident["num_rows"] = self.num_rows
        return ident

    def sample(self) -> list[dict[str, Any]]:
        if self.is_streaming:
            return list(self.dataset.take(NUM_SAMPLE_RECORDS))
        view = self.dataset.with_format("arrow")  # respects select()/shuffle() indices
        return view[:NUM_SAMPLE_RECORDS].to_pylist()

    def output_value(self, name: str, value: Any) -> Any:
        return value if self.kinds is None else fit_value(self.kinds.get(name), value)

    def iter_rows(self, selection: RowSelection) -> Iterator[Row]:
        if self.is_streaming:
            num_records = 0
            for index, record in enumerate(self.dataset):
                if selection.stop is not None and index >= selection.stop:
                    return
                num_records = index + 1
                if selection.contains(index):
                    yield Row(index, record)
            # The stream ran out: its length is known now, so the last (short) part can commit.
            self.num_rows = num_records
            return
        view = self.dataset.with_format("arrow")  # slices are memory-mapped arrow tables
        stop = self.num_rows if selection.stop is None else min(selection.stop, self.num_rows)
        for start in range(0, stop, BATCH_ROWS):
            end = min(start + BATCH_ROWS, stop)
            if not selection.overlaps(start, end):
                continue
            for index, record in enumerate(view[start:end].to_pylist(), start):
                if selection.contains(index):
                    yield Row(index, record)
