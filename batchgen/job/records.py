"""The output record of one finished row (a table row, or an OpenAI batch response line),
and the short kind of a row's error for the metrics."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from batchgen.job.config import JobConfig
from batchgen.job.openai_batch import response_line
from batchgen.job.reader import Reader
from batchgen.job.writer import OutputSchema, parse_json_columns

if TYPE_CHECKING:
    from batchgen.job.feeder import WorkItem

_ERROR_KINDS = ("malformed JSON", "blank line", "undecodable bytes", "not an object",
                "missing field", "is null", "not a string", "empty prompt", "prompt too long",
                "repeated custom_id", "prompt template", "chat template", "custom_id", "url",
                "method", "body", "n=", "outside the vocabulary")


class RecordMaker:
    """Builds each finished row's output record in the job's output schema."""

    def __init__(self, job: JobConfig, reader: Reader, schema: OutputSchema | None,
                 job_tag: str) -> None:
        self.job, self.reader, self.schema, self.job_tag = job, reader, schema, job_tag
        self.model_name = model_name(job)

    def make(self, item: "WorkItem", text: str | None, reason: str, num_prompt: int,
             num_output: int, error: str | None) -> dict:
        if self.schema is None:
            return response_line(row=item.row, job_tag=self.job_tag, request=item.request,
                                 custom_id=item.custom_id, model_name=self.model_name,
                                 text=text, finish_reason=reason, prompt_tokens=num_prompt,
                                 output_tokens=num_output, error=error)
        record = {"row": item.row}
        for column, name in self.schema.input_names.items():
            record[name] = self.reader.output_value(column, item.fields.get(column))
        record.update(text=text, finish_reason=reason, prompt_tokens=num_prompt,
                      output_tokens=num_output, error=error)
        if self.schema.parse_json:
            record.update(parse_json_columns(text, self.schema.parse_json))
        return record


def model_name(job: JobConfig) -> str:
    from batchgen.models.gguf import DEFAULT_MODEL_NAME
    return DEFAULT_MODEL_NAME if job.model is None else os.path.basename(job.model.rstrip("/"))


def error_kind(error: str) -> str:
    for kind in _ERROR_KINDS:
        if kind in error:
            return kind
    return "other"
