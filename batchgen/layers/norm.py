"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> normed x; with a residual: (norm(x + residual), x + residual)."""
        from batchgen.kernels import rms_norm as ops
        if residual is None:
            op = ops.rms_norm if x.is_cuda else ops.rms_norm_ref
            return op(x, self.weight, self.eps)
        fused = ops.fused_add_rms_norm if x.is_cuda else ops.fused_add_rms_norm_ref
        return fused(x, residual, self.weight, self.eps)
