"""SamplingMetadata: one step's sampling parameters for its B sampled requests, as device
tensors. Built on the host from the requests' Python fields in O(B) (plus the token counts of
the few requests that use penalties), packed into one int64 and one fp32 host buffer, and
sent with two copies (from pinned memory when asked)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np
import torch

from batchgen.engine.host_packer import HostPacker
from batchgen.engine.request import Request
from batchgen.kernels.cdf_sample import row_keys

# Below this temperature a request is sampled greedily (dividing by it would overflow).
MIN_TEMPERATURE = 1e-5
_INT64_MOD = 1 << 64


@dataclass
class PenaltyMetadata:
    """Penalties of the P rows of the batch that use any (HF / vLLM / OpenAI semantics)."""
    rows: torch.Tensor  # [P] int64: rows of the batch
    repetition: torch.Tensor  # [P] fp32, 1 = off
    presence: torch.Tensor  # [P] fp32, 0 = off
    frequency: torch.Tensor  # [P] fp32, 0 = off
    # How often each token occurs in the output so far (presence / frequency / repetition).
    output_counts: torch.Tensor  # [P, V] fp32
    # Which tokens occur in the prompt (repetition only); None when no row uses repetition.
    prompt_mask: torch.Tensor | None  # [P, V] bool


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    all_greedy: bool
    all_random: bool
    # Rows that sample at random, when some rows are greedy and some are not; else None.
    random_rows: torch.Tensor | None  # [R] int64
    # None when no random row of the batch uses them (fast path).
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V = off
    top_p: torch.Tensor | None  # [B] fp32 in (0, 1]; 1 = off
    min_p: torch.Tensor | None  # [B] fp32 in [0, 1]; 0 = off
    # The counter-based noise of row b depends on (seeds[b], positions[b]) only.
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: index of the output token being sampled
    keys: torch.Tensor  # [B] int64: row_keys(seeds, positions), computed on the host
    penalties: PenaltyMetadata | None
    # Logits to set to -inf (EOS / stop tokens before min_tokens): pairs (row, token id).
    min_tokens_rows: torch.Tensor | None  # [N] int64
    min_tokens_token_ids: torch.Tensor | None  # [N] int64
    # Largest `logprobs` asked for in the batch (0 = only the sampled token's); None = nobody.
    max_num_logprobs: int | None
    vocab_size: int

    @property
    def num_reqs(self) -> int:
        return self.temperature.shape[0]


def _as_int64(seed: int) -> int:
    seed %= _INT64_MOD
    return seed - _INT64_MOD if seed >= _INT64_MOD // 2 else seed


_get_seed = attrgetter("seed")
_get_output = attrgetter("output_token_ids")
_get_params = attrgetter("sampling_params")


def _seeds_array(requests: list[Request]) -> np.ndarray:
    """The requests' seeds wrapped to int64 (two's complement), as _as_int64 does."""
    n = len(requests)
    try:
        # Seeds already in int64 range (the usual case) are their own wrap.
        return np.fromiter(map(_get_seed, requests), dtype=np.int64, count=n)
    except OverflowError:
        return np.fromiter((_as_int64(r.seed) for r in requests), dtype=np.int64, count=n)


def _flat_token_index(token_lists: list[list[int]], vocab_size: int) -> torch.Tensor:
    """row * V + token for every token of every list: [sum of lengths] int64."""
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    tokens = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64,
                         count=int(lengths.sum()))
    tokens += np.repeat(np.arange(len(token_lists), dtype=np.int64) * vocab_size, lengths)
    return torch.from_numpy(tokens)


def _min_tokens_pairs(requests: list[Request], vocab_size: int,
                      candidates) -> tuple[list[int], list[int]]:
    """(row, token) pairs to ban; only the rows in `candidates` may have min_tokens > 0."""
    rows: list[int] = []
    ids: list[int] = []
    for b in candidates:
        req = requests[b]
        sp = req.sampling_params
        if req.num_output_tokens >= sp.min_tokens:
            continue
        # ignore_eos: EOS does not stop, so it needs no suppressing (and is never masked).
        banned = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            banned.update(req.eos_token_ids)
        banned = sorted(t for t in banned if 0 <= t < vocab_size)
        rows.extend([b] * len(banned))
        ids.extend(banned)
    return rows, ids


def _params_groups(requests: list[Request]) -> tuple[list, np.ndarray | None]:
    """The distinct SamplingParams objects of the batch (by identity) and each row's index
    into them; None when every row shares one object (the job layer and LLM.generate give
    every row the same one)."""
    params = list(map(_get_params, requests))
    first = params[0]
    ids = np.fromiter(map(id, params), dtype=np.uint64, count=len(params))
    if (ids == ids[0]).all():
        return [first], None
    _, first_rows, inverse = np.unique(ids, return_index=True, return_inverse=True)
    return [params[i] for i in first_rows], inverse


def build_sampling_metadata(requests: list[Request], vocab_size: int, device,
                            pin_memory: bool = False) -> SamplingMetadata:
    num_reqs = len(requests)
    assert num_reqs > 0, "a sampling step needs at least one request"
    # Per-params values are computed once per distinct SamplingParams object, then spread
    # over the rows with numpy: no per-request Python branches.
    distinct, inverse = _params_groups(requests)
    num_params = len(distinct)
    greedy = np.empty(num_params, dtype=bool)
    temperature_p = np.empty(num_params, dtype=np.float64)
    top_k_p = np.empty(num_params, dtype=np.int64)
    top_p_p = np.empty(num_params, dtype=np.float64)
    min_p_p = np.empty(num_params, dtype=np.float64)
    penalized = np.empty(num_params, dtype=bool)
    logprobs = []
    uses_min_tokens = False
    for j, sp in enumerate(distinct):
        is_greedy = sp.temperature < MIN_TEMPERATURE or sp.top_k == 1
        greedy[j] = is_greedy
        if is_greedy:
            temperature_p[j], top_k_p[j], top_p_p[j], min_p_p[j] = 0.0, vocab_size, 1.0, 0.0
        else:
            temperature_p[j] = float(sp.temperature)
            top_k_p[j] = min(sp.top_k, vocab_size) if sp.top_k > 0 else vocab_size
            top_p_p[j] = float(sp.top_p)
            min_p_p[j] = float(sp.min_p)
        penalized[j] = sp.has_penalties
        if sp.logprobs is not None:
            logprobs.append(min(sp.logprobs, vocab_size))
        uses_min_tokens = uses_min_tokens or sp.min_tokens > 0

    def per_row(values: np.ndarray) -> np.ndarray:
        return np.broadcast_to(values, (num_reqs,)) if inverse is None else values[inverse]

    num_random_params = num_params - int(greedy.sum())
    if num_random_params == 0:
        num_random = 0
    elif num_random_params == num_params:
        num_random = num_reqs
    else:
        random_rows = np.flatnonzero(~per_row(greedy))
        num_random = random_rows.size
    use_top_k = bool((top_k_p < vocab_size).any())
    use_top_p = bool((top_p_p < 1.0).any())
    use_min_p = bool((min_p_p > 0.0).any())

    ints = HostPacker(torch.int64, np.int64)
    floats = HostPacker(torch.float32, np.float32)
    floats.add("temperature", per_row(temperature_p))
    seeds = torch.from_numpy(_seeds_array(requests))
    positions = torch.from_numpy(np.fromiter(map(len, map(_get_output, requests)),
                                             dtype=np.int64, count=num_reqs))
    ints.add("seeds", seeds)
    ints.add("positions", positions)
    ints.add("keys", row_keys(seeds, positions))
    if 0 < num_random < num_reqs:
        ints.add("random_rows", random_rows)
    if use_top_k:
        ints.add("top_k", per_row(top_k_p))
    if use_top_p:
        floats.add("top_p", per_row(top_p_p))
    if use_min_p:
        floats.add("min_p", per_row(min_p_p))
    penalty_rows: list[int] = []
    if penalized.any():
        penalty_rows = np.flatnonzero(per_row(penalized)).tolist()
    use_repetition = _add_penalties(ints, floats, [requests[b] for b in penalty_rows],
                                    penalty_rows, vocab_size)
    if uses_min_tokens:
        min_tokens_p = np.fromiter((sp.min_tokens > 0 for sp in distinct), dtype=bool,
                                   count=num_params)
        candidates = np.flatnonzero(per_row(min_tokens_p)).tolist()
        mt_rows, mt_ids = _min_tokens_pairs(requests, vocab_size, candidates)
        if mt_rows:
            ints.add("min_tokens_rows", mt_rows)
            ints.add("min_tokens_token_ids", mt_ids)

    i, f = ints.send(device, pin_memory), floats.send(device, pin_memory)
    penalties = None
    if penalty_rows:
        penalties = _build_penalties(i, f, len(penalty_rows), vocab_size, use_repetition)
    return SamplingMetadata(
        temperature=f["temperature"], all_greedy=num_random == 0,
        all_random=num_random == num_reqs, random_rows=i.get("random_rows"),
        top_k=i.get("top_k"), top_p=f.get("top_p"), min_p=f.get("min_p"),
        seeds=i["seeds"], positions=i["positions"], keys=i["keys"], penalties=penalties,
        min_tokens_rows=i.get("min_tokens_rows"),
        min_tokens_token_ids=i.get("min_tokens_token_ids"),
        max_num_logprobs=max(logprobs) if logprobs else None, vocab_size=vocab_size)


def _add_penalties(ints: HostPacker, floats: HostPacker, reqs: list[Request],
                   rows: list[int], vocab_size: int) -> bool:
    """Queues the penalty rows' parameters and token indices; True if any uses repetition."""
    if not reqs:
        return False
    params = [r.sampling_params for r in reqs]
    ints.add("penalty_rows", rows)
    floats.add("repetition", [float(sp.repetition_penalty) for sp in params])
    floats.add("presence", [float(sp.presence_penalty) for sp in params])
    floats.add("frequency", [float(sp.frequency_penalty) for sp in params])
    ints.add("output_index", _flat_token_index([r.output_token_ids for r in reqs], vocab_size))
    use_repetition = any(sp.repetition_penalty != 1.0 for sp in params)
    if use_repetition:
        ints.add("prompt_index", _flat_token_index([r.prompt_token_ids for r in reqs], vocab_size))
    return use_repetition


def _build_penalties(i: dict, f: dict, num_rows: int, vocab_size: int,
                     use_repetition: bool) -> PenaltyMetadata:
    # The [P, V] tables are filled on the device from the flat indices: no [P, V] copy.
    output_index = i["output_index"]
    device = output_index.device
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=device)
    counts.index_add_(0, output_index, torch.ones_like(output_index, dtype=torch.float32))
    prompt_mask = None
    if use_repetition:
        prompt_mask = torch.zeros(num_rows * vocab_size, dtype=torch.bool, device=device)
        prompt_mask.index_fill_(0, i["prompt_index"], True)  # a scalar fill: no host copy
        prompt_mask = prompt_mask.view(num_rows, vocab_size)
    return PenaltyMetadata(
        rows=i["penalty_rows"], repetition=f["repetition"], presence=f["presence"],
        frequency=f["frequency"], output_counts=counts.view(num_rows, vocab_size),
        prompt_mask=prompt_mask)
