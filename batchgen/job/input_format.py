"""The input's format (from the path, or as given) and the reader that opens it."""
from __future__ import annotations

from pathlib import Path

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.hf_dataset_reader import HFDatasetReader
from batchgen.job.jsonl_reader import JsonlReader
from batchgen.job.parquet_reader import ParquetReader, parquet_files
from batchgen.job.reader import Reader


def open_reader(job: JobConfig) -> Reader:
    path = job.input
    kind = job.input_format
    if kind in ("auto", "openai"):
        kind = detect_format(path) if kind == "auto" else "jsonl"
    if kind == "jsonl":
        return JsonlReader(path)
    if kind == "parquet":
        return ParquetReader(path, split=job.split)
    if kind == "hf":
        return HFDatasetReader(path, split=job.split)
    raise JobConfigError(f"cannot read input {path}")


def detect_format(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() \
                or (p / "dataset_dict.json").is_file():
            return "hf"
        if any(parquet_files(p)):
            return "parquet"
        raise JobConfigError(f"input folder {path} holds no .parquet files and no saved dataset")
    if not p.exists():
        return "hf"  # a hub dataset id (config validation let it through)
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".gz")):
        return "jsonl"
    raise JobConfigError(f"cannot tell the format of {path}; pass --input-format")
