"""Overlapped steps: the host schedules and launches step n+1 while the GPU still runs step n.

Step n's sampled tokens stay on the device; the scheduler advances each sampled request by a
PLACEHOLDER token (length limits are known without its value), step n+1 reads the real token
from step n's device tensor, and only then does the host wait for step n and put the real
tokens in place: EOS, stop tokens and stop strings finish a request one step late, and the
token it computed in step n+1 is dropped."""
from __future__ import annotations

from dataclasses import dataclass, field

from batchgen.engine.request import Request, RequestStatus

PLACEHOLDER = -1


@dataclass
class PendingStep:
    sched: object  # SchedulerOutput
    launch: object  # model_runner.LaunchedStep
    # (request, index in its output_token_ids) of every placeholder this step appended
    placeholders: list[tuple[Request, int]] = field(default_factory=list)
    # finished by length at placeholder time: emitted once their last token is known (by the
    # step before's resolution if that one stops them; an abort drops them from the list)
    finished: list[Request] = field(default_factory=list)


def placeholder_tokens(sched) -> list[int | None]:
    return [PLACEHOLDER if s else None for s in sched.needs_sample]


def record_placeholders(sched) -> list[tuple[Request, int]]:
    """After update_from_output(sched, placeholder_tokens(sched)): where each placeholder sits."""
    out = []
    for req, needs_sample in zip(sched.requests, sched.needs_sample):
        ids = req.output_token_ids
        if needs_sample and ids and ids[-1] == PLACEHOLDER:
            out.append((req, len(ids) - 1))
    return out


def is_stop_token(req: Request, token: int, num_output: int) -> bool:
    params = req.sampling_params
    if num_output < params.min_tokens:
        return False
    return (token in req.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids


def fill_placeholders(pending: PendingStep, tokens: dict[str, int],
                      logprobs: dict[str, tuple] | None) -> list[tuple[Request, int, int]]:
    """Put the real tokens in place. tokens / logprobs: request id -> value. Returns
    (request, token, index) for every request whose token was filled and is still live."""
    filled = []
    for req, index in pending.placeholders:
        if index >= len(req.output_token_ids):
            continue  # truncated: the request stopped one step earlier
        token = tokens[req.request_id]
        req.output_token_ids[index] = token
        if logprobs is not None and req.sampling_params.logprobs is not None:
            req.logprobs.append(logprobs[req.request_id])
        filled.append((req, token, index))
    return filled


def stop_after(req: Request, index: int, reason) -> None:
    """req stopped at output index `index`: drop the placeholders generated after it."""
    del req.output_token_ids[index + 1:]
    del req.logprobs[index + 1:]
    req.stop_reason = reason
    req.status = RequestStatus.FINISHED_STOPPED
