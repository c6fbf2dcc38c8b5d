"""SamplingParams: validation names the field; defaults fill only what the caller left unset."""
from __future__ import annotations

import math

import pytest

from batchgen.sampling_params import SamplingParams

INVALID = [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1"), ("temperature", True),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2.0), ("top_k", False),
    ("min_p", -0.01), ("min_p", 1.5),
    ("max_tokens", 0), ("max_tokens", 3.0),
    ("min_tokens", -1), ("min_tokens", 17),  # > max_tokens (16)
    ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]), ("stop_token_ids", 7),
    ("seed", 1.0), ("seed", "42"),
    ("logprobs", -1), ("logprobs", 2.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("presence_penalty", math.nan),
    ("frequency_penalty", 3.0), ("frequency_penalty", -math.inf),
    ("ignore_eos", "yes"), ("skip_special_tokens", 0), ("include_stop_str_in_output", None),
]


@pytest.mark.parametrize("name, value", INVALID)
def test_invalid_value_raises_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}\b"):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("name, value", INVALID)
def test_clone_validates_too(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams().clone(**{name: value})


def test_valid_edges_pass():
    sp = SamplingParams(n=2, temperature=0, top_p=1, top_k=-1, min_p=1.0, max_tokens=None,
                        min_tokens=5, stop="x", stop_token_ids=(3, 4), seed=-7, logprobs=0,
                        repetition_penalty=0.5, presence_penalty=-2, frequency_penalty=2.0)
    assert sp.stop == ["x"] and sp.stop_token_ids == [3, 4]
    assert sp.is_greedy and sp.has_penalties
    assert SamplingParams(top_k=1).is_greedy and not SamplingParams().is_greedy
    assert not SamplingParams().has_penalties


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=5)
    with pytest.raises(ValueError, match="temp"):
        SamplingParams().clone(temp=0.5)


def test_with_defaults_fills_only_unset_fields():
    sp = SamplingParams(temperature=0.3, max_tokens=64)
    out = sp.with_defaults({"temperature": 0.9, "top_p": 0.8, "top_k": 20, "max_tokens": 5,
                            "repetition_penalty": 1.1})
    assert (out.temperature, out.max_tokens) == (0.3, 64)  # the caller's values win
    assert (out.top_p, out.top_k, out.repetition_penalty) == (0.8, 20, 1.1)
    assert (sp.top_p, sp.top_k) == (1.0, 0)  # the original is untouched
    assert out.is_user_set("temperature") and not out.is_user_set("top_p")


def test_with_defaults_ignores_non_fields_and_normalises():
    # generation_config.json carries keys that are not fields (and names of properties).
    out = SamplingParams().with_defaults({"do_sample": True, "bos_token_id": 1,
                                          "is_greedy": False, "stop": "END"})
    assert out.stop == ["END"]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams().with_defaults({"top_p": 0.0})


def test_clone_marks_changes_as_user_set():
    sp = SamplingParams(seed=3).clone(temperature=0.0, stop="a")
    assert sp.stop == ["a"] and sp.is_user_set("temperature") and sp.is_user_set("seed")
    assert sp.with_defaults({"temperature": 1.0}).temperature == 0.0
