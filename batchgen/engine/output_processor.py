"""Finished Request -> RequestOutput (text, logprobs, metrics); n > 1 fan-out merged back."""
from __future__ import annotations

import time

from batchgen.engine.request import Request
from batchgen.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def build_request_output(req: Request, prompt: str | None, text: str, tokenizer) -> RequestOutput:
    if req.finished_time is None:
        req.finished_time = time.monotonic()
    completion = CompletionOutput(
        index=0, text=text, token_ids=list(req.output_token_ids),
        finish_reason=req.status.finish_reason, stop_reason=_stop_reason(req),
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


def _stop_reason(req: Request) -> int | str | None:
    """As vLLM reports it: the stop token id or stop string, None when EOS ended the request
    (req.stop_reason holds the EOS id too: the engine drops that token from the text)."""
    reason = req.stop_reason
    if isinstance(reason, int) and reason in req.eos_token_ids \
            and not req.sampling_params.ignore_eos:
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
