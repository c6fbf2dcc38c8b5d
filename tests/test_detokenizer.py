"""IncrementalDetokenizer / decode_output with the real SmolLM2 tokenizer (byte-level BPE)."""
from __future__ import annotations

import pytest

from batchgen.engine.detokenizer import IncrementalDetokenizer, decode_output
from batchgen.sampling_params import SamplingParams

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(smol_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def feed(tokenizer, prompt_ids, text: str, **params):
    """Feeds `text`'s tokens one at a time; returns (detokenizer, stop hit, texts seen)."""
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params), prompt_ids)
    ids = tokenizer.encode(text, add_special_tokens=False)
    hit, seen = None, []
    for token_id in ids:
        hit = detok.update([token_id])
        seen.append(detok.output_text)
        if hit is not None:
            break
    return detok, hit, seen


TEXTS = [
    "Hello world. The review was positive!",
    "日本語のテキストです。",
    "naïve café, crème brûlée — déjà vu",
    "Emoji: 🎉👍🏽 and 👨‍👩‍👧 family",
    "  leading spaces\n\ttabs and\nnew lines  ",
    "Ünïcödé ∑ ∫ ≠ ≤ 中文 한국어 العربية",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_round_trips(tokenizer, prompt_ids, text):
    detok, hit, seen = feed(tokenizer, prompt_ids, text, stop=["NEVER"])
    assert hit is None
    assert detok.output_text == text
    # an incomplete multi-byte character waits: no U+FFFD at any step
    assert not any("\ufffd" in s for s in seen)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert decode_output(tokenizer, ids) == text


def test_stop_string_split_over_tokens(tokenizer, prompt_ids):
    text = "Hello world. STOP here and more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "STOP" not in [tokenizer.decode([i]) for i in ids]  # really split (" ST", "OP")
    detok, hit, _ = feed(tokenizer, prompt_ids, text, stop=["STOP"])
    assert hit == "STOP" and detok.stop_reason == "STOP"
    assert detok.output_text == "Hello world. "
    detok, hit, _ = feed(tokenizer, prompt_ids, text, stop=["STOP"],
                         include_stop_str_in_output=True)
    assert hit == "STOP" and detok.output_text == "Hello world. STOP"


def test_stop_string_inside_one_token(tokenizer, prompt_ids):
    detok, hit, seen = feed(tokenizer, prompt_ids, "Hello wonderful world", stop=["onder"])
    assert hit == "onder"
    assert detok.output_text == "Hello w"
    assert len(seen) == 2  # found on the token " wonderful" itself


def test_stop_string_in_non_english_text(tokenizer, prompt_ids):
    detok, hit, _ = feed(tokenizer, prompt_ids, "日本語 naïve café", stop=["語"])
    assert hit == "語" and detok.output_text == "日本"
    detok, hit, _ = feed(tokenizer, prompt_ids, "a naïve café here", stop=["é h"],
                         include_stop_str_in_output=True)
    assert hit == "é h" and detok.output_text == "a naïve café h"


def test_earliest_stop_wins_and_text_freezes(tokenizer, prompt_ids):
    params = SamplingParams(stop=["world", "Hello w"])
    detok = IncrementalDetokenizer(tokenizer, params, prompt_ids)
    hit = None
    for token_id in tokenizer.encode("Hello world again", add_special_tokens=False):
        hit = hit or detok.update([token_id])
    assert hit == "Hello w" and detok.output_text == ""
    assert detok.update(tokenizer.encode(" more", add_special_tokens=False)) is None
    assert detok.output_text == "" and detok.is_finished


def test_stop_string_waits_for_min_tokens(tokenizer, prompt_ids):
    text = "yes no yes no yes"
    detok, hit, _ = feed(tokenizer, prompt_ids, text, stop=["yes"], min_tokens=3)
    assert hit == "yes" and detok.output_text == "yes no "
    assert feed(tokenizer, prompt_ids, text, stop=["yes"])[0].output_text == ""


def test_stop_token_ids_leave_the_text(tokenizer, prompt_ids):
    ids = tokenizer.encode("Answer: yes", add_special_tokens=False)
    stop_id = ids[-1]  # " yes", a normal token
    for include, expected in ((False, "Answer:"), (True, "Answer: yes")):
        params = SamplingParams(stop=["NEVER"], stop_token_ids=[stop_id],
                                include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tokenizer, params, prompt_ids)
        assert detok.update(ids) is None
        assert detok.output_text == expected and detok.stop_reason == stop_id
        assert decode_output(tokenizer, ids, params=params) == expected
    # EOS is dropped even when special tokens are kept; not when it does not stop
    params = SamplingParams(stop=["NEVER"], skip_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, params, prompt_ids)
    detok.update(ids[:-1] + [EOS])
    assert detok.output_text == "Answer:"
    assert decode_output(tokenizer, ids[:-1] + [EOS], False, params=params) == "Answer:"
    params = SamplingParams(ignore_eos=True, skip_special_tokens=False)
    assert decode_output(tokenizer, [EOS] + ids, False, params=params) == "<|im_end|>Answer: yes"


def test_decodes_only_a_small_window(tokenizer, prompt_ids):
    class Recorder:
        def __init__(self, inner):
            self.inner, self.max_len = inner, 0
            self.eos_token_id = inner.eos_token_id

        def decode(self, ids, **kwargs):
            self.max_len = max(self.max_len, len(ids))
            return self.inner.decode(ids, **kwargs)

    recorder = Recorder(tokenizer)
    text = " ".join(["The quick brown fox jumps over the lazy dog. 日本語 🎉"] * 20)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 300
    detok = IncrementalDetokenizer(recorder, SamplingParams(stop=["NEVER"]), prompt_ids)
    for token_id in ids:
        detok.update([token_id])
    assert detok.output_text == text
    assert recorder.max_len <= 12


def test_output_after_prompt_keeps_its_leading_space(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    ids = tokenizer.encode("Hello world there", add_special_tokens=False)[len(prompt):]
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["NEVER"]), prompt)
    detok.update(ids)
    assert detok.output_text == " world there" == decode_output(tokenizer, ids)


