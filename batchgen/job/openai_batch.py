"""The OpenAI Batch API format: request lines in, response lines out.

In:  {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0}}
Out: {"id": "batch_req_...", "custom_id": "r1", "error": null,
      "response": {"status_code": 200, "request_id": "...", "body": {... "usage": {...}}}}
`body.model` is recorded in the response but the job's model answers. A bad line gets a
response with status_code 400 and `error` set, like the API's per-request failures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from batchgen.recipe import RowError

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
# body key -> SamplingParams field
_SAMPLING_KEYS = {
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens", "ignore_eos": "ignore_eos",
}
# Body keys that change the answer and that batchgen does not honour, with the values that
# leave the answer as it is. A request setting one gets a 400, as the API answers a parameter
# it cannot serve, never an answer that silently ignores it (a `response_format` of JSON that
# comes back as prose).
_UNHONOURED = {
    "response_format": (None, {"type": "text"}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "logit_bias": (None, {}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "prediction": (None,),
    "audio": (None,), "modalities": (None, ["text"]), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1),
}


@dataclass
class BatchRequest:
    custom_id: str
    url: str
    model: str | None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


def custom_id_of(fields: dict[str, Any]) -> str | None:
    value = fields.get("custom_id")
    return value if isinstance(value, str) else None


def parse_request(fields: dict[str, Any]) -> BatchRequest:
    """One request line's record -> BatchRequest; RowError says what is wrong with it."""
    custom_id = fields.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise RowError("custom_id must be a non-empty string")
    method = fields.get("method", "POST")
    if method != "POST":
        raise RowError(f"method must be POST, got {method!r}")
    url = fields.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise RowError(f"url must be {CHAT_URL} or {COMPLETIONS_URL}, got {url!r}")
    body = fields.get("body")
    if not isinstance(body, dict):
        raise RowError("body must be an object")
    request = BatchRequest(custom_id, url, body.get("model"))
    if url == CHAT_URL:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RowError("body.messages must be a non-empty list")
        request.messages = [_message(i, m) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RowError("body.prompt must be a string")
        if not prompt.strip():
            raise RowError("empty prompt")
        request.prompt = prompt
    # The API takes null for any optional field as "not given" (n, stop, temperature, ...).
    if body.get("n") not in (None, 1):
        raise RowError(f"n={body.get('n')!r} is not supported (only n=1)")
    for key, keeps in _UNHONOURED.items():
        if not any(body.get(key) == value for value in keeps):
            raise RowError(f"body.{key} is not supported by batchgen (got {body[key]!r}); "
                           "remove it to run this request")
    for key, name in _SAMPLING_KEYS.items():
        if body.get(key) is not None:
            request.sampling[name] = body[key]
    return request


def _message(index: int, message: Any) -> dict[str, str]:
    """A chat message with its content as one string; the API also takes a list of content
    parts, whose text parts are joined by newlines (as vLLM does)."""
    where = f"body.messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RowError(f"{where} needs a role")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise RowError(f"{where}.content: a part of type {kind!r} is not supported "
                               "(only text parts)")
            if not isinstance(part.get("text"), str):
                raise RowError(f"{where}.content: a text part's `text` must be a string")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise RowError(f"{where}.content must be a string or a list of text parts")
    return {"role": message["role"], "content": content}


def response_line(*, row: int, job_tag: str, request: BatchRequest | None, custom_id: str | None,
                  model_name: str, text: str | None, finish_reason: str | None,
                  prompt_tokens: int, output_tokens: int, error: str | None) -> dict[str, Any]:
    """One output line; ids derive from (job, row) so a resumed job writes the same ids."""
    request_id = f"{job_tag}-{row}"
    line: dict[str, Any] = {"id": f"batch_req_{request_id}", "custom_id": custom_id}
    if error is not None or request is None:
        message = error or "request failed"
        line["response"] = {"status_code": 400, "request_id": request_id, "body": {"error": {
            "message": message, "type": "invalid_request_error", "param": None, "code": None}}}
        line["error"] = {"code": "invalid_request", "message": message}
        return line
    is_chat = request.url == CHAT_URL
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if is_chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = {
        "id": f"{'chatcmpl' if is_chat else 'cmpl'}-{request_id}",
        "object": "chat.completion" if is_chat else "text_completion",
        "created": int(time.time()),
        "model": request.model or model_name,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
                  "total_tokens": prompt_tokens + output_tokens},
    }
    line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    line["error"] = None
    return line
