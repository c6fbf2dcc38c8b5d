"""Finished Request -> RequestOutput (text, logprobs, metrics); n > 1 fan-out merged back."""
from __future__ import annotations

import time

from batchgen.engine.detokenizer import IncrementalDetokenizer, decode_output
from batchgen.engine.request import Request
from batchgen.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def build_request_output(req: Request, prompt: str | None, text: str, tokenizer, *,
                         eos_token_id: int | None = None) -> RequestOutput:
    """eos_token_id: the tokenizer's (see _stop_reason)."""
    if req.finished_time is None:
        req.finished_time = time.monotonic()
    completion = CompletionOutput(
        index=0, text=text, token_ids=list(req.output_token_ids),
        finish_reason=req.status.finish_reason, stop_reason=_stop_reason(req, eos_token_id),
        logprobs=_logprobs(req, tokenizer))
    if completion.logprobs is not None:
        completion.cumulative_logprob = sum(entry[0] for entry in req.logprobs)
    metrics = RequestMetrics(
        arrival_time=req.arrival_time, first_scheduled_time=req.first_scheduled_time,
        first_token_time=req.first_token_time, finished_time=req.finished_time,
        num_cached_tokens=req.num_cached_tokens, num_preemptions=req.num_preemptions)
    return RequestOutput(
        request_id=req.request_id, prompt=prompt, prompt_token_ids=req.prompt_token_ids,
        outputs=[completion], finished=True, metrics=metrics, error=req.error,
        num_cached_tokens=req.num_cached_tokens)


def output_text(req: Request, detok: IncrementalDetokenizer | None, tokenizer) -> str:
    """The finished request's text: its incremental detokenizer's, else decoded at once (the
    same text for the same ids: see detokenizer.py)."""
    if detok is not None:
        return detok.output_text
    if tokenizer is None or not req.output_token_ids:
        return ""
    return decode_output(tokenizer, _text_token_ids(req), req.sampling_params.skip_special_tokens,
                         prompt_token_ids=req.prompt_token_ids)


def _text_token_ids(req: Request) -> list[int]:
    """The output ids that make the text: a final stop token is left out, as in vLLM, unless
    include_stop_str_in_output."""
    ids = req.output_token_ids
    stop = req.stop_reason
    if isinstance(stop, int) and ids and ids[-1] == stop \
            and not req.sampling_params.include_stop_str_in_output:
        return ids[:-1]
    return ids


def _stop_reason(req: Request, eos_token_id: int | None) -> int | str | None:
    """As vLLM reports it: None when the tokenizer's EOS ended the request, else the stop
    string or stop token id. vLLM folds the other EOS ids (generation_config.json's) into
    stop_token_ids, so they are reported by id. req.stop_reason holds the EOS id too: the
    engine drops that token from the text."""
    reason = req.stop_reason
    if reason is not None and reason == eos_token_id and not req.sampling_params.ignore_eos:
        return None
    return reason


def _logprobs(req: Request, tokenizer) -> list[dict[int, Logprob]] | None:
    if req.sampling_params.logprobs is None:
        return None
    k = req.sampling_params.logprobs  # the step's top-k is the batch's largest request's
    out = []
    for token_id, (lp, rank, top_ids, top_lps) in zip(req.output_token_ids, req.logprobs):
        entry: dict[int, Logprob] = {}
        for top_rank, (tid, tlp) in enumerate(zip(top_ids[:k], top_lps[:k]), start=1):
            entry[tid] = Logprob(tlp, top_rank, _decode(tokenizer, tid))
        if token_id not in entry:
            entry[token_id] = Logprob(lp, rank, _decode(tokenizer, token_id))
        out.append(entry)
    return out


def _decode(tokenizer, token_id: int) -> str | None:
    return tokenizer.decode([token_id]) if tokenizer is not None else None


def merge_fanout(parent_id: str, children: list[RequestOutput]) -> RequestOutput:
    children.sort(key=lambda o: int(o.request_id.rsplit("#", 1)[1]))
    first = children[0]
    completions = []
    for i, child in enumerate(children):
        c = child.outputs[0]
        c.index = i
        completions.append(c)
    errors = [c.error for c in children if c.error]
    return RequestOutput(
        request_id=parent_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
        outputs=completions, finished=True, metrics=first.metrics,
        error=errors[0] if errors else None, num_cached_tokens=first.num_cached_tokens)
