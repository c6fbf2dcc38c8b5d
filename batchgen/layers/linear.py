"""Linear layers: plain, and fused ones that hold several HF projections in one matmul.

QKVLinear keeps q_proj, k_proj and v_proj as row blocks of one weight
[(H + 2 * KVH) * D, hidden]; MergedLinear keeps gate_proj and up_proj as [2 * I, hidden].
Each HF tensor is copied into its block by `load_shard`, so the fused weight never exists
twice in memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """param <- loaded (dtype/device converted on the fly), refusing a shape mismatch."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"weight {name}: checkpoint shape {tuple(loaded.shape)} != model shape "
            f"{tuple(param.shape)} (config does not match the checkpoint?)")
    with torch.no_grad():
        param.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_features] -> [T, out_features]
        return F.linear(x, self.weight, self.bias)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += this layer of x, in place (returned). The add rides in the matmul's epilogue
        (beta = 1), rounded once, instead of a pass that reads the product and `out` again."""
        # x: [T, in_features]; out: [T, out_features]
        out.addmm_(x, self.weight.t())
        if self.bias is not None:
            out.add_(self.bias)
        return out


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim; shard i is the
    i-th output block."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        # offsets: start row of each shard
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def shard_ids(self) -> list[int | str]:
        return list(range(len(self.output_sizes)))

    def shard_range(self, shard_id: int | str) -> tuple[int, int]:
        assert isinstance(shard_id, int), shard_id
        return self.offsets[shard_id], self.output_sizes[shard_id]

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard_id: int | str) -> None:
        """Copy one HF projection (`param_name` is "weight" or "bias") into its row block."""
        param = getattr(self, param_name)
        if param is None:
            raise ValueError(f"checkpoint has a {param_name} for a layer built without one")
        start, size = self.shard_range(shard_id)
        copy_checked(param.narrow(0, start, size), loaded, f"{param_name}[{shard_id}]")


class QKVLinear(MergedLinear):
    """q, k and v projections in one matmul; shards "q", "k", "v"."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def shard_ids(self) -> list[int | str]:
        return ["q", "k", "v"]

    def shard_range(self, shard_id: int | str) -> tuple[int, int]:
        index = "qkv".index(shard_id)
        return self.offsets[index], self.output_sizes[index]

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # qkv: [T, q_size + 2 * kv_size] -> views q [T, q_size], k, v [T, kv_size]
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
