"""LLM: the offline Python API (vLLM-shaped) over the engine."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchgen.config import EngineConfig
from batchgen.engine.admission import admission_order
from batchgen.engine.engine import Engine
from batchgen.outputs import RequestOutput
from batchgen.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """Load a model once, then `generate` / `chat` over many prompts with continuous batching.

    >>> llm = LLM("path/to/model")            # doctest: +SKIP
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text  # doctest: +SKIP
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str | None = None,
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 seed: int = 0, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                 load_format: str = "auto", skip_tokenizer_init: bool = False,
                 enforce_eager: bool = False, async_scheduling: bool | None = None,
                 disable_cascade_attn: bool = False, disable_dense_attn: bool = False,
                 disable_fused_mlp: bool = False):
        self.config = EngineConfig(
            model=model, dtype=dtype, device=device, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching, seed=seed, tokenizer=tokenizer,
            tensor_parallel_size=tensor_parallel_size, load_format=load_format,
            skip_tokenizer_init=skip_tokenizer_init, enforce_eager=enforce_eager,
            async_scheduling=async_scheduling, disable_cascade_attn=disable_cascade_attn,
            disable_dense_attn=disable_dense_attn, disable_fused_mlp=disable_fused_mlp)
        self.engine = Engine(self.config)
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_path(self):
        return self.engine.model_path

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams().with_defaults(self.engine.generation_defaults)

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    # ---- generate ------------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        texts, token_ids = self._tokenize(prompts)
        return self._run(texts, token_ids, params, use_tqdm)

    def chat(self, conversations: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """As vLLM's LLM.chat: message content is a string or a list of OpenAI content parts
        (text only); `tools` (OpenAI function schemas) and chat_template_kwargs (e.g.
        enable_thinking) go to the template, which renders them as the model was trained to
        see them; the answer is text (a tool call is in it as the model writes one)."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                             "True: pass add_generation_prompt=False to continue the last message")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        kwargs = {"add_generation_prompt": add_generation_prompt,
                  "continue_final_message": continue_final_message,
                  "chat_template": chat_template, "tools": tools, **(chat_template_kwargs or {})}
        texts, token_ids = [], []
        for messages in conversations:
            text = self.tokenizer.apply_chat_template(
                [_text_message(m) for m in messages], tokenize=False, **kwargs)
            texts.append(text)
            # The template already holds the special tokens (BOS, role markers).
            token_ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        params = self._params_per_prompt(sampling_params, len(texts))
        return self._run(texts, token_ids, params, use_tqdm)

    def _params_per_prompt(self, sampling_params, num: int) -> list[SamplingParams]:
        defaults = self.engine.generation_defaults
        if sampling_params is None:
            return [self.get_default_sampling_params()] * num
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params.with_defaults(defaults)] * num
        sampling_params = list(sampling_params)
        if len(sampling_params) != num:
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {num} prompts")
        return [p.with_defaults(defaults) for p in sampling_params]

    def _tokenize(self, prompts: list[PromptType]) -> tuple[list[str | None], list[list[int]]]:
        texts: list[str | None] = []
        token_ids: list[list[int] | None] = []
        to_encode: list[int] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                texts.append(p)
                token_ids.append(None)
                to_encode.append(i)
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                texts.append(p.get("prompt"))
                token_ids.append(_id_list(i, p["prompt_token_ids"]))
            elif isinstance(p, dict) and "prompt" in p:
                texts.append(p["prompt"])
                token_ids.append(None)
                to_encode.append(i)
            elif isinstance(p, (list, tuple)):
                texts.append(None)
                token_ids.append(list(p))
            else:
                raise ValueError(f"prompt {i} must be a string, a list of token ids or a dict "
                                 f"with 'prompt' or 'prompt_token_ids', got {type(p).__name__}")
        if to_encode:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
            encoded = self.tokenizer([texts[i] for i in to_encode])["input_ids"]
            for i, ids in zip(to_encode, encoded):
                token_ids[i] = list(ids)
        return texts, token_ids

    def _run(self, texts, token_ids, params, use_tqdm: bool) -> list[RequestOutput]:
        ids = [str(self._counter + i) for i in range(len(token_ids))]
        self._counter += len(ids)
        bar = _progress(len(ids)) if use_tqdm else None
        try:
            # All requests are known now: admit the longest outputs first (admission.py).
            # A bad token id raises in add_request; the except below drops those added.
            for i in admission_order(token_ids, [p.max_tokens for p in params]):
                try:
                    self.engine.add_request(ids[i], token_ids[i], params[i], prompt=texts[i])
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
            results: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            # An error or Ctrl-C: this call's requests must not run on in the next call.
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _id_list(index: int, ids) -> list:
    try:
        return list(ids)
    except TypeError:
        raise ValueError(f"prompt {index}: prompt_token_ids must be a list of token ids, got "
                         f"{type(ids).__name__}") from None


def _text_message(message: dict) -> dict:
    """A message whose content is a list of OpenAI content parts, with the text parts joined
    by newlines (as vLLM does for templates that take string content)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"unsupported content part {kind!r} in a {message.get('role')!r} "
                             f"message: only text parts ({{'type': 'text', 'text': ...}}) are")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
