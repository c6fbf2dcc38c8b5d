"""Causal attention of a run of fresh prompts of one length (no cached keys), by torch's
scaled_dot_product_attention on [requests, heads, length, head_dim] views of the step's own q,
k and v: no copy in, no paged reads.

Why: on the H200 cuDNN's fused attention (a Hopper wgmma kernel) ran 1.45x batchgen's paged
Triton kernel on 15 x 1,024-token prompts, 381 against 262 TFLOP/s on these views. torch's
flash backend ran 0.9x and its ragged cuDNN path 80x slower (`bench/attention_backends.py`,
RESULTS.md, session 12), so only equal lengths come here; the paged kernels attend the rest."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_CUDNN_WORKS: dict[torch.device, bool] = {}


def cudnn_attention_works(device: torch.device) -> bool:
    """Whether cuDNN's fused attention runs on this device (tried once, on a tiny causal GQA
    problem; measured on Hopper only, so older GPUs keep the paged kernels)."""
    if device.type != "cuda":
        return False
    device = torch.device("cuda", device.index if device.index is not None
                          else torch.cuda.current_device())
    if device not in _CUDNN_WORKS:
        works = torch.cuda.get_device_capability(device) >= (9, 0)
        if works:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            q = torch.zeros(1, 4, 64, 64, device=device, dtype=torch.bfloat16)
            kv = torch.zeros(1, 2, 64, 64, device=device, dtype=torch.bfloat16)
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
                torch.cuda.synchronize(device)
            except RuntimeError:
                works = False
        _CUDNN_WORKS[device] = works
    return _CUDNN_WORKS[device]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           first_token: int, num_reqs: int, query_len: int,
                           scale: float) -> torch.Tensor:
    """q: [T, H, D], k and v: [T, KVH, D] (rotated; rows may be strided, head_dim contiguous);
    tokens first_token.. hold num_reqs prompts of query_len tokens each, every one attending
    only to itself, causally. -> [num_reqs * query_len, H * D], rows in token order. CUDA runs
    cuDNN's kernel (cudnn_attention_works must hold); the CPU, torch's reference math."""
    end = first_token + num_reqs * query_len
    num_heads, head_dim = q.shape[1], q.shape[2]

    def view(x: torch.Tensor) -> torch.Tensor:  # [n * L, heads, D] -> [n, heads, L, D]
        return x[first_token:end].view(num_reqs, query_len, x.shape[1], head_dim).transpose(1, 2)

    backend = contextlib.nullcontext()
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    with backend:
        out = F.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=True,
                                             scale=scale, enable_gqa=k.shape[1] != num_heads)
    # (cuDNN lays the output out as q's views: token-major, so this reshape copies nothing)
    return out.transpose(1, 2).reshape(num_reqs * query_len, num_heads * head_dim)
