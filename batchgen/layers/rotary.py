"""Rotary position embedding: one fp32 cos/sin table per model, indexed by position.

The table is [max_position, head_dim]: the first head_dim/2 columns are cos, the last sin
(the layout the `rotary_kv_write` kernel reads). Supported rope types: default, linear,
llama3, yarn. "dynamic" NTK rescales every position once a sequence grows past the trained
length, which a fixed table cannot express, so it is refused with a clear error.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a transformers config as one dict with at least rope_theta and
    rope_type. Reads transformers 5 `rope_parameters` or legacy `rope_theta` + `rope_scaling`."""
    params: dict[str, Any] = {}
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(legacy_scaling, dict):
        params.update(legacy_scaling)
    modern = getattr(hf_config, "rope_parameters", None)
    if isinstance(modern, dict):
        params.update(modern)
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    return params


def compute_inv_freq(params: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (fp32, CPU) and the cos/sin scale of a rope type."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    base = float(params["rope_theta"])
    # exponent: [head_dim / 2]
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (base ** exponent)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    return _yarn_inv_freq(base, head_dim, params)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    original_len = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(base: float, head_dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = float(params["factor"])
    original_len = float(params["original_max_position_embeddings"])
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def mscale(scale: float, coeff: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * coeff * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength makes `num_rotations` turns over the trained length.
        return head_dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int, attention_factor: float,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """[max_position, head_dim] fp32: cos in the first half of the columns, sin in the second."""
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    positions = torch.arange(max_position, device=device, dtype=torch.int64).to(torch.float32)
    # angles: [max_position, head_dim / 2]
    angles = torch.outer(positions, inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1) * attention_factor


class RotaryEmbedding(nn.Module):
    """The rope table (rotate-half / neox layout, as HF Llama) every attention layer reads:
    `Attention` rotates q and k by it as it stores the step's keys."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        # inv_freq: [head_dim / 2] fp32 on the CPU, the source of the table on any device.
        self.inv_freq, self.attention_factor = compute_inv_freq(params, head_dim)
        # Not in the state dict: derived from the config; reset_cache() rebuilds it after the
        # model leaves the meta device.
        cache = build_cos_sin_cache(
            self.inv_freq, max_position, self.attention_factor, torch.get_default_device())
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def reset_cache(self) -> None:
        """Recompute the table on its current device (after the model left the meta device)."""
        self.cos_sin_cache = build_cos_sin_cache(
            self.inv_freq, self.max_position, self.attention_factor, self.cos_sin_cache.device)
