"""The hardware floor of a workload (BENCHMARKS.md): counted, not guessed.

    compute = [2 · P_layers · (prompt tokens not served from the prefix cache + output tokens)
             + 2 · V · H · (one sampled position per prompt + output tokens)
             + 4 · L · H · (keys attended, summed over every computed token, causal)] / matmul rate
    memory  = Σ over decode steps of (W + kv · context tokens read) / copy bandwidth
    floor   = max(compute, memory)

Counting conventions (they reproduce BENCHMARKS.md's H200 table within 1%):
- A request's computed positions run from its first uncached prompt token to prompt + output - 1
  (the output tokens are counted as inputs, as the formula says); position p attends p + 1 keys.
- The LM head runs once per prompt (its last position) and once per output token.
- Prefix caching is counted at the engine's block granularity: a prompt's full blocks whose
  chained content an earlier prompt already had are not computed (reviews: the shared 256 tokens
  of every request but the first). At least the prompt's last token is always computed.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from shapes import Shape

Request = tuple[list[int], int]


@dataclass(frozen=True)
class Ceilings:
    matmul_flops_per_s: float  # bf16 dense matmul rate
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written

    def __post_init__(self) -> None:
        if self.matmul_flops_per_s <= 0 or self.copy_bytes_per_s <= 0:
            raise ValueError(f"ceilings must be positive, got {self}")


# BENCHMARKS.md's H200 (2026-11-25): the ceilings its floor table was counted with.
H200_CEILINGS = Ceilings(780e12, 4.26e12)
H200_MEMORY_BYTES = 139 * 2**30
H200_KV_FRACTION = 0.92


@dataclass
class Floor:
    compute_s: float
    memory_s: float
    num_flops: float
    num_bytes: float
    num_computed_tokens: int  # prompt tokens not cached + output tokens
    num_cached_prompt_tokens: int
    num_keys_attended: int
    num_decode_steps: int
    peak_batch: int  # the most requests decoding in one step of the simulation

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    def seconds_at(self, ceilings: Ceilings) -> float:
        """The same work's floor at other ceilings (e.g. BENCHMARKS.md's, H200_CEILINGS)."""
        return max(self.num_flops / ceilings.matmul_flops_per_s,
                   self.num_bytes / ceilings.copy_bytes_per_s)

    @property
    def bound_by(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def as_dict(self) -> dict:
        return {"floor_s": self.seconds, "bound_by": self.bound_by, "compute_s": self.compute_s,
                "memory_s": self.memory_s, "num_flops": self.num_flops,
                "num_bytes": self.num_bytes, "num_computed_tokens": self.num_computed_tokens,
                "num_cached_prompt_tokens": self.num_cached_prompt_tokens,
                "num_keys_attended": self.num_keys_attended,
                "num_decode_steps": self.num_decode_steps, "peak_batch": self.peak_batch}


def kv_pool_tokens_for(shape: Shape, memory_bytes: int = H200_MEMORY_BYTES,
                       fraction: float = H200_KV_FRACTION) -> int:
    """KV pool size when `fraction` of the device memory, less the weights, holds KV."""
    return int((memory_bytes * fraction - shape.weight_bytes) // shape.kv_bytes_per_token)


def count_cached_prompt_tokens(prompts: list[list[int]], block_size: int = 16) -> list[int]:
    """Per prompt (in order), how many leading tokens the prefix cache serves: full blocks whose
    chained content (the whole prefix up to the block's end) an earlier prompt also had."""
    seen: set = set()
    cached = []
    for prompt in prompts:
        num_hit, parent, is_hitting = 0, None, True
        for start in range(0, len(prompt) - block_size + 1, block_size):
            key = (parent, tuple(prompt[start:start + block_size]))
            key_hash = hash(key)
            if is_hitting and key_hash in seen:
                num_hit += block_size
            else:
                is_hitting = False
                seen.add(key_hash)
            parent = key_hash
        cached.append(min(num_hit, len(prompt) - 1))
    return cached


def _sum_range(lo: int, hi: int) -> int:
    """lo + (lo + 1) + ... + hi (0 when hi < lo)."""
    return (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0


def count_compute(shape: Shape, requests: list[Request], cached: list[int]) -> tuple[float, int, int]:
    """(flops, computed tokens, keys attended) of the whole workload."""
    num_tokens = num_keys = num_sampled = 0
    for (prompt, num_out), num_cached in zip(requests, cached):
        last = len(prompt) + num_out - 1  # last computed position
        num_tokens += last + 1 - num_cached
        num_keys += _sum_range(num_cached + 1, last + 1)  # position p attends p + 1 keys
        num_sampled += 1 + num_out
    h, layers = shape.hidden_size, shape.num_layers
    flops = (2 * shape.num_layer_params * num_tokens + 2 * shape.vocab_size * h * num_sampled
             + 4 * layers * h * num_keys)
    return float(flops), num_tokens, num_keys


def simulate_decode_bytes(shape: Shape, requests: list[Request], cached: list[int],
                          kv_pool_tokens: int, max_num_seqs: int) -> tuple[float, int, int]:
    """(bytes read, decode steps, peak batch) of an ideal continuous-batching run.

    Assumptions (all in the floor's favour, none beyond what the engine could do):
    - Requests are admitted first come, first served, in the given order (the engine's order),
      while fewer than `max_num_seqs` run and the pool holds the request's final length
      (prompt less its cached tokens, plus all its outputs): reserved up front, so nothing is
      ever preempted. Cached prefix tokens are held once, for the whole run.
    - A request's prompt and first output token cost no decode step (they are compute); it
      decodes from the step it is admitted in. Output j >= 1 reads prompt + j context tokens.
    - Each step reads all weights once plus the KV of every decoding request's context.
    """
    pool = kv_pool_tokens - max(cached, default=0)
    need = [len(p) - c + n for (p, n), c in zip(requests, cached)]
    if need and max(need) > pool:
        raise ValueError(f"a request needs {max(need)} KV tokens; the pool holds {pool}")
    finish: list[tuple[int, int]] = []  # heap of (step after which it is done, request index)
    num_held = num_running = total_context = 0
    num_bytes = 0
    step = peak = nxt = 0
    while nxt < len(requests) or finish:
        while nxt < len(requests) and num_running < max_num_seqs and num_held + need[nxt] <= pool:
            prompt_len, num_out = len(requests[nxt][0]), requests[nxt][1]
            num_held += need[nxt]
            if num_out > 1:
                heapq.heappush(finish, (step + num_out - 1, nxt))
                num_running += 1
                total_context += prompt_len + 1
            else:
                num_held -= need[nxt]
            nxt += 1
        if not finish:
            continue
        peak = max(peak, num_running)
        num_bytes += shape.weight_bytes + shape.kv_bytes_per_token * total_context
        total_context += num_running
        step += 1
        while finish and finish[0][0] == step:
            _, i = heapq.heappop(finish)
            total_context -= len(requests[i][0]) + requests[i][1]
            num_held -= need[i]
            num_running -= 1
    return float(num_bytes), step, peak


def compute_floor(shape: Shape, requests: list[Request], ceilings: Ceilings,
                  kv_pool_tokens: int | None = None, max_num_seqs: int = 1024,
                  block_size: int = 16) -> Floor:
    """The floor of running `requests` (prompt ids, output length) on `shape`; the KV pool
    defaults to BENCHMARKS.md's H200 one (92% of 139 GiB less the weights)."""
    if kv_pool_tokens is None:
        kv_pool_tokens = kv_pool_tokens_for(shape)
    cached = count_cached_prompt_tokens([p for p, _ in requests], block_size)
    flops, num_tokens, num_keys = count_compute(shape, requests, cached)
    num_bytes, num_steps, peak = simulate_decode_bytes(
        shape, requests, cached, kv_pool_tokens, max_num_seqs)
    return Floor(compute_s=flops / ceilings.matmul_flops_per_s,
                 memory_s=num_bytes / ceilings.copy_bytes_per_s, num_flops=flops,
                 num_bytes=num_bytes, num_computed_tokens=num_tokens,
                 num_cached_prompt_tokens=sum(cached), num_keys_attended=num_keys,
                 num_decode_steps=num_steps, peak_batch=peak)


def measure_ceilings(device, dtype, matmul_size: int = 8192, copy_bytes: int = 2 * 2**30,
                     num_iters: int = 10, sustained_s: float = 0.0):
    """Measured (Ceilings, details): the median rate of `num_iters` timed `torch.matmul`s of two
    random [matmul_size]^2 matrices, and of a `copy_bytes` device-to-device copy counted as
    bytes read + written. CUDA events on the GPU, perf_counter on the CPU (small sizes there).

    The burst rate, on purpose: BENCHMARKS.md's floors and bar were counted with it (780
    TFLOP/s on the H200). After 0.5 s of the same matmuls the H200 sustains only ~660-675
    TFLOP/s (its power limit, measured 2026-11-25), so a long compute-bound workload cannot
    reach the burst floor, and measuring the sustained rate instead would flatter every
    fraction of the floor by ~15%.

    sustained_s > 0: the same matmuls back to back for that long as well, after as long again
    to reach the power limit; their rate goes in details as `sustained_matmul_tflops`, what a
    compute-bound run can get at most on this machine (a figure beside the floor, not one)."""
    import statistics
    import time

    import torch

    is_cuda = torch.device(device).type == "cuda"

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(num_iters):
            if is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype, generator=gen)
    matmul_s = timed(lambda: torch.matmul(a, b))
    sustained_tflops = None
    if sustained_s > 0:
        sustained_tflops = 2 * matmul_size**3 / _sustained_seconds_per_call(
            lambda: torch.matmul(a, b), sustained_s, is_cuda) / 1e12
    del a, b
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    del src, dst
    if is_cuda:
        torch.cuda.empty_cache()
    ceilings = Ceilings(2 * matmul_size**3 / matmul_s, 2 * copy_bytes / copy_s)
    details = {"matmul_size": matmul_size, "matmul_median_s": matmul_s,
               "copy_bytes": copy_bytes, "copy_median_s": copy_s,
               "matmul_tflops": ceilings.matmul_flops_per_s / 1e12,
               "copy_tb_per_s": ceilings.copy_bytes_per_s / 1e12,
               "sustained_matmul_tflops": sustained_tflops}
    return ceilings, details


def _sustained_seconds_per_call(fn, seconds: float, is_cuda: bool,
                                warm_seconds: float | None = None) -> float:
    """fn's time per call once the device has run it `warm_seconds` (default: `seconds`; its
    power limit reached), over calls run back to back for `seconds` more."""
    import time

    import torch

    def run_for(duration: float) -> tuple[int, float]:
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            for _ in range(8):  # a batch of launches between host clock reads
                fn()
            calls += 8
            if is_cuda:  # keep the queue short, so the clock measures the device
                torch.cuda.synchronize()
        return calls, time.perf_counter() - t0

    run_for(seconds if warm_seconds is None else warm_seconds)
    calls, elapsed = run_for(seconds)
    return elapsed / calls
