"""The Llama MLP's gate/up projection with SwiGLU in its epilogue: silu(x @ W_gate.T) *
(x @ W_up.T), without writing the [T, 2 * I] projection to memory.

A persistent, warp-specialised Hopper GEMM: tensor-descriptor (TMA) loads, one program per SM
walking output tiles, two fp32 accumulators per tile (gate and up share the x tile). Under the
H200's power cap it runs 1.03-1.04x cuBLAS's matmul plus silu_and_mul from 1,024 to 16,384
tokens, and loses below ~1,000 (bench/gemm_probe.py, RESULTS.md); the MLP calls it from
MIN_TOKENS up. Without warp specialisation it ran 0.80-0.87x, as session 6's pointer-based,
one-program-a-tile version did (0.80-0.91x).
"""
from __future__ import annotations

import logging

import torch

from ._persistent_gemm import Config, check_tma_aligned, is_tma_aligned, launch
from ._triton import check_dtype, check_last_dim_contiguous, check_same_device, require_triton

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Fewer tokens than this: cuBLAS + silu_and_mul is faster (0.95x at 512, 0.97-0.99x at 256).
MIN_TOKENS = 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps): the H200's best under the cap
# (bench/results/2026-11-26-s13-gemm-silu*.json). A stage holds (BLOCK_M + 2 * BLOCK_N) *
# BLOCK_K inputs: 48 KiB in bf16.
DEFAULT_CONFIG: Config = (128, 128, 64, 16, 3, 8)


def gate_up_silu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # x: [T, H]; weight: [2 * I, H], gate rows first -> [T, I] (fp32 math, rounded once)
    intermediate = weight.shape[0] // 2
    gate = x.float() @ weight[:intermediate].float().T
    up = x.float() @ weight[intermediate:].float().T
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}


def supports(weight: torch.Tensor) -> bool:
    """True when gate_up_silu can take this gate/up weight on its GPU: Hopper or newer (TMA
    and warp specialisation), fp16/bf16, row-major, rows and the up half 16-byte aligned, and
    the kernel compiles and computes right there (tried once per device and dtype)."""
    if not weight.is_cuda or torch.cuda.get_device_capability(weight.device) < (9, 0):
        return False
    intermediate = weight.shape[0] // 2
    return (weight.dtype in (torch.float16, torch.bfloat16) and weight.shape[0] % 2 == 0
            and (intermediate * weight.element_size()) % 16 == 0
            and is_tma_aligned(weight[:intermediate], weight[intermediate:])
            and _works(weight.device, weight.dtype))


def _works(device: torch.device, dtype: torch.dtype) -> bool:
    # A Triton without warp specialisation on this GPU fails to compile here, not mid-job.
    # Sizes divisible by 16, as models' are: the variant compiled here is the one they run
    # (Triton specialises integer arguments on that); 144 leaves a partial column tile.
    device = torch.device("cuda", device.index if device.index is not None
                          else torch.cuda.current_device())
    if (device, dtype) not in _WORKS:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(200, 128, device=device, dtype=dtype, generator=gen)
        weight = (torch.randn(2 * 144, 128, device=device, generator=gen) / 16).to(dtype)
        try:
            out = gate_up_silu(x, weight).float()
            ref = gate_up_silu_ref(x, weight).float()
            works = bool(((out - ref).norm() <= 1e-2 * ref.norm()).item())
            if not works:
                log.warning("gate_up_silu computes wrong values on %s in %s: the MLPs keep "
                            "cuBLAS and silu_and_mul", device, dtype)
        except Exception as exc:  # noqa: BLE001 (any compile or launch error: fall back)
            log.warning("gate_up_silu does not run on %s in %s (%s: %s): the MLPs keep cuBLAS "
                        "and silu_and_mul", device, dtype, type(exc).__name__, exc)
            works = False
        _WORKS[(device, dtype)] = works
    return _WORKS[(device, dtype)]


def _check_args(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: want x [T, H] and weight [2 * I, H], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input features, x has "
                         f"{x.shape[1]}")
    if weight.shape[0] % 2 != 0:
        raise ValueError(f"{op}: weight must stack gate and up rows (an even count), got "
                         f"{weight.shape[0]} rows")
    check_dtype(op, "x", x, _DTYPES)
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: x and weight must share a dtype, got {x.dtype} and "
                         f"{weight.dtype}")
    check_last_dim_contiguous(op, x=x, weight=weight)
    check_same_device(op, x=x, weight=weight)
    intermediate = weight.shape[0] // 2
    check_tma_aligned(op, x=x, gate=weight[:intermediate], up=weight[intermediate:])
    if (intermediate * x.element_size()) % 16:
        raise ValueError(f"{op}: the output's rows ({intermediate} x {x.dtype}) must be a "
                         f"multiple of 16 bytes for its tensor descriptor")


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, config: Config | None = None,
                 num_programs: int | None = None, tail_split: int | None = None) -> torch.Tensor:
    """x: [T, H]; weight: [2 * I, H] (rows [0, I) gate, [I, 2I) up) -> [T, I].
    config: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps) instead of
    DEFAULT_CONFIG; num_programs: the persistent grid (default: one program per SM);
    tail_split: the last wave's column pieces (default: _persistent_gemm's choice)."""
    op = "gate_up_silu"
    require_triton(op)
    _check_args(op, x, weight)
    if config is not None and len(config) != 6:
        raise ValueError(f"{op}: config must be (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, "
                         f"num_stages, num_warps), got {config}")
    intermediate = weight.shape[0] // 2
    out = torch.empty((x.shape[0], intermediate), dtype=x.dtype, device=x.device)
    if x.shape[0]:
        launch(x, (weight[:intermediate], weight[intermediate:]), out, swiglu=True,
               add_to_out=False, config=config or DEFAULT_CONFIG, num_programs=num_programs,
               tail_split=tail_split)
    return out
