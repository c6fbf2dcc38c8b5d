"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flat varlen token batch.

Parameter names follow the HF checkpoints except for two fused projections:
q_proj/k_proj/v_proj -> self_attn.qkv_proj and gate_proj/up_proj -> mlp.gate_up_proj.
Variants: Qwen2 has a q/k/v bias; Qwen3 RMS-normalises each q and k head before rope.
Sliding-window attention (Mistral v0.1, some Qwen2) is not applied: attention is full."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from batchgen.layers.activation import SiluAndMul
from batchgen.layers.attention import Attention
from batchgen.layers.context import ForwardContext
from batchgen.layers.embedding import VocabEmbedding
from batchgen.layers.linear import Linear, MergedLinear, QKVLinear, copy_checked
from batchgen.layers.norm import RMSNorm
from batchgen.layers.rotary import RotaryEmbedding, rope_parameters

# (HF projection name, our fused module name, shard id)
_FUSED_PROJECTIONS = (
    ("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1),
)
# Checkpoint tensors derived from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)
        self.act_fn = SiluAndMul()

    def can_fuse(self) -> bool:
        """True when forward(fused=True) can run here (batchgen.kernels.gate_up_silu)."""
        from batchgen.kernels import gate_up_silu
        return self.gate_up_proj.bias is None and gate_up_silu.supports(self.gate_up_proj.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                fused: bool = False) -> torch.Tensor:
        # x: [T, hidden] -> gate_up [T, 2 * I] -> [T, I] -> added into residual [T, hidden];
        # fused: the [T, 2 * I] projection never reaches memory.
        if fused:
            from batchgen.kernels import gate_up_silu as ops
            fn = ops.gate_up_silu if x.is_cuda else ops.gate_up_silu_ref
            return self.down_proj.add_to(fn(x, self.gate_up_proj.weight), residual)
        return self.down_proj.add_to(self.act_fn(self.gate_up_proj(x)), residual)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding,
                 has_qkv_bias: bool, has_o_bias: bool, has_qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVLinear(config.hidden_size, self.num_heads, self.num_kv_heads,
                                  self.head_dim, has_qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, has_o_bias)
        self.has_qk_norm = has_qk_norm
        if has_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5, layer_idx, rotary_emb)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        # hidden: [T, hidden] normed input -> the attention output added into residual
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        # q: [T, H, D]; k, v: [T, KVH, D] (views into the fused output, rows contiguous)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        start = 0
        for piece in self.attn(positions, q, k, v, ctx):  # consecutive rows [n, H * D]
            self.o_proj.add_to(piece, residual[start:start + piece.shape[0]])
            start += piece.shape[0]
        return residual


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding,
                 has_qkv_bias: bool, has_o_bias: bool, has_qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, has_qkv_bias,
                                        has_o_bias, has_qk_norm)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size,
                            bool(getattr(config, "mlp_bias", False)))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, residual: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        # residual: [T, hidden], the residual stream: each block's output projection adds
        # into it in place, so no norm reads a block's output and the stream apart.
        self.self_attn(positions, self.input_layernorm(residual), residual, ctx)
        return self.mlp(self.post_attention_layernorm(residual), residual, ctx.fused_mlp)


class LlamaModel(nn.Module):
    def __init__(self, config: Any, has_qkv_bias: bool, has_o_bias: bool,
                 has_qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                          rope_parameters(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, self.rotary_emb, has_qkv_bias, has_o_bias, has_qk_norm)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        residual = self.embed_tokens(input_ids)  # a fresh tensor: the layers add into it
        for layer in self.layers:
            residual = layer(positions, residual, ctx)
        return self.norm(residual)


class LlamaForCausalLM(nn.Module):
    """The model contract: forward -> hidden [T, hidden]; compute_logits -> [N, vocab]."""

    def __init__(self, config: Any, *, has_qkv_bias: bool | None = None,
                 has_o_bias: bool | None = None, has_qk_norm: bool = False) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.config = config
        self.model = LlamaModel(
            config,
            attention_bias if has_qkv_bias is None else has_qkv_bias,
            attention_bias if has_o_bias is None else has_o_bias,
            has_qk_norm)
        self.is_tied = bool(getattr(config, "tie_word_embeddings", False))
        # Tied: the logits reuse embed_tokens.weight (no second parameter to keep in sync).
        self.lm_head = None if self.is_tied else Linear(config.hidden_size, config.vocab_size)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size]
        return self.model(input_ids, positions, ctx)

    def can_fuse_mlp(self) -> bool:
        """True when every layer's MLP can run fused (ForwardContext.fused_mlp)."""
        return all(layer.mlp.can_fuse() for layer in self.model.layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] -> [N, vocab] in the model dtype
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def reset_buffers(self) -> None:
        """Rebuild derived (non-saved) buffers on the current device."""
        self.model.rotary_emb.reset_cache()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the parameters, one at a time; every parameter (and
        every shard of a fused one) must be loaded exactly once from known names."""
        params = dict(self.named_parameters())
        expected = set()
        for name, module in self.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                shards = module.shard_ids() if isinstance(module, MergedLinear) else [None]
                expected.update((full, shard) for shard in shards)
        loaded: set[tuple[str, Any]] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (self.is_tied and name == "lm_head.weight"):
                continue
            target = self._load_one(name, tensor, params)
            if target is None:
                unexpected.append(name)
            else:
                loaded.add(target)
        missing = sorted(f"{n}" + (f"[{s}]" if s is not None else "") for n, s in expected - loaded)
        if unexpected or missing:
            raise ValueError(
                f"checkpoint does not match {type(self).__name__} for {self.config.model_type!r}: "
                f"{len(missing)} missing weight(s) {missing[:5]}, {len(unexpected)} unexpected "
                f"weight(s) {unexpected[:5]}")

    def _load_one(self, name: str, tensor: torch.Tensor,
                  params: dict[str, nn.Parameter]) -> tuple[str, Any] | None:
        module_path, _, param_name = name.rpartition(".")
        for hf_proj, fused, shard in _FUSED_PROJECTIONS:
            if module_path.endswith("." + hf_proj):
                fused_path = module_path[: -len(hf_proj)] + fused
                try:
                    module = self.get_submodule(fused_path)
                except AttributeError:
                    return None
                if getattr(module, param_name, None) is None:
                    return None
                module.load_shard(param_name, tensor, shard)
                return f"{fused_path}.{param_name}", shard
        if name not in params:
            return None
        copy_checked(params[name], tensor, name)
        return name, None
