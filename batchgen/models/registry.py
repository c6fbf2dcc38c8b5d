"""Architecture name (config.json "architectures") -> the model class and its variant flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from batchgen.layers.context import ForwardContext
from batchgen.models.llama import LlamaForCausalLM


class CausalLM(Protocol):
    """What the model runner relies on."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 ctx: ForwardContext) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def can_fuse_mlp(self) -> bool: ...


@dataclass(frozen=True)
class ModelSpec:
    model_class: type[nn.Module]
    options: dict[str, Any] = field(default_factory=dict)


_ARCHITECTURES: dict[str, ModelSpec] = {
    "LlamaForCausalLM": ModelSpec(LlamaForCausalLM),
    "MistralForCausalLM": ModelSpec(LlamaForCausalLM),
    "Qwen2ForCausalLM": ModelSpec(LlamaForCausalLM, {"has_qkv_bias": True, "has_o_bias": False}),
    "Qwen3ForCausalLM": ModelSpec(LlamaForCausalLM, {"has_qk_norm": True}),
}
# For configs built in code (no "architectures" field).
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def architecture_of(hf_config: Any) -> str:
    architectures = getattr(hf_config, "architectures", None) or []
    if architectures:
        return architectures[0]
    model_type = getattr(hf_config, "model_type", None)
    return _MODEL_TYPES.get(model_type, f"<model_type {model_type!r}>")


def get_model_spec(hf_config: Any) -> ModelSpec:
    """The spec for the config's architecture; ValueError naming the supported ones if none."""
    name = architecture_of(hf_config)
    if name not in _ARCHITECTURES:
        raise ValueError(f"architecture {name} is not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}")
    return _ARCHITECTURES[name]


def attention_window(hf_config: Any) -> int | None:
    """The sliding window of a config whose layers (some or all) attend only to their last
    `sliding_window` positions: Mistral v0.1 (4,096), Qwen2/3 with use_sliding_window. None
    when every layer attends to the whole sequence. The engine's attention is full, which is
    exact only while sequences stay within the window."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", None) is False:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def create_model(hf_config: Any) -> nn.Module:
    """Build the model on the current default device (the loader uses meta)."""
    spec = get_model_spec(hf_config)
    return spec.model_class(hf_config, **spec.options)
