"""RMSNorm (the residual add before it rides in the previous projection's matmul:
`Linear.add_to`)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> normed x
        from batchgen.kernels import rms_norm as ops
        op = ops.rms_norm if x.is_cuda else ops.rms_norm_ref
        return op(x, self.weight, self.eps)
