"""Sampler: logits -> next tokens for one step, batched on the device with no host sync.

Order: logprobs (log_softmax of the raw logits, vLLM's default) -> penalties -> min_tokens
mask -> greedy rows take the argmax -> temperature -> top-k -> top-p -> min-p -> sample.

Randomness is counter-based, so a request's draw depends on its (seed, position) only, never
on the batch around it: row b draws one uniform

    u_b = (top 24 bits of key_b, centred) in (0, 1),   key_b = hash(seed_b, position_b)

(vectorised 32-bit integer mixing, xor-shift / multiply rounds in the style of murmur3's
finaliser, held in int64 with every product below 2^63), and takes the first token whose
cumulative probability passes it: the inverse of the softmax's CDF, which picks v with
probability probs[v]. A token of probability 0 can never be drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchgen.engine.sampling_metadata import PenaltyMetadata, SamplingMetadata
from batchgen.kernels.cdf_sample import cdf_sample, cdf_sample_ref, row_keys, row_uniforms


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64, on device
    # (sampled_logprob [B], sampled_rank [B] int64, topk_ids [B, k] int64, topk_logprobs
    # [B, k]), best first, k the batch's largest request; or None.
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # logits: [B, V] in the model's dtype; not modified in place.
        assert logits.dim() == 2 and logits.shape[0] == meta.num_reqs, logits.shape
        if logits.is_cuda and _is_plain_random(meta):
            # The kernels read the model's logits and divide by the temperature as they
            # draw: no fp32 copy, no divided copy (each [B, V] fp32, twice a step's logits).
            return SamplerOutput(cdf_sample(logits, meta.keys, meta.temperature))
        logits = logits.float()
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_constraints(logits, meta)
        if meta.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            sampled = self._sample_random(logits, meta)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, logprobs)

    def _apply_constraints(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Penalties then the min_tokens mask; returns a new tensor when either applies."""
        if meta.penalties is not None:
            logits = apply_penalties(logits, meta.penalties)
        if meta.min_tokens_rows is not None:
            if meta.penalties is None:
                logits = logits.clone()
            # new_full: a fill kernel, not a host -> device copy
            logits.index_put_((meta.min_tokens_rows, meta.min_tokens_token_ids),
                              logits.new_full((), float("-inf")))
        return logits

    def _sample_random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        rows = meta.random_rows  # None: every row is random

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or rows is None else t.index_select(0, rows)

        # x: [R, V] fp32, a fresh tensor (the division copies).
        x = pick(logits) / pick(meta.temperature).unsqueeze(1)
        if meta.top_k is not None or meta.top_p is not None:
            x = apply_top_k_top_p(x, pick(meta.top_k), pick(meta.top_p))
        if meta.min_p is not None:
            x = apply_min_p(x, pick(meta.min_p))
        keys = pick(meta.keys)
        sampled = cdf_sample(x, keys) if x.is_cuda else cdf_sample_ref(x, keys)
        if rows is None:
            return sampled
        return logits.argmax(dim=-1).index_copy_(0, rows, sampled)

    def uniforms(self, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """u[r] = u(seeds[r], positions[r]) in (0, 1), i.i.d. across (seed, position): [R]
        fp32 (the draws the sampling kernels invert the CDF at)."""
        return row_uniforms(row_keys(seeds, positions))


def _is_plain_random(meta: SamplingMetadata) -> bool:
    """Every row random, at its temperature alone: no logprobs, penalties, min_tokens,
    top-k, top-p or min-p."""
    return (not meta.all_greedy and meta.random_rows is None and meta.max_num_logprobs is None
            and meta.penalties is None and meta.min_tokens_rows is None and meta.top_k is None
            and meta.top_p is None and meta.min_p is None)


def apply_penalties(logits: torch.Tensor, pen: PenaltyMetadata) -> torch.Tensor:
    """Returns a copy of logits [B, V] with the penalties of rows pen.rows applied:
    repetition (tokens in prompt or output: positive logits / r, negative * r), then
    presence (- p once per token seen in the output) and frequency (- f * count)."""
    x = logits.index_select(0, pen.rows)  # [P, V]
    counts = pen.output_counts
    is_in_output = counts > 0
    if pen.prompt_mask is not None:
        rep = pen.repetition.unsqueeze(1)
        scaled = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(pen.prompt_mask | is_in_output, scaled, x)
    x -= pen.frequency.unsqueeze(1) * counts
    x -= pen.presence.unsqueeze(1) * is_in_output
    return logits.index_copy(0, pen.rows, x)


def apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """x: [R, V] logits; top_k: [R] in [1, V] or None; top_p: [R] in (0, 1] or None.
    One descending sort; masked logits become -inf. Top-p keeps the smallest prefix whose
    probability (after top-k) reaches p: a token stays if the mass above it is < p."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(x.shape[1], device=x.device)
        sorted_x.masked_fill_(ranks.unsqueeze(0) >= top_k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = sorted_x.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1).sub_(probs)
        # p = 1 keeps everything, even where rounding makes the mass above reach 1.
        drop = (mass_above >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
        sorted_x.masked_fill_(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens whose probability is below min_p * (the top probability), in logit
    space: keep x >= max(x) + log(min_p). x: [R, V]; min_p: [R]."""
    threshold = x.amax(dim=-1) + torch.log(min_p)
    return x.masked_fill_(x < threshold.unsqueeze(1), float("-inf"))


def _gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, k: int):
    sampled_logprob = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
    # rank among the whole vocabulary: 1 + the tokens more likely than the sampled one
    sampled_rank = (logprobs > sampled_logprob.unsqueeze(1)).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    return sampled_logprob, sampled_rank, top_ids, top_logprobs
