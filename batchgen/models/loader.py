"""Find a model, read its config / tokenizer / generation defaults, and load its weights.

Weights go straight from safetensors (memory-mapped, tensor by tensor, dtype converted on
the fly) into parameters that were allocated once, empty, on the target device: the model
never exists twice in host memory. Pickle checkpoints (.bin/.pt) are refused."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from batchgen.layers.norm import RMSNorm
from batchgen.models import gguf
from batchgen.models.registry import CausalLM, create_model

_REMOTE_SCHEMES = ("s3://", "gs://", "http://", "https://", "hf://")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                    "max_new_tokens": "max_tokens"}
DUMMY_INIT_STD = 0.02


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A local safetensors folder for `model`: None (the embedded default), a folder with
    config.json, a .gguf file (converted once), or a hub id already in the local HF cache."""
    if model is None:
        return gguf.default_model_path()
    text = str(model)
    if text.startswith(_REMOTE_SCHEMES):
        raise ValueError(f"model {text!r}: remote URLs are not supported; "
                         "download the model and pass its local folder")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf.converted_gguf_path(path)
        raise ValueError(f"model file {path}: only .gguf files or model folders are supported")
    if _is_hub_id(text):
        return _cached_hub_snapshot(text)
    raise FileNotFoundError(f"model {text!r}: no such folder or file")


def _is_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def _cached_hub_snapshot(repo_id: str, needs_config: bool = True) -> Path:
    from huggingface_hub import snapshot_download
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, invalid id, ...: all mean "not cached"
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and batchgen never "
            f"downloads: run `huggingface-cli download {repo_id}` first, or pass a local "
            f"folder") from e
    if needs_config and not (path / "config.json").is_file():
        raise FileNotFoundError(f"cached snapshot of {repo_id!r} at {path} has no config.json")
    return path


def load_hf_config(path: str | os.PathLike) -> Any:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def _read_generation_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def load_generation_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """Sampling defaults from generation_config.json, in SamplingParams names (only those set)."""
    raw = _read_generation_config(path)
    return {ours: raw[theirs] for theirs, ours in _GENERATION_KEYS.items()
            if raw.get(theirs) is not None}


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def load_eos_token_ids(path: str | os.PathLike, hf_config: Any) -> tuple[int, ...]:
    """EOS ids of config.json and generation_config.json, merged in order without repeats."""
    ids = _as_ids(getattr(hf_config, "eos_token_id", None))
    ids += _as_ids(_read_generation_config(path).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The fast tokenizer of a local folder, or of a hub id already in the local HF cache."""
    from transformers import AutoTokenizer
    text = str(path)
    if not Path(text).expanduser().is_dir() and _is_hub_id(text):
        path = _cached_hub_snapshot(text, needs_config=False)
    return AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=False,
                                         local_files_only=True)


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files (sharded via the index, else every *.safetensors)."""
    path = Path(path)
    index = path / _SAFETENSORS_INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    # Mistral repos also ship consolidated.safetensors (other names, same weights): skip it.
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}); batchgen loads "
            "safetensors only (pickle can run code): convert with transformers' "
            "save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"{path} has no *.safetensors weights")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, memory-mapped: one tensor materialised at a time."""
    from safetensors import safe_open
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(model_path: Path, hf_config: Any, *, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", seed: int = 0) -> CausalLM:
    """Build the model for `hf_config` on `device` in `dtype`, weights from `model_path`
    ("auto") or seeded random ("dummy": nothing read but the config)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    device = torch.device(device)
    files = safetensors_files(model_path) if load_format == "auto" else []
    with torch.device("meta"):
        model = create_model(hf_config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.reset_buffers()
    with torch.no_grad():
        if load_format == "dummy":
            init_dummy_weights(model, seed)
        else:
            model.load_weights(iter_safetensors(files))
    return model.eval().requires_grad_(False)


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 0.02) weights, zero biases, unit norms, generated on the model's device."""
    params = list(model.named_parameters())
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for name, param in params:
            if id(param) in norm_weights:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, DUMMY_INIT_STD, generator=generator)
