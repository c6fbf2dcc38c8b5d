"""Sampling by inverting the softmax's CDF with one counter-based uniform per row: two passes.

Row r draws u = ((keys[r] >> 8) + 0.5) / 2^24 in (0, 1), its key a hash of (seed, position)
(row_keys), and takes the first token v whose cumulative probability sum_{w <= v} softmax(x)[w]
exceeds u. Pass one cuts each row into vocabulary splits and gives every split its max and its
sum of exp(x - max), in parallel; pass two adds the splits up, finds the one the threshold
falls in and scans only that split. The work per token is one exp, where a race over the
whole vocabulary (Gumbel-max) needs a hash and two logs per token: the pass is bound by
reading the logits, not by the SMs.

A token of probability 0 (a -inf logit: top-k, top-p, min-p) is never drawn. The kernel and
the reference add the probabilities in different orders, so they may draw neighbouring
tokens when u falls within rounding (~1e-7 of the row's mass) of a CDF step; elsewhere they
draw the same token, on any device."""
from __future__ import annotations

import math

import torch

from ._triton import check_dtype, jit, next_power_of_2, require_triton, tl, wait_for_inputs

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2^31: a 32-bit value times one stays below 2^63 in int64.
MIX_A = 0x7FEB352D
MIX_B = 0x5BD1E995
MIX_C = 0x2C1B3C6D
POSITION_SALT = 0x27D4EB2F
BLOCK = 1024
BLOCKS_PER_SPLIT = 4  # pass two scans one split: 4 blocks of one row


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values held in int64, in place."""
    for shift, multiplier in ((16, MIX_A), (15, MIX_B), (13, MIX_C)):
        x ^= x >> shift
        x.mul_(multiplier).bitwise_and_(MASK32)
    return x


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hash(seed, position) -> [R] int64 in [0, 2^32): the key of a row's draw. Cheap enough
    to compute on the host, where the seeds and positions are known."""
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    key = mix32_((positions * POSITION_SALT + 1) & MASK32)
    key = mix32_(key ^ high)
    key = mix32_(key ^ low)
    return key ^ (key >> 16)


def row_uniforms(keys: torch.Tensor) -> torch.Tensor:
    """keys: [R] int64 in [0, 2^32) -> u: [R] fp32 in [2^-25, 1 - 2^-25], the top 24 bits of
    the key centred in their cell (exact in fp32)."""
    return ((keys >> 8).to(torch.float32) + 0.5) * 2.0 ** -24


def cdf_sample_ref(x: torch.Tensor, keys: torch.Tensor,
                   temperature: torch.Tensor | None = None) -> torch.Tensor:
    # x: [R, V] logits (masked tokens -inf); keys: [R]; temperature: [R] or None -> [R] int64
    x = x.float()
    if temperature is not None:
        x = x / temperature.float().unsqueeze(1)
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    probs = torch.exp(x - top)
    cdf = probs.double().cumsum(dim=-1)
    threshold = row_uniforms(keys).double().to(x.device) * cdf[:, -1]
    token = torch.searchsorted(cdf, threshold.unsqueeze(1), right=True).squeeze(1)
    # past the end (u within rounding of 1, or no token of mass): the last token of mass
    vocab = torch.arange(x.shape[1], device=x.device)
    last = torch.where(probs > 0, vocab, 0).amax(dim=-1)
    return torch.minimum(token, last)


