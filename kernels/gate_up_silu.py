"""The Llama MLP's gate/up projection with SwiGLU in its epilogue: silu(x @ W_gate.T) *
(x @ W_up.T), without writing the [T, 2 * I] projection to memory.

A persistent, warp-specialised Hopper GEMM: tensor-descriptor (TMA) loads, one program per SM
walking output tiles, two fp32 accumulators per tile (gate and up share the x tile). Under the
H200's power cap it runs 1.03-1.04x cuBLAS's matmul plus silu_and_mul from 1,024 to 16,384
tokens, and loses where its last wave of tiles runs part-empty (bench/gemm_silu_probe.py,
RESULTS.md); the engine calls it where `pays_off`. Without warp specialisation it ran
0.80-0.87x, as session 6's pointer-based, one-program-a-tile version did (0.80-0.91x).
"""
from __future__ import annotations

import logging

import torch

from ._triton import (check_dtype, check_last_dim_contiguous, check_same_device, jit,
                      require_triton, tl, triton)

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Where the kernel beats cuBLAS + silu_and_mul (pays_off): MIN_TOKENS or more (0.99x at 256),
# its output tiles filling their waves over the SMs to MIN_WAVE_FILL or more. Graph-timed
# under the cap (RESULTS.md, session 14), fused against unfused:
#   llama3-8b (448 / 672 / 784 / 896 tiles at 512 / 768 / 832-896 / 960-1024 rows, on 132
#   SMs 85% / 85% / 99% / 97% of their waves): 0.95x / 1.00x / 1.11x / 1.01-1.05x;
#   llama-1b (256 / 384 / 512 tiles at 512 / 768 / 1024 rows, 97%): 1.06x / 1.08x / 1.09x.
MIN_TOKENS = 512
MIN_WAVE_FILL = 0.9
# Launched one by one rather than from a CUDA graph, a call also costs the host tens of
# microseconds (four tensor descriptors and Triton's launch), more than cuBLAS's: steps that
# small are often host-bound. From this many tokens the kernel's own time (>= 0.11 ms at
# llama-1b's size) hides it, as session 13 measured end to end.
MIN_EAGER_TOKENS = 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps): the H200's best under the cap
# (bench/results/2026-11-26-s13-gemm-silu*.json). A stage holds (BLOCK_M + 2 * BLOCK_N) *
# BLOCK_K inputs: 48 KiB in bf16.
Config = tuple[int, int, int, int, int, int]
DEFAULT_CONFIG: Config = (128, 128, 64, 16, 3, 8)


