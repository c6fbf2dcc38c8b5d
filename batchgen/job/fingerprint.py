"""The job fingerprint: everything that changes what the parts contain, hashed; a run whose
fingerprint differs from the output folder's `_job.json` is a different job."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.sampling_params import SamplingParams

# SamplingParams fields that are numbers with a float default: `temperature: 0` (a YAML int)
# and `--temperature 0` (a float) are one setting, so one fingerprint.
_FLOAT_SAMPLING_FIELDS = frozenset(
    name for name, f in SamplingParams.__dataclass_fields__.items() if isinstance(f.default, float))


def model_identity(model: str | None) -> dict[str, Any]:
    """What identifies the model in the fingerprint; raises JobConfigError for an unknown one."""
    from batchgen.models.gguf import DEFAULT_MODEL_NAME, default_gguf_path
    if model is None:
        try:
            gguf = default_gguf_path()
        except FileNotFoundError as e:
            raise JobConfigError(str(e)) from None
        return {"default": DEFAULT_MODEL_NAME, "file": gguf.name, "size": gguf.stat().st_size}
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise JobConfigError(f"model folder {model} has no config.json")
        return {"path": str(path.resolve()),
                "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()[:16]}
    if path.is_file() and path.suffix == ".gguf":
        return {"path": str(path.resolve()), "size": path.stat().st_size}
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(model, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return {"hub_id": model, "config_sha256":
                hashlib.sha256(Path(cached).read_bytes()).hexdigest()[:16]}
    raise JobConfigError(f"unknown model {model!r}: not a local folder with config.json, "
                         "a .gguf file, or a model in the Hugging Face cache")


def fingerprint_fields(job: JobConfig, model: dict[str, Any],
                       input_identity: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes what the parts contain (not --limit, shards, engine sizes)."""
    return {
        "model": model, "input": input_identity, "input_format": job.input_format,
        "split": job.split, "prompt_column": job.prompt_column, "template": job.template,
        "system": job.system, "chat": job.chat,
        "sampling": {k: _normalised(k, job.sampling[k]) for k in sorted(job.sampling)
                     if k != "seed"},
        "max_tokens": job.sampling_params().max_tokens, "seed": job.seed,
        "rows_per_part": job.rows_per_part, "format": job.output_format, "keep": job.keep,
        "parse_json": job.parse_json, "load_format": job.load_format,
        "dtype": job.dtype, "max_model_len": job.max_model_len, "tokenizer": job.tokenizer,
    }


def _normalised(name: str, value: Any) -> Any:
    if name in _FLOAT_SAMPLING_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def fingerprint(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
