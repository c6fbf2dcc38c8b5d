"""The reader interface: `Row(index, fields)` and the `Reader` base every input format
implements (`jsonl_reader`, `parquet_reader`, `hf_dataset_reader`; `input_format` picks one).

Every reader streams: JSONL line by line, Parquet by row group in small batches (row groups
outside the selection are never read), datasets by slices or as a stream. `Row.index` is the
0-based input record index; for JSONL every line is a record, so a blank or malformed line
is a Row with `error` set (the job writes it as an error row and goes on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from batchgen.job.row_selection import RowSelection

NUM_SAMPLE_RECORDS = 100  # records Reader.sample returns
BATCH_ROWS = 1024


@dataclass
class Row:
    index: int
    fields: dict[str, Any]
    error: str | None = None  # the record itself is unreadable


class Reader:
    """Base: `columns` (input column names), `schema` (their arrow types), `num_rows`
    (None when unknown until the end), `iter_rows(selection)`, `sample()`."""
    columns: list[str]
    schema: pa.Schema
    num_rows: int | None

    def iter_rows(self, selection: RowSelection) -> Iterator[Row]:
        raise NotImplementedError

    def sample(self) -> list[dict[str, Any]]:
        """Up to NUM_SAMPLE_RECORDS readable records from the start (for column checks)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the job fingerprint records about the input."""
        raise NotImplementedError

    def output_value(self, name: str, value: Any) -> Any:
        """`value` of input column `name` as stored in the parts (fits `schema`)."""
        return value
