"""prepare_job: open the input, check the prompt columns and the model, build the job record
(fingerprint included) — every configuration mistake is found here, before any work."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from batchgen.job import checkpoint as ckpt
from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.fingerprint import fingerprint, fingerprint_fields, model_identity
from batchgen.job.input_format import open_reader
from batchgen.job.jsonl_reader import JsonlReader
from batchgen.job.reader import Reader
from batchgen.job.writer import OutputSchema
from batchgen.recipe import template_variables


@dataclass
class PreparedJob:
    """Everything checked before any work: the reader, output schema and job record."""
    job: JobConfig
    reader: Reader
    schema: OutputSchema | None  # None: OpenAI batch output lines
    record: ckpt.JobRecord


# An OpenAI batch job's prompts are its request lines' messages or prompt, and its parts are
# OpenAI batch output lines: these options would be silently ignored.
_NOT_FOR_OPENAI_BATCH = {"prompt_column": "--prompt-column", "template": "--template",
                         "system": "--system", "chat": "--chat/--no-chat", "keep": "--keep",
                         "parse_json": "parse_json"}


def is_openai_sample(records: list[dict[str, Any]]) -> bool:
    return bool(records) and all("custom_id" in r and "body" in r for r in records[:10])


def prepare_job(job: JobConfig) -> PreparedJob:
    """Open the input and check the columns and the model; JobConfigError on a mistake."""
    model = model_identity(job.model)
    reader = open_reader(job)
    sample = reader.sample()
    if job.input_format == "auto" and isinstance(reader, JsonlReader) and is_openai_sample(sample):
        job = dataclasses.replace(job, input_format="openai")
    if job.is_openai_batch:
        given = [flag for name, flag in _NOT_FOR_OPENAI_BATCH.items()
                 if getattr(job, name) is not None]
        if given:
            raise JobConfigError(f"{job.input} holds OpenAI batch request lines, which carry "
                                 f"their own prompts and give OpenAI batch output lines: "
                                 f"{', '.join(given)} would be ignored; leave "
                                 f"{'it' if len(given) == 1 else 'them'} out")
        if not any("custom_id" in r for r in sample):
            raise JobConfigError(f"{job.input}: no OpenAI batch request lines (custom_id, body) "
                                 "in its first records")
        schema = None
    else:
        _check_prompt_columns(job, reader)
        try:
            schema = OutputSchema(reader.schema, job.keep, job.parse_json, job.keep_source)
        except ValueError as e:
            raise JobConfigError(str(e)) from None
    fields = fingerprint_fields(job, model, reader.identity())
    record = ckpt.JobRecord(fingerprint(fields), fields, job.rows_per_part, job.output_format,
                            reader.num_rows, job.is_openai_batch)
    return PreparedJob(job, reader, schema, record)


def _check_prompt_columns(job: JobConfig, reader: Reader) -> None:
    if isinstance(reader, JsonlReader) and not reader.columns:
        # No record to take the columns from (a Parquet file has its schema even when empty).
        what = "no rows" if reader.num_rows == 0 else \
            f"no record with any field ({reader.num_rows} lines, all blank, malformed or {{}})"
        raise JobConfigError(f"input {job.input} has {what}")
    where = "the records" if isinstance(reader, JsonlReader) else "the schema"
    columns = ", ".join(reader.columns) or "none"
    if job.template is not None:
        missing = sorted(template_variables(job.template) - set(reader.columns))
        if missing:
            raise JobConfigError(f"the template uses {', '.join(missing)}, not in {where} "
                                 f"of {job.input} (columns: {columns})")
        return
    column = job.prompt_column or "prompt"
    if column not in reader.columns:
        hint = "" if job.prompt_column else " (pass --prompt-column or --template)"
        raise JobConfigError(f"prompt column {column!r} is not in {where} of {job.input} "
                             f"(columns: {columns}){hint}")
