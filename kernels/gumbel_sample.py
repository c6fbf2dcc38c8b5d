"""Sampling by an exponential race with counter-based noise, fused: one pass over the logits.

For row r and token v, u = hash(keys[r], v) in (0, 1) and E = -log(u) ~ Exp(1); the drawn
token is argmax_v softmax(x)[v] / E[v] = argmax_v x[v] - log(E[v]) (no softmax needed). The
hash is 32-bit xor-shift / multiply mixing held in int64 (every product < 2^63), identical in
the kernel and the reference, so a (seed, position) draws the same token on any device.
The kernel cuts each row into vocabulary splits raced in parallel, then keeps the best of
their winners (the lowest token among equal scores, as torch.argmax)."""
from __future__ import annotations

import torch

from ._triton import check_dtype, jit, next_power_of_2, require_triton, tl, wait_for_inputs

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2^31: a 32-bit value times one stays below 2^63 in int64.
MIX_A = 0x7FEB352D
MIX_B = 0x5BD1E995
MIX_C = 0x2C1B3C6D
TOKEN_STRIDE = 0x9E3779B1  # golden-ratio step between the counters of adjacent tokens
POSITION_SALT = 0x27D4EB2F


def mix32_(x: torch.Tensor, num_rounds: int = 3) -> torch.Tensor:
    """A bijective mix of 32-bit values held in int64, in place."""
    for shift, multiplier in ((16, MIX_A), (15, MIX_B), (13, MIX_C))[:num_rounds]:
        x ^= x >> shift
        x.mul_(multiplier).bitwise_and_(MASK32)
    return x


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hash(seed, position) -> [R] int64 in [0, 2^32): the key of a row's noise. Cheap enough
    to compute on the host, where the seeds and positions are known."""
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    key = mix32_((positions * POSITION_SALT + 1) & MASK32)
    key = mix32_(key ^ high)
    key = mix32_(key ^ low)
    return key ^ (key >> 16)


def token_noise_ref(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """keys: [R] int64 in [0, 2^32) -> E: [R, V] fp32, i.i.d. Exp(1) across (key, token)."""
    v = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)
    x = ((v * TOKEN_STRIDE) & MASK32).unsqueeze(0) ^ keys.unsqueeze(1)
    x = mix32_(x)
    # The top 23 bits, centred in their cell: u in [2^-24, 1 - 2^-24], exact in fp32.
    x >>= 9
    u = x.to(torch.float32).add_(0.5).mul_(2.0 ** -23)
    return u.log_().neg_()


def gumbel_sample_ref(x: torch.Tensor, keys: torch.Tensor,
                      temperature: torch.Tensor | None = None) -> torch.Tensor:
    # x: [R, V] logits (masked tokens -inf); keys: [R]; temperature: [R] or None -> [R] int64
    x = x.float()
    if temperature is not None:
        x = x / temperature.float().unsqueeze(1)
    return (x - token_noise_ref(keys, x.shape[1]).log_()).argmax(dim=-1)


@jit(pdl=True, do_not_specialize=["num_splits", "split_size"])
def _gumbel_sample_kernel(x_ptr, keys_ptr, temperature_ptr, out_ptr, part_val_ptr, part_idx_ptr,
                          vocab_size, x_stride, num_splits, split_size,
                          HAS_TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # grid: (R, num_splits). A program races tokens split * split_size.. of its row; with one
    # split it writes the row's token, else its best (score, token) for _pick_split_kernel.
    # The hash in uint32, whose products wrap mod 2^32: the int64 "& MASK32" of the
    # reference, at a fraction of the cost of 64-bit multiplies.
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    temperature = 1.0
    if HAS_TEMPERATURE:
        temperature = tl.load(temperature_ptr + row)
    best_val = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.int32)
    row_ptr = x_ptr + row.to(tl.int64) * x_stride
    first = split * split_size
    last = tl.minimum(first + split_size, vocab_size)
    for start in range(first, last, BLOCK):
        v = start + tl.arange(0, BLOCK)
        mask = v < last
        logit = tl.load(row_ptr + v, mask=mask, other=float("-inf")).to(tl.float32)
        if temperature != 1.0:  # (x / 1 is x: the common case skips the division)
            # rounded as torch's division, so the reference draws the same token
            logit = tl.div_rn(logit, tl.full((BLOCK,), temperature, tl.float32))
        h = (v.to(tl.uint32) * tl.full((BLOCK,), 0x9E3779B1, tl.uint32)) ^ key
        h = h ^ (h >> 16)
        h = h * tl.full((BLOCK,), 0x7FEB352D, tl.uint32)
        h = h ^ (h >> 15)
        h = h * tl.full((BLOCK,), 0x5BD1E995, tl.uint32)
        h = h ^ (h >> 13)
        h = h * tl.full((BLOCK,), 0x2C1B3C6D, tl.uint32)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = logit - tl.log(-tl.log(u))
        # strictly greater: the first of equal scores wins, as torch.argmax
        is_better = score > best_val
        best_val = tl.where(is_better, score, best_val)
        best_idx = tl.where(is_better, v, best_idx)
    top = tl.max(best_val, axis=0)
    token = tl.min(tl.where(best_val == top, best_idx, vocab_size), axis=0)
    if num_splits == 1:
        tl.store(out_ptr + row, token.to(tl.int64))
    else:
        tl.store(part_val_ptr + row * num_splits + split, top)
        tl.store(part_idx_ptr + row * num_splits + split, token)


@jit(pdl=True, do_not_specialize=["num_splits"])
def _pick_split_kernel(part_val_ptr, part_idx_ptr, out_ptr, num_splits,
                       BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    # grid: (R,). The best of a row's splits; of equal scores the lowest token, as in one pass
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    is_split = splits < num_splits
    val = tl.load(part_val_ptr + row * num_splits + splits, mask=is_split, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * num_splits + splits, mask=is_split, other=2**30)
    top = tl.max(val, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(val == top, idx, 2**30), axis=0).to(tl.int64))


# Vocabulary splits a row: the race is compute-bound (a hash and two logs per token), and one
# program per row leaves the SMs short of warps. H200, bf16, 128,256 tokens, graph-timed
# (bench/kernel_sweep.py --only sample): 8 splits of 1,024-token blocks took 0.032 / 0.183 /
# 0.358 ms for 64 / 500 / 1,024 rows against 0.129 / 0.230 / 0.416 ms unsplit; 16 splits of
# 64 rows 0.030.
_NUM_SPLITS = 8


def choose_num_splits(vocab_size: int, block: int = 1024) -> int:
    """Vocabulary splits per row: _NUM_SPLITS, each of 4 blocks or more."""
    return max(1, min(_NUM_SPLITS, vocab_size // (4 * block)))


def gumbel_sample(x: torch.Tensor, keys: torch.Tensor,
                  temperature: torch.Tensor | None = None,
                  tuning: tuple[int, int, int | None] | None = None) -> torch.Tensor:
    """x: [R, V] fp32 / fp16 / bf16 logits (contiguous rows); keys: [R] int64; temperature:
    [R] fp32 > 0 or None (x is then divided by it in the kernel) -> [R] int64 token ids.
    tuning: (BLOCK, num_warps, splits or None: chosen) for bench/kernel_sweep.py."""
    require_triton("gumbel_sample")
    check_dtype("gumbel_sample", "x", x, (torch.float32, torch.float16, torch.bfloat16))
    check_dtype("gumbel_sample", "keys", keys, (torch.int64,))
    if x.dim() != 2 or x.stride(1) != 1 or keys.shape != (x.shape[0],):
        raise ValueError(f"gumbel_sample: x must be [R, V] with unit last stride and keys [R], "
                         f"got {tuple(x.shape)} / {tuple(keys.shape)}")
    if temperature is not None:
        check_dtype("gumbel_sample", "temperature", temperature, (torch.float32,))
        if temperature.shape != keys.shape:
            raise ValueError(f"gumbel_sample: temperature must be [R], got "
                             f"{tuple(temperature.shape)}")
    num_rows, vocab_size = x.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    if not num_rows:
        return out
    block, num_warps, num_splits = tuning or (1024, 4, None)
    if num_splits is None:
        num_splits = choose_num_splits(vocab_size, block)
    split_size = -(-vocab_size // (num_splits * block)) * block
    num_splits = -(-vocab_size // split_size)  # (no empty split)
    parts = (out, out)
    if num_splits > 1:
        parts = (torch.empty((num_rows, num_splits), dtype=torch.float32, device=x.device),
                 torch.empty((num_rows, num_splits), dtype=torch.int32, device=x.device))
    _gumbel_sample_kernel[(num_rows, num_splits)](
        x, keys, temperature if temperature is not None else keys, out, *parts, vocab_size,
        x.stride(0), num_splits, split_size, HAS_TEMPERATURE=temperature is not None,
        BLOCK=block, num_warps=num_warps)
    if num_splits > 1:
        _pick_split_kernel[(num_rows,)](*parts, out, num_splits,
                                        BLOCK_S=next_power_of_2(num_splits), num_warps=1)
    return out
