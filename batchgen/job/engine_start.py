"""Starting a job's engine: what the engine refuses at start is the user's settings or files,
so it becomes a JobConfigError (one line, exit 2), never a traceback."""
from __future__ import annotations

from typing import Any, Callable

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.recipe import PromptRenderer, PromptTemplateError


def default_make_engine(job: JobConfig):
    from batchgen.llm import LLM
    return LLM(model=job.model, device=job.device, dtype=job.dtype,
               max_model_len=job.max_model_len, max_num_seqs=job.max_num_seqs,
               max_num_batched_tokens=job.max_num_batched_tokens,
               gpu_memory_utilization=job.gpu_memory_utilization, tokenizer=job.tokenizer,
               seed=job.seed, load_format=job.load_format)


def start_engine(make_engine: Callable[[JobConfig], Any], job: JobConfig) -> tuple[Any, PromptRenderer]:
    """(the LLM, the job's prompt renderer over its tokenizer); JobConfigError on a refusal."""
    try:
        llm = make_engine(job)
    except JobConfigError:
        raise
    except (ValueError, OSError) as e:
        # A dtype, a max_model_len beyond the model's, no GPU for device cuda, a folder
        # without weights or tokenizer: a configuration error, on one line.
        raise JobConfigError(f"cannot start the engine: {' '.join(str(e).split())}") from None
    try:
        renderer = PromptRenderer(llm.tokenizer, prompt_column=job.prompt_column,
                                  template=job.template, system=job.system, chat=job.chat)
    except PromptTemplateError as e:
        raise JobConfigError(str(e)) from None
    return llm, renderer
