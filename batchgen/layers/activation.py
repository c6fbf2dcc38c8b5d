"""SwiGLU: silu(gate) * up over the two halves of the fused gate_up projection."""
from __future__ import annotations

import torch
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * intermediate] -> [T, intermediate]
        from batchgen.kernels import silu_and_mul as ops
        return ops.silu_and_mul(x) if x.is_cuda else ops.silu_and_mul_ref(x)
