"""`batchgen export`: a job's committed parts as one `.jsonl` or `.parquet` file in input order
(written atomically); JSONL parts are converted for Parquet."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job.config import JobConfigError
from batchgen.job.status import load_job_record
from batchgen.job.strict_json import json_text
from batchgen.job.verification import verify_job
from batchgen.job.writer import OutputSchema, list_parts, read_part

EXPORT_SUFFIXES = (".jsonl", ".parquet")


def export_job(out_dir: Path, file: Path, *, allow_partial: bool = False) -> int:
    """Write the committed parts of `out_dir` as one file in input order (atomically):
    `.jsonl`, or `.parquet` (JSONL parts are converted). Returns the exit code; a mistake in
    the arguments raises JobConfigError."""
    out_dir, file = Path(out_dir), Path(file)
    _check_export_target(out_dir, file)
    record = load_job_record(out_dir)
    if file.suffix.lower() == ".parquet" and record.is_openai_batch:
        raise JobConfigError(f"{out_dir} is an OpenAI batch job: its output is the OpenAI batch "
                             f"output file, so export it as .jsonl, not {file.name}")
    # The columns batchgen itself writes have known types, even where a part holds only nulls.
    known = OutputSchema(pa.schema([]), [], record.fields.get("parse_json")).arrow
    report = verify_job(out_dir)
    if report.problems or (report.gaps and not allow_partial):
        what = report.problems[:3] or report.gaps[:3]
        print(f"batchgen: export: the job is {'damaged' if report.problems else 'incomplete'} "
              f"({'; '.join(what)}); run `batchgen verify {out_dir}`"
              + ("" if report.problems else " or pass --partial"), file=sys.stderr)
        return 1
    parts = [path for _, path in sorted(list_parts(out_dir).items())]
    if not parts and not report.is_ok:
        raise JobConfigError(f"{out_dir} has no committed parts to export yet")
    # No parts and nothing missing: a finished job over an empty input; its export is an
    # empty file (batchgen's own columns for Parquet), as `vllm run-batch` gives.
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        if not parts:
            num_rows = _export_empty(tmp, known, as_parquet=file.suffix.lower() == ".parquet")
        elif file.suffix.lower() == ".parquet":
            num_rows = _export_parquet(parts, tmp, known)
        else:
            num_rows = _export_jsonl(parts, tmp)
        os.replace(tmp, file)
    except OSError as e:
        raise JobConfigError(f"cannot write {file}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"batchgen: wrote {num_rows} rows from {len(parts)} parts to {file}", file=sys.stderr)
    return 0


def _check_export_target(out_dir: Path, file: Path) -> None:
    if file.is_dir():
        raise JobConfigError(f"{file} is a folder; export writes one file "
                             f"(a name ending in {' or '.join(EXPORT_SUFFIXES)})")
    if file.suffix.lower() not in EXPORT_SUFFIXES:
        raise JobConfigError(f"cannot export as {file.name}: the file name must end in "
                             f"{' or '.join(EXPORT_SUFFIXES)}")
    # Readers of the job folder (pandas, DuckDB, `batchgen` itself) would see its rows twice.
    job_dir = out_dir.resolve()
    if job_dir in file.resolve().parents:
        raise JobConfigError(f"{file} is inside the job folder {out_dir}, where it would be "
                             "read as more output; write it elsewhere")


def _export_empty(tmp: Path, known: pa.Schema, *, as_parquet: bool) -> int:
    if as_parquet:
        pq.write_table(known.empty_table(), tmp, compression="zstd")
    else:
        tmp.write_bytes(b"")
    return 0


def _export_jsonl(parts: list[Path], tmp: Path) -> int:
    num_rows = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in parts:
            for record in read_part(path):
                f.write(json_text(record))  # parts written before NaN became null too
                f.write("\n")
                num_rows += 1
        f.flush()
        os.fsync(f.fileno())
    return num_rows


def _export_parquet(parts: list[Path], tmp: Path, known: pa.Schema) -> int:
    """Parquet parts are copied; JSONL parts are typed by arrow's inference, unified over all
    parts first (a column that is null throughout one part takes its type from the others),
    and batchgen's own columns take their `known` types."""
    schema = None
    if any(path.suffix != ".parquet" for path in parts):
        inferred = pa.unify_schemas([_part_table(path).schema for path in parts],
                                    promote_options="permissive")
        schema = pa.schema([known.field(f.name) if f.name in known.names else f
                            for f in inferred])
    num_rows = 0
    with pq.ParquetWriter(tmp, schema or pq.read_schema(parts[0]), compression="zstd") as writer:
        for path in parts:
            table = _part_table(path)
            if schema is not None:
                table = _cast(table, schema, path)
            writer.write_table(table)
            num_rows += table.num_rows
    return num_rows


def _part_table(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    try:
        return pa.Table.from_pylist(read_part(path))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise JobConfigError(f"{path.name} cannot be converted to Parquet ({e}); "
                             "export as .jsonl") from None


def _cast(table: pa.Table, schema: pa.Schema, path: Path) -> pa.Table:
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise JobConfigError(f"{path.name} cannot be converted to Parquet ({e}); "
                             "export as .jsonl") from None
