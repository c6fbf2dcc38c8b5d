"""The persistent, warp-specialised Hopper GEMM behind gate_up_silu and matmul_add: x @ W.T
with an epilogue (SwiGLU of two weights, or an add into the output), tensor-descriptor (TMA)
loads and one program per SM walking the output tiles.

The tail wave. A step's tiles rarely divide into whole waves of the SMs: 448 tiles of 128 x 128
at a decode step's 512 rows leave the fourth wave 52 tiles on 132 SMs, so 80 idle for a
quarter of the GEMM. With TAIL_SPLIT = s the tiles past the last whole wave are cut into s
column pieces of BLOCK_N / s, spread over the idle SMs: that wave takes ~1/s of its time.
"""
from __future__ import annotations

import torch

from ._triton import jit, tl, triton

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps)
Config = tuple[int, int, int, int, int, int]

# The narrowest tail piece: a tensor-core tile of fewer columns wastes more than it saves.
MIN_TAIL_COLUMNS = 32
MAX_TAIL_SPLIT = 4


@jit
def _tile_coords(tile, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    # GROUP_M row tiles walk down one column of output tiles before moving right: programs
    # running together share weight tiles, and a group's x rows stay in L2 across its columns.
    per_group = GROUP_M * num_n_tiles
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)  # the last group is short
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@jit
def _gemm_tile(x_desc, w_desc, w2_desc, out_desc, row, col, k_tiles, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr,
               ADD_TO_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # out[row:+BLOCK_M, col:+BLOCK_N] = epilogue(x @ w.T [, x @ w2.T]); the descriptors clip:
    # rows and columns past the ends load as zeros and are not stored.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_tiles):
        x = x_desc.load([row, k * BLOCK_K])
        acc = tl.dot(x, w_desc.load([col, k * BLOCK_K]).T, acc, input_precision=DOT_PRECISION)
        if SWIGLU:  # gate and up share the x tile
            acc2 = tl.dot(x, w2_desc.load([col, k * BLOCK_K]).T, acc2,
                          input_precision=DOT_PRECISION)
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    if ADD_TO_OUT:  # rounded once, as cuBLAS's beta = 1
        acc += out_desc.load([row, col]).to(tl.float32)
    out_desc.store([row, col], acc.to(out_desc.dtype))


@jit(do_not_specialize=["num_tokens", "num_programs", "num_full_tiles"])
def _persistent_gemm_kernel(x_desc, w_desc, w2_desc, out_desc, w_tail_desc, w2_tail_desc,
                            out_tail_desc, num_tokens, out_features, in_features, num_programs,
                            num_full_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                            TAIL_SPLIT: tl.constexpr, SWIGLU: tl.constexpr,
                            ADD_TO_OUT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    # grid: (num_programs,), each program taking every num_programs-th tile (a runtime value:
    # a small model's step sizes give it many values, none a new variant). Tiles from
    # num_full_tiles on are cut into TAIL_SPLIT pieces (*_tail_desc: BLOCK_N / TAIL_SPLIT wide).
    num_m_tiles = tl.cdiv(num_tokens, BLOCK_M)
    num_n_tiles = tl.cdiv(out_features, BLOCK_N)
    k_tiles = tl.cdiv(in_features, BLOCK_K)
    pid = tl.program_id(0)
    for tile in tl.range(pid, num_full_tiles, num_programs, warp_specialize=WARP_SPECIALIZE):
        m_tile, n_tile = _tile_coords(tile, num_m_tiles, num_n_tiles, GROUP_M)
        _gemm_tile(x_desc, w_desc, w2_desc, out_desc, m_tile * BLOCK_M, n_tile * BLOCK_N,
                   k_tiles, BLOCK_M, BLOCK_N, BLOCK_K, SWIGLU, ADD_TO_OUT, DOT_PRECISION)
    if TAIL_SPLIT > 1:
        num_pieces = (num_m_tiles * num_n_tiles - num_full_tiles) * TAIL_SPLIT
        for piece in tl.range(pid, num_pieces, num_programs, warp_specialize=WARP_SPECIALIZE):
            m_tile, n_tile = _tile_coords(num_full_tiles + piece // TAIL_SPLIT, num_m_tiles,
                                          num_n_tiles, GROUP_M)
            col = n_tile * BLOCK_N + (piece % TAIL_SPLIT) * (BLOCK_N // TAIL_SPLIT)
            _gemm_tile(x_desc, w_tail_desc, w2_tail_desc, out_tail_desc, m_tile * BLOCK_M, col,
                       k_tiles, BLOCK_M, BLOCK_N // TAIL_SPLIT, BLOCK_K, SWIGLU, ADD_TO_OUT,
                       DOT_PRECISION)


def is_tma_aligned(*tensors: torch.Tensor) -> bool:
    """True when tensor descriptors can take these 2-D tensors: rows contiguous, row strides
    and bases 16-byte aligned."""
    return all(t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in tensors)


def check_tma_aligned(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not is_tma_aligned(t):
            raise ValueError(f"{op}: tensor descriptors need 16-byte aligned rows and bases; "
                             f"got {name} {tuple(t.shape)} strides {t.stride()} ({t.dtype})")


def choose_tail_split(num_tiles: int, num_programs: int, block_n: int) -> int:
    """How many column pieces the tiles past the last whole wave are cut into: the most (up to
    MAX_TAIL_SPLIT) whose pieces still fit one wave, each at least MIN_TAIL_COLUMNS wide."""
    tail = num_tiles % num_programs
    split = 1
    while (tail and split < MAX_TAIL_SPLIT and 2 * split * tail <= num_programs
           and block_n // (2 * split) >= MIN_TAIL_COLUMNS):
        split *= 2
    return split


def launch(x: torch.Tensor, weights: tuple[torch.Tensor, ...], out: torch.Tensor, *,
           swiglu: bool, add_to_out: bool, config: Config, num_programs: int | None,
           tail_split: int | None) -> None:
    """out[T, N] (=, or += with add_to_out) x[T, K] @ weights[0].T, or with swiglu
    silu(x @ weights[0].T) * (x @ weights[1].T); weights [N, K] each. The caller checks the
    arguments; num_programs: the persistent grid (default: one program per SM); tail_split:
    instead of choose_tail_split's."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_tokens, in_features = x.shape
    out_features = out.shape[1]
    block_m, block_n, block_k, group_m, num_stages, num_warps = config
    num_tiles = triton.cdiv(num_tokens, block_m) * triton.cdiv(out_features, block_n)
    if num_programs is None:
        num_programs = (torch.cuda.get_device_properties(x.device).multi_processor_count
                        if x.is_cuda else 4)
    num_programs = max(1, num_programs)
    if tail_split is None:
        tail_split = choose_tail_split(num_tiles, num_programs, block_n)
    if tail_split not in (1, 2, 4) or block_n % tail_split:
        raise ValueError(f"tail_split must be 1, 2 or 4 and divide BLOCK_N {block_n}, got "
                         f"{tail_split}")
    num_full_tiles = num_tiles - (num_tiles % num_programs if tail_split > 1 else 0)
    num_programs = min(num_programs, max(num_full_tiles, (num_tiles - num_full_tiles) * tail_split))

    def desc(t: torch.Tensor, block: list[int]):
        return TensorDescriptor.from_tensor(t, block)

    w2 = weights[-1]
    tail_n = block_n // tail_split
    _persistent_gemm_kernel[(num_programs,)](
        desc(x, [block_m, block_k]), desc(weights[0], [block_n, block_k]),
        desc(w2, [block_n, block_k]), desc(out, [block_m, block_n]),
        desc(weights[0], [tail_n, block_k]), desc(w2, [tail_n, block_k]),
        desc(out, [block_m, tail_n]),
        num_tokens, out_features, in_features, num_programs, num_full_tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        TAIL_SPLIT=tail_split, SWIGLU=swiglu, ADD_TO_OUT=add_to_out,
        WARP_SPECIALIZE=x.is_cuda, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