def pays_off(num_tokens: int, intermediate: int, num_sms: int, eager: bool) -> bool:
    """True when a [num_tokens, H] x [2 * intermediate, H] step runs faster fused than by
    cuBLAS and silu_and_mul on a GPU of num_sms SMs, launched from a CUDA graph or (eager)
    not (see MIN_TOKENS)."""
    if num_tokens < (MIN_EAGER_TOKENS if eager else MIN_TOKENS):
        return False
    block_m, block_n = DEFAULT_CONFIG[:2]
    num_tiles = -(-num_tokens // block_m) * -(-intermediate // block_n)
    waves = -(-num_tiles // num_sms)
    return num_tiles >= MIN_WAVE_FILL * waves * num_sms


def gate_up_silu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # x: [T, H]; weight: [2 * I, H], gate rows first -> [T, I] (fp32 math, rounded once)
    intermediate = weight.shape[0] // 2
    gate = x.float() @ weight[:intermediate].float().T
    up = x.float() @ weight[intermediate:].float().T
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@jit
def _tile_coords(tile, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    # GROUP_M row tiles walk down one column of output tiles before moving right: programs
    # running together share weight tiles, and a group's x rows stay in L2 across its columns.
    per_group = GROUP_M * num_n_tiles
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)  # the last group is short
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@jit(do_not_specialize=["num_tokens", "num_programs"])
def _gate_up_silu_kernel(x_desc, gate_desc, up_desc, out_desc, num_tokens, intermediate, hidden,
                         num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # grid: (num_programs,), each program taking every num_programs-th output tile (a
    # runtime value: a small model's step sizes give it many values, none a new variant). The
    # descriptors clip: rows past num_tokens and columns past intermediate load as zeros and
    # are not stored.
    num_m_tiles = tl.cdiv(num_tokens, BLOCK_M)
    num_n_tiles = tl.cdiv(intermediate, BLOCK_N)
    k_tiles = tl.cdiv(hidden, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m_tiles * num_n_tiles, num_programs,
                         warp_specialize=WARP_SPECIALIZE):
        m_tile, n_tile = _tile_coords(tile, num_m_tiles, num_n_tiles, GROUP_M)
        row, col = m_tile * BLOCK_M, n_tile * BLOCK_N
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            x = x_desc.load([row, k * BLOCK_K])
            acc_gate = tl.dot(x, gate_desc.load([col, k * BLOCK_K]).T, acc_gate,
                              input_precision=DOT_PRECISION)
            acc_up = tl.dot(x, up_desc.load([col, k * BLOCK_K]).T, acc_up,
                            input_precision=DOT_PRECISION)
        out = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        out_desc.store([row, col], out.to(out_desc.dtype))


_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}


def supports(weight: torch.Tensor) -> bool:
    """True when gate_up_silu can take this gate/up weight on its GPU: Hopper or newer (TMA
    and warp specialisation), fp16/bf16, row-major, rows and the up half 16-byte aligned, and
    the kernel compiles and computes right there (tried once per device and dtype)."""
    if not weight.is_cuda or torch.cuda.get_device_capability(weight.device) < (9, 0):
        return False
    return (weight.dtype in (torch.float16, torch.bfloat16) and _fits_descriptors(weight)
            and _works(weight.device, weight.dtype))


def _fits_descriptors(weight: torch.Tensor, x: torch.Tensor | None = None) -> bool:
    # Tensor descriptors: rows contiguous, row strides and bases (the up half's too) 16-byte
    # aligned, and so the [T, I] output's rows.
    elem = weight.element_size()
    intermediate = weight.shape[0] // 2
    return (weight.shape[0] % 2 == 0 and (intermediate * elem) % 16 == 0
            and all(t.stride(-1) == 1 and (t.stride(0) * elem) % 16 == 0
                    and t.data_ptr() % 16 == 0
                    for t in (weight, weight[intermediate:], *(() if x is None else (x,)))))


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
    if not _fits_descriptors(weight, x):
        raise ValueError(f"{op}: tensor descriptors need 16-byte aligned rows and bases; "
                         f"got x {tuple(x.shape)} stride {x.stride(0)}, weight "
                         f"{tuple(weight.shape)} stride {weight.stride(0)} ({x.dtype})")


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, config: Config | None = None,
                 num_programs: int | None = None) -> torch.Tensor:
    """x: [T, H]; weight: [2 * I, H] (rows [0, I) gate, [I, 2I) up) -> [T, I].
    config: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps) instead of
    DEFAULT_CONFIG; num_programs: the persistent grid (default: one program per SM)."""
    op = "gate_up_silu"
    require_triton(op)
    _check_args(op, x, weight)
    if config is not None and len(config) != 6:
        raise ValueError(f"{op}: config must be (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, "
                         f"num_stages, num_warps), got {config}")
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_tokens, hidden = x.shape
    intermediate = weight.shape[0] // 2
    out = torch.empty((num_tokens, intermediate), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block_m, block_n, block_k, group_m, num_stages, num_warps = config or DEFAULT_CONFIG
    num_tiles = triton.cdiv(num_tokens, block_m) * triton.cdiv(intermediate, block_n)
    if num_programs is None:
        num_programs = (torch.cuda.get_device_properties(x.device).multi_processor_count
                        if x.is_cuda else 4)
    num_programs = max(1, min(num_programs, num_tiles))
    _gate_up_silu_kernel[(num_programs,)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight[:intermediate], [block_n, block_k]),
        TensorDescriptor.from_tensor(weight[intermediate:], [block_n, block_k]),
        TensorDescriptor.from_tensor(out, [block_m, block_n]),
        num_tokens, intermediate, hidden, num_programs, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=group_m, WARP_SPECIALIZE=x.is_cuda,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    return out
