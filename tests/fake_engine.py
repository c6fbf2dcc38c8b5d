"""A fast, deterministic test double of `batchgen.LLM` (tokenizer + engine), same interface.

Tokens are the prompt's UTF-8 bytes + 3; the "generated" text is a function of the prompt
(and the seed, when sampling), so resumed and uninterrupted runs can be compared exactly.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from batchgen.engine.request import as_token_ids
from batchgen.outputs import CompletionOutput, RequestOutput
from batchgen.sampling_params import SamplingParams

BOS, EOS = 1, 2


class FakeTokenizer:
    chat_template = "{{ messages }}"
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [b + 3 for b in text.encode("utf-8")]
        return {"input_ids": [BOS] + ids if add_special_tokens else ids}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False) -> str:
        body = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")

    def decode(self, ids) -> str:
        return bytes([i - 3 for i in ids if i > 2]).decode("utf-8", errors="replace")


def default_responder(prompt: str, params: SamplingParams) -> str:
    text = f"echo[{prompt[-12:]}]"
    if not params.is_greedy:
        text += f" seed={params.seed % 100000}"
    return text


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    prefix_cache_hit_rate: float
    num_prompt_tokens: int
    num_generated_tokens: int


class FakeEngine:
    def __init__(self, tokenizer: FakeTokenizer, *, max_num_seqs: int = 8, max_model_len: int = 512,
                 responder: Callable[[str, SamplingParams], str] = default_responder,
                 step_delay_s: float = 0.0, num_visible_tokens: int = 64,
                 record_admissions: bool = False, vocab_size: int = 259) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # FakeTokenizer's ids: a byte + 3
        self.config = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.max_model_len = max_model_len
        self.responder = responder
        self.step_delay_s = step_delay_s
        self.num_visible_tokens = num_visible_tokens  # the responder sees the prompt's tail
        self.waiting: deque = deque()
        self.aborted: set[str] = set()
        self.num_steps = 0
        self.num_added = 0
        self.max_in_engine = 0
        self.admission_order: list[str] | None = [] if record_admissions else None
        self.num_generated = 0

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        # as the real engine: ids that are not integers, or outside the vocabulary, raise
        self.waiting.append((request_id, as_token_ids(prompt_token_ids, self.vocab_size), params))
        self.num_added += 1
        if self.admission_order is not None:
            self.admission_order.append(request_id)
        self.max_in_engine = max(self.max_in_engine, len(self.waiting))

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        outs = []
        for _ in range(min(len(self.waiting), self.config.max_num_seqs)):
            request_id, ids, params = self.waiting.popleft()
            if request_id in self.aborted:
                continue
            outs.append(self._finish(request_id, ids, params))
        return outs

    def _finish(self, request_id, ids, params) -> RequestOutput:
        if not ids or len(ids) >= self.max_model_len:
            return RequestOutput(request_id, None, ids, [CompletionOutput(0, "", [], "error")],
                                 error="bad prompt")
        text = self.responder(self.tokenizer.decode(ids[-self.num_visible_tokens:]), params)
        out_ids = [b + 3 for b in text.encode("utf-8")]
        reason = "stop"
        if params.max_tokens is not None and len(out_ids) > params.max_tokens:
            out_ids, reason = out_ids[:params.max_tokens], "length"
            text = self.tokenizer.decode(out_ids)
        self.num_generated += len(out_ids)
        return RequestOutput(request_id, None, ids, [CompletionOutput(0, text, out_ids, reason)])

    def stats(self) -> FakeStats:
        return FakeStats(0, len(self.waiting), len(self.waiting), 100, 0.0, 0, self.num_generated)


class FakeLLM:
    def __init__(self, **engine_kwargs) -> None:
        self.tokenizer = FakeTokenizer()
        self.engine = FakeEngine(self.tokenizer, **engine_kwargs)
        self.model_path = None

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams()


def fake_engine_factory(created: list | None = None, **engine_kwargs):
    """make_engine for run_job / build_app: each call makes a FakeLLM (kept in `created`)."""
    def make(job):
        llm = FakeLLM(**engine_kwargs)
        if created is not None:
            created.append(llm)
        return llm
    return make