def _both_paths(tokenizer, prompt, ids) -> tuple[str, str]:
    """(incremental text, text decoded at once) of output `ids` after `prompt`."""
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["NEVER"]), prompt)
    for token_id in ids:
        detok.update([token_id])
    return detok.output_text, decode_output(tokenizer, ids, prompt_token_ids=prompt)


def test_sentencepiece_output_keeps_its_leading_space(sp_model_dir):
    # A Llama-2 decoder strips the first token's space: decoded alone, " Paris" loses it.
    from transformers import AutoTokenizer
    sp = AutoTokenizer.from_pretrained(sp_model_dir)
    prompt = sp.encode("The capital of France is", add_special_tokens=False)
    ids = sp.encode("The capital of France is Paris. It", add_special_tokens=False)
    assert ids[:len(prompt)] == prompt
    assert _both_paths(sp, prompt, ids[len(prompt):]) == (" Paris. It", " Paris. It")


def _split_character(tokenizer, text: str) -> tuple[list[int], int]:
    """`text`'s ids and an index that falls inside its last character's tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    last = tokenizer.encode(text[-1], add_special_tokens=False)
    assert len(last) > 1 and ids[-len(last):] == last
    return ids, len(ids) - len(last) + 1


def test_a_character_cut_at_either_end_is_whole_or_left_out(tokenizer):
    ids, cut = _split_character(tokenizer, "Party:🎉")
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    # the output ends inside 🎉: its bytes are left out both ways, not turned into U+FFFD
    assert _both_paths(tokenizer, prompt, ids[:cut]) == ("Party:", "Party:")
    # a token-id prompt ending inside 🎉: the output's tokens complete it
    assert _both_paths(tokenizer, ids[:cut], ids[cut:]) == ("🎉", "🎉")


@pytest.mark.parametrize("seed", range(4))
def test_both_paths_give_the_same_text(tokenizer, sp_model_dir, seed):
    import random

    from transformers import AutoTokenizer
    rng = random.Random(seed)
    for tok in (tokenizer, AutoTokenizer.from_pretrained(sp_model_dir)):
        for _ in range(25):
            ids = tok.encode(rng.choice(TEXTS) + rng.choice(TEXTS), add_special_tokens=False)
            cut = rng.randrange(len(ids))
            end = rng.randrange(cut + 1, len(ids) + 1)
            incremental, at_once = _both_paths(tok, ids[:cut], ids[cut:end])
            assert incremental == at_once and not at_once.endswith("\ufffd")