@jit(pdl=True, do_not_specialize=["split_size"])
def _split_mass_kernel(x_ptr, temperature_ptr, part_max_ptr, part_sum_ptr, vocab_size,
                       x_stride, split_size, HAS_TEMPERATURE: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    # grid: (R, splits). Split s of row r: its max of x * log2(e) and its sum of
    # 2^(x * log2(e) - max), online over its blocks.
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    temperature = 1.0
    if HAS_TEMPERATURE:
        temperature = tl.load(temperature_ptr + row)
    row_ptr = x_ptr + row.to(tl.int64) * x_stride
    first = split * split_size
    last = tl.minimum(first + split_size, vocab_size)
    top = float("-inf")
    mass = 0.0
    for start in range(first, last, BLOCK):
        v = start + tl.arange(0, BLOCK)
        y = _scaled_logits(row_ptr, v, v < last, temperature, BLOCK)
        new_top = tl.maximum(top, tl.max(y, axis=0))
        base = tl.where(new_top == float("-inf"), 0.0, new_top)  # (-inf - -inf is nan)
        mass = mass * tl.exp2(top - base) + tl.sum(tl.exp2(y - base), axis=0)
        top = new_top
    tl.store(part_max_ptr + row * num_splits + split, top)
    tl.store(part_sum_ptr + row * num_splits + split, mass)


@jit
def _scaled_logits(row_ptr, v, mask, temperature, BLOCK: tl.constexpr):
    # x / temperature * log2(e), fp32; masked lanes -inf. The division rounds as torch's.
    x = tl.load(row_ptr + v, mask=mask, other=float("-inf")).to(tl.float32)
    if temperature != 1.0:  # (x / 1 is x: the common case skips the division)
        x = tl.div_rn(x, tl.full((BLOCK,), temperature, tl.float32))
    return x * 1.4426950408889634


@jit(pdl=True, do_not_specialize=["split_size", "num_splits"])
def _pick_token_kernel(x_ptr, keys_ptr, temperature_ptr, part_max_ptr, part_sum_ptr, out_ptr,
                       vocab_size, x_stride, split_size, num_splits,
                       HAS_TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    # grid: (R,). The splits' masses give the split where the row's CDF passes u * total;
    # a scan of that split alone gives the token.
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    is_split = splits < num_splits
    part_max = tl.load(part_max_ptr + row * num_splits + splits, mask=is_split,
                       other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + row * num_splits + splits, mask=is_split, other=0.0)
    top = tl.max(part_max, axis=0)
    base = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(part_sum > 0, part_sum * tl.exp2(part_max - base), 0.0)
    key = tl.load(keys_ptr + row)
    u = ((key >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    threshold = u * tl.sum(weight, axis=0)
    cum = tl.cumsum(weight, axis=0)
    # the first split whose cumulative mass passes the threshold, else the last with mass
    last_split = tl.max(tl.where(weight > 0, splits, 0), axis=0)
    chosen = tl.minimum(tl.sum((cum <= threshold).to(tl.int32), axis=0), last_split)
    threshold -= tl.sum(tl.where(splits < chosen, weight, 0.0), axis=0)
    temperature = 1.0
    if HAS_TEMPERATURE:
        temperature = tl.load(temperature_ptr + row)
    row_ptr = x_ptr + row.to(tl.int64) * x_stride
    first = chosen * split_size
    last = tl.minimum(first + split_size, vocab_size)
    running = 0.0
    token = vocab_size
    last_with_mass = first
    for start in range(first, last, BLOCK):
        v = start + tl.arange(0, BLOCK)
        p = tl.exp2(_scaled_logits(row_ptr, v, v < last, temperature, BLOCK) - base)
        passed = (running + tl.cumsum(p, axis=0)) > threshold
        token = tl.minimum(token, tl.min(tl.where(passed, v, vocab_size), axis=0))
        last_with_mass = tl.maximum(last_with_mass, tl.max(tl.where(p > 0, v, -1), axis=0))
        running += tl.sum(p, axis=0)
    token = tl.where(token == vocab_size, last_with_mass, token)
    tl.store(out_ptr + row, token.to(tl.int64))


def num_splits_for(vocab_size: int, split_size: int = BLOCK * BLOCKS_PER_SPLIT) -> int:
    return max(1, math.ceil(vocab_size / split_size))


def cdf_sample(x: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor | None = None,
               split_blocks: int = BLOCKS_PER_SPLIT) -> torch.Tensor:
    """x: [R, V] fp32 / fp16 / bf16 logits (contiguous rows); keys: [R] int64 (row_keys);
    temperature: [R] fp32 > 0 or None (x is then divided by it in the kernel) -> [R] int64
    token ids. split_blocks: 1,024-token blocks a split holds (bench/kernel_sweep.py)."""
    require_triton("cdf_sample")
    check_dtype("cdf_sample", "x", x, (torch.float32, torch.float16, torch.bfloat16))
    check_dtype("cdf_sample", "keys", keys, (torch.int64,))
    if x.dim() != 2 or x.stride(1) != 1 or keys.shape != (x.shape[0],):
        raise ValueError(f"cdf_sample: x must be [R, V] with unit last stride and keys [R], "
                         f"got {tuple(x.shape)} / {tuple(keys.shape)}")
    if temperature is not None:
        check_dtype("cdf_sample", "temperature", temperature, (torch.float32,))
        if temperature.shape != keys.shape:
            raise ValueError(f"cdf_sample: temperature must be [R], got "
                             f"{tuple(temperature.shape)}")
    num_rows, vocab_size = x.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    if not num_rows:
        return out
    split_size = BLOCK * split_blocks
    num_splits = num_splits_for(vocab_size, split_size)
    part_max = torch.empty((num_rows, num_splits), dtype=torch.float32, device=x.device)
    part_sum = torch.empty_like(part_max)
    temp = temperature if temperature is not None else part_max  # (unread)
    common = dict(HAS_TEMPERATURE=temperature is not None, BLOCK=BLOCK, num_warps=4)
    _split_mass_kernel[(num_rows, num_splits)](x, temp, part_max, part_sum, vocab_size,
                                               x.stride(0), split_size, **common)
    _pick_token_kernel[(num_rows,)](x, keys, temp, part_max, part_sum, out, vocab_size,
                                    x.stride(0), split_size, num_splits,
                                    BLOCK_S=max(2, next_power_of_2(num_splits)), **common)
    return out
