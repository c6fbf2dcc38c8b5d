"""The benchmark workloads, drawn exactly as BENCHMARKS.md says so every engine sees the same
requests, and vLLM's numbers on them (the bar).

Each workload draws from its own `random.Random(seed)` (seed 0), token ids in [1000, 100000):

    reviews: prefix = tok(256); [(prefix + tok(randint(64, 768)), randint(32, 256)) x 2000]
    decode:  [(tok(128), 1024) x 500]
    prefill: [(tok(1024), 8) x 1000]
    small:   the reviews requests (run on llama-1b)
    fewshot: prefix = tok(2048); [(prefix + tok(randint(32, 160)), randint(64, 256)) x 1000]
             (ours: no vLLM figure or bar)

Draws are sequential, so the first N requests of a limited draw equal the first N of the full one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

TOKEN_LOW, TOKEN_HIGH = 1000, 100000
REVIEWS_PREFIX_LEN = 256

# (prompt token ids, output length)
Request = tuple[list[int], int]


@dataclass
class Workload:
    name: str
    requests: list[Request]
    # Tokens every prompt shares at its start (served from the prefix cache after the first).
    num_shared_prefix_tokens: int
    # The shape BENCHMARKS.md runs it on.
    default_shape: str

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p, _ in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(n for _, n in self.requests)


@dataclass(frozen=True)
class Reference:
    """BENCHMARKS.md's table for the H200 (matmul 780 TFLOP/s, copy 4.26 TB/s)."""
    floor_s: float
    bound_by: str
    vllm_s: float
    vllm_fraction_of_floor: float
    bar_fraction_of_floor: float  # batchgen must reach at least this floor / measured


REFERENCES: dict[str, Reference] = {
    "reviews": Reference(21.0, "compute", 36.6, 0.572, 0.66),
    "decode": Reference(13.9, "memory", 28.6, 0.487, 0.56),
    "prefill": Reference(18.8, "compute", 24.6, 0.764, 0.80),
    "small": Reference(3.1, "compute", 10.0, 0.31, 0.36),
}

WORKLOAD_NAMES = ("reviews", "decode", "prefill", "small")
# Ours, not BENCHMARKS.md's (no vLLM figure, no bar): a long few-shot instruction every row
# shares, short rows (what cascade decode attention is for).
EXTRA_WORKLOADS = ("fewshot",)
ALL_WORKLOADS = WORKLOAD_NAMES + EXTRA_WORKLOADS
FEWSHOT_PREFIX_LEN = 2048


def _token_drawer(rng: random.Random):
    def tok(n: int) -> list[int]:
        return [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n)]
    return tok


def _draw_shared_prefix(num_requests: int, seed: int, prefix_len: int, own: tuple[int, int],
                        output: tuple[int, int]) -> list[Request]:
    """One prefix every prompt starts with, then each prompt's own tokens."""
    rng = random.Random(seed)
    tok = _token_drawer(rng)
    prefix = tok(prefix_len)
    # Left to right as in the spec: the suffix length, the suffix, then the output length.
    return [(prefix + tok(rng.randint(*own)), rng.randint(*output)) for _ in range(num_requests)]


def draw_reviews(num_requests: int = 2000, seed: int = 0) -> list[Request]:
    return _draw_shared_prefix(num_requests, seed, REVIEWS_PREFIX_LEN, (64, 768), (32, 256))


def draw_decode(num_requests: int = 500, seed: int = 0) -> list[Request]:
    tok = _token_drawer(random.Random(seed))
    return [(tok(128), 1024) for _ in range(num_requests)]


def draw_prefill(num_requests: int = 1000, seed: int = 0) -> list[Request]:
    tok = _token_drawer(random.Random(seed))
    return [(tok(1024), 8) for _ in range(num_requests)]


def draw_fewshot(num_requests: int = 1000, seed: int = 0) -> list[Request]:
    return _draw_shared_prefix(num_requests, seed, FEWSHOT_PREFIX_LEN, (32, 160), (64, 256))


_FULL_SIZES = {"reviews": 2000, "decode": 500, "prefill": 1000, "small": 2000, "fewshot": 1000}


def draw_workload(name: str, limit: int | None = None, seed: int = 0) -> Workload:
    """The named workload; `limit` keeps only its first `limit` requests (smoke runs)."""
    if name not in _FULL_SIZES:
        raise ValueError(f"unknown workload {name!r}; choose from {list(ALL_WORKLOADS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    n = _FULL_SIZES[name] if limit is None else min(limit, _FULL_SIZES[name])
    if name in ("reviews", "small"):
        return Workload(name, draw_reviews(n, seed), REVIEWS_PREFIX_LEN,
                        "llama-1b" if name == "small" else "llama3-8b")
    if name == "fewshot":
        return Workload(name, draw_fewshot(n, seed), FEWSHOT_PREFIX_LEN, "llama3-8b")
    draw = draw_decode if name == "decode" else draw_prefill
    return Workload(name, draw(n, seed), 0, "llama3-8b")


def fit_to_vocab(requests: list[Request], vocab_size: int) -> list[Request]:
    """Token ids folded into [0, vocab_size) for shapes with a small vocabulary (the CPU `tiny`);
    the draw itself is unchanged. Ids already in range are left as they are."""
    if vocab_size >= TOKEN_HIGH:
        return requests
    return [([t % vocab_size for t in prompt], n) for prompt, n in requests]


def cap_outputs(requests: list[Request], max_output_tokens: int | None) -> list[Request]:
    """Output lengths capped (the baseline's 128, smoke runs); None leaves them."""
    if max_output_tokens is None:
        return requests
    return [(prompt, min(n, max_output_tokens)) for prompt, n in requests]
