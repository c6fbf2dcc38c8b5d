"""Token ids -> text: incrementally for requests with stop strings, once at the end otherwise.
Both ways give the same text for the same ids (as vLLM's one incremental path does): the
output is decoded after the prompt's last tokens, and a character cut at the end is left out.

The incremental decoder keeps two offsets into its token ids (prefix <= read): it decodes
only ids[prefix:] and ids[prefix:read], and the text that the former adds to the latter is
new. Decoding from `prefix` rather than `read` gives the tokenizer the context it needs
for spaces and merges (SentencePiece decoders strip the first token's space); a new text
that ends in U+FFFD is an incomplete multi-byte character and waits for the next token.
Stop strings are searched only in the new text plus the (longest stop - 1) characters
before it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from batchgen.sampling_params import SamplingParams

# Prompt tokens decoded ahead of the output, for context (leading spaces, merges).
NUM_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes, so at least 4 byte-level tokens: past this many
# pending tokens the U+FFFD is real (invalid bytes) and is let through.
MAX_PENDING_TOKENS = 6
# Tokens of one cut character at the end of a prompt (a byte per token, 4 bytes at most).
MAX_CUT_TOKENS = 3
_REPLACEMENT = "\ufffd"


def is_stop_token(token_id: int, num_output_tokens: int, params: SamplingParams,
                  eos_token_ids: Iterable[int]) -> bool:
    """True if `token_id`, the num_output_tokens-th output token, ends the request: a stop
    token id, or EOS unless ignore_eos; neither counts before min_tokens is reached."""
    if num_output_tokens < params.min_tokens:
        return False
    if token_id in params.stop_token_ids:
        return True
    return not params.ignore_eos and token_id in eos_token_ids


def decode_output(tokenizer, token_ids: list[int], skip_special_tokens: bool = True, *,
                  params: SamplingParams | None = None,
                  eos_token_ids: Iterable[int] | None = None,
                  prompt_token_ids: Sequence[int] = ()) -> str:
    """The text of a finished request's output decoded at once, as IncrementalDetokenizer
    would give it: after the prompt's last tokens, without a character cut at the end. With
    `params`, a final stop token (EOS or a stop_token_id) is left out unless
    include_stop_str_in_output."""
    if params is not None and token_ids and not params.include_stop_str_in_output:
        eos = _eos_ids(tokenizer, eos_token_ids)
        if is_stop_token(token_ids[-1], len(token_ids), params, eos):
            token_ids = token_ids[:-1]
    context, read, prefix_text = prompt_context(tokenizer, prompt_token_ids,
                                                skip_special_tokens)
    text = tokenizer.decode(context + list(token_ids), skip_special_tokens=skip_special_tokens)
    if text.endswith(_REPLACEMENT):
        text = _without_cut_character(tokenizer, context, list(token_ids), skip_special_tokens,
                                      text, prefix_text)
    return text[len(prefix_text):]


def prompt_context(tokenizer, prompt_token_ids: Sequence[int],
                   skip_special_tokens: bool) -> tuple[list[int], int, str]:
    """(context, read, text): the prompt tokens decoded ahead of the output, how many of them
    make whole characters, and their text. A prompt that ends partway through a character
    leaves those tokens to be decoded with the output, whose first token completes it."""
    context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
    read = len(context)
    text = tokenizer.decode(context, skip_special_tokens=skip_special_tokens) if context else ""
    while text.endswith(_REPLACEMENT) and len(context) - read < MAX_CUT_TOKENS and read > 0:
        read -= 1
        text = tokenizer.decode(context[:read], skip_special_tokens=skip_special_tokens)
    return context, read, text


def _without_cut_character(tokenizer, context: list[int], token_ids: list[int], skip: bool,
                           text: str, prefix_text: str) -> str:
    """The decoded text without the trailing tokens of an incomplete character, which the
    incremental path holds back (up to MAX_PENDING_TOKENS - 1 of them, then lets them
    through: the U+FFFD is then real)."""
    for cut in range(1, min(MAX_PENDING_TOKENS - 1, len(token_ids)) + 1):
        shorter = tokenizer.decode(context + token_ids[:-cut], skip_special_tokens=skip)
        if not shorter.endswith(_REPLACEMENT):
            return shorter
    return text if len(token_ids) >= MAX_PENDING_TOKENS else prefix_text


def _eos_ids(tokenizer, eos_token_ids: Iterable[int] | None) -> frozenset[int]:
    if eos_token_ids is not None:
        return frozenset(eos_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos])


class IncrementalDetokenizer:
    """Feeds a request's output tokens as they come; `update` returns the stop string that
    matched (and freezes the text), else None. `output_text` is cut before the stop string
    (after it with include_stop_str_in_output). A stop token (EOS / stop_token_ids, see
    is_stop_token) ends the text too and is left out unless include_stop_str_in_output."""

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int], *,
                 eos_token_ids: Iterable[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_token_ids = _eos_ids(tokenizer, eos_token_ids)
        self.stop: list[str] = list(params.stop)
        self._stop_overlap = max((len(s) for s in self.stop), default=1) - 1
        context, read, _ = prompt_context(tokenizer, prompt_token_ids,
                                          params.skip_special_tokens)
        # The decode window: context tokens, then output tokens.
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = read
        self.num_output_tokens = 0
        self.output_text = ""
        self.stop_reason: str | int | None = None
        self.is_finished = False

    def update(self, new_token_ids: list[int]) -> str | None:
        if self.is_finished:
            return None
        num_chars_before = len(self.output_text)
        for token_id in new_token_ids:
            self.num_output_tokens += 1
            if is_stop_token(token_id, self.num_output_tokens, self.params, self.eos_token_ids):
                self.is_finished = True
                self.stop_reason = token_id
                if self.params.include_stop_str_in_output:
                    self._ids.append(token_id)
                    self.output_text += self._decode_new()
                break
            self._ids.append(token_id)
            self.output_text += self._decode_new()
        if self.is_finished or not self.stop or self.num_output_tokens < self.params.min_tokens:
            return None
        return self._find_stop_string(num_chars_before)

    def _decode_new(self) -> str:
        skip = self.params.skip_special_tokens
        window = self._ids[self._prefix_offset:]
        prefix_text = self.tokenizer.decode(
            window[:self._read_offset - self._prefix_offset], skip_special_tokens=skip)
        text = self.tokenizer.decode(window, skip_special_tokens=skip)
        num_pending = len(self._ids) - self._read_offset
        if len(text) <= len(prefix_text) or (
                text.endswith(_REPLACEMENT) and num_pending < MAX_PENDING_TOKENS):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix_text):]

    def _find_stop_string(self, num_chars_before: int) -> str | None:
        text = self.output_text
        start = max(0, num_chars_before - self._stop_overlap)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            i = text.find(stop, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        self.output_text = text[:i + len(stop)] if self.params.include_stop_str_in_output \
            else text[:i]
        self.is_finished = True
        self.stop_reason = stop
        return stop
