"""Model shapes for speed runs: real architectures, random weights (BENCHMARKS.md's table).

A Shape knows its parameter counts (for the floor) and writes the Hugging Face config.json
that `LLM(model=folder, load_format="dummy")` and `AutoModelForCausalLM.from_config` build from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Shape:
    name: str
    architecture: str  # "LlamaForCausalLM" | "Qwen3ForCausalLM"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    dtype: str = "bfloat16"
    max_position_embeddings: int = 8192
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            raise ValueError(f"{self.name}: unknown architecture {self.architecture!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads must be a multiple of num_kv_heads")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"{self.name}: dtype must be one of {sorted(_DTYPE_BYTES)}")

    @property
    def is_qwen3(self) -> bool:
        return self.architecture == "Qwen3ForCausalLM"

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def num_layer_params(self) -> int:
        """P_layers: the decoder layers only (q, k, v, o; gate, up, down; the two RMSNorms and,
        for Qwen3, the per-head q/k norms). No embedding, no LM head, no final norm."""
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o; k, v
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h + (2 * d if self.is_qwen3 else 0)
        return self.num_layers * (attention + mlp + norms)

    @property
    def num_params(self) -> int:
        """Everything: layers, the (untied) embedding and LM head, the final norm."""
        return self.num_layer_params + 2 * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        """W: bytes of all weights, read once per decode step."""
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token: 2 · layers · kv_heads · head_dim · dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def hf_config(self) -> dict:
        """config.json content (the legacy rope_theta / rope_scaling keys, as on the Hub)."""
        config = {
            "architectures": [self.architecture],
            "model_type": "qwen3" if self.is_qwen3 else "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "torch_dtype": self.dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": 0.02,
        }
        if not self.is_qwen3:
            config["mlp_bias"] = False
        config.update(self.extra)
        return config

    def write_config(self, folder: str | Path) -> Path:
        """Writes config.json into `folder` (created) and returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.hf_config(), indent=2))
        return folder


_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, Shape] = {
    "llama3-8b": Shape(
        name="llama3-8b", architecture="LlamaForCausalLM", hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_SCALING),
    # Llama-3.2-1B's shape, untied: its heads are 64 wide (2048 / 32).
    "llama-1b": Shape(
        name="llama-1b", architecture="LlamaForCausalLM", hidden_size=2048,
        intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        vocab_size=128256, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE_SCALING, "factor": 32.0}),
    "qwen3-8b": Shape(
        name="qwen3-8b", architecture="Qwen3ForCausalLM", hidden_size=4096,
        intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6),
    # CPU smoke runs only: two layers, fp32.
    "tiny": Shape(
        name="tiny", architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512,
        rope_theta=10000.0, dtype="float32"),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    return SHAPES[name]
