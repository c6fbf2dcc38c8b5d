"""Overlapped steps (async_scheduling) give exactly what synchronous steps give, on the real
small model (SmolLM2-135M-Instruct, fp32, CPU): token ids, text, finish and stop reasons,
logprobs, and the engine's counters once everything is done.

Overlap finishes a request one step late (its stop token is only seen after the next step was
launched), so the cases that matter are stops near max_tokens (the next step already finished
the request by length), stop strings, aborts of requests with a step in flight, preemption of
a request whose last token is still on the device, and penalties (which need real tokens)."""
from __future__ import annotations

import pytest

from batchgen import LLM, SamplingParams
from batchgen.engine.overlap import PLACEHOLDER

QUESTIONS = [  # greedy answers end in EOS after 8, 8 and 10 tokens
    "What is 2+2? Answer with a number only.",
    "Name one fruit. One word.",
    "Reply with one word: what color is the sky?",
]
RAW = [
    "The capital of France is",  # " Paris.\n\nThe answer is: 2018-01"
    "def add(a, b):\n   ",
    "Once upon a time, there was",
    "1, 2, 3, 4,",  # " 5, 6, 7, 8, 9, "
]
COMMA = 28  # "," in " 5, 6, 7, ..."


def _llm(model_dir, overlap: bool, **kwargs) -> LLM:
    return LLM(str(model_dir), device="cpu", async_scheduling=overlap, **kwargs)


@pytest.fixture(scope="module")
def llms(smol_model_dir):
    """{False: synchronous, True: overlapped} engines, shared by the tests of this module."""
    out = {overlap: _llm(smol_model_dir, overlap, num_kv_blocks=96) for overlap in (False, True)}
    assert not out[False].engine.overlap and out[True].engine.overlap
    return out


@pytest.fixture(scope="module")
def prompts(llms):
    tok = llms[False].tokenizer
    chats = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        chats.append(tok(text, add_special_tokens=False)["input_ids"])
    return chats + [tok(p)["input_ids"] for p in RAW]


def _key(out):
    """Everything a user sees of one finished request but the logprob values (see _values)."""
    comps = []
    for c in out.outputs:
        lps = None if c.logprobs is None else [
            sorted((tid, lp.rank, lp.decoded_token) for tid, lp in entry.items())
            for entry in c.logprobs]
        comps.append((c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, lps))
    return out.request_id, out.error, comps


def _values(out) -> list[float]:
    return [lp.logprob for c in out.outputs for entry in (c.logprobs or [])
            for _, lp in sorted(entry.items())] + \
        [c.cumulative_logprob for c in out.outputs if c.logprobs is not None]


def _assert_same(sync, over, what):
    assert _key(over)[1:] == _key(sync)[1:], f"{what} differs with overlap"
    # Batches differ in size between the modes (overlap drops a stopped request one step
    # later), so the last float bits of a matmul may too.
    assert _values(over) == pytest.approx(_values(sync), rel=1e-5, abs=1e-5), what


def _check_idle(llm, generated_before: int, outs) -> int:
    """Nothing left behind; returns the tokens generated since `generated_before`."""
    engine = llm.engine
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_kv_blocks_used == 0
    assert engine._num_penalized == 0 and engine._inflight is None
    assert not engine.has_unfinished() and not engine._fanout and not engine._detokenizers
    for out in outs:
        for c in out.outputs:
            assert PLACEHOLDER not in c.token_ids
    return stats.num_generated_tokens - generated_before


def _compare(llms, prompts, params: list[SamplingParams]):
    """Runs the same requests in both modes; returns the synchronous outputs."""
    results = {}
    for overlap, llm in llms.items():
        before = llm.engine.stats().num_generated_tokens
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        generated = _check_idle(llm, before, outs)
        assert generated == sum(len(c.token_ids) for o in outs for c in o.outputs), overlap
        results[overlap] = outs
    for i, (sync, over) in enumerate(zip(results[False], results[True])):
        _assert_same(sync, over, f"request {i}")
    return results[False]


# ---- one mixed batch: greedy, EOS near max_tokens, sampling, n, logprobs, stops ----------

def _mixed(prompts):
    c1, c2, c3, r1, r2, r3, r4 = prompts
    greedy = dict(temperature=0)
    cases = {
        # (a) greedy, EOS before / at / one and two before max_tokens, plain length
        "eos_max7": (c1, SamplingParams(max_tokens=7, **greedy)),
        "eos_max8": (c1, SamplingParams(max_tokens=8, **greedy)),
        "eos_max9": (c1, SamplingParams(max_tokens=9, **greedy)),
        "eos_max10": (c1, SamplingParams(max_tokens=10, **greedy)),
        "eos_fruit": (c2, SamplingParams(max_tokens=16, **greedy)),
        "eos_sky": (c3, SamplingParams(max_tokens=11, **greedy)),
        "len_r1": (r1, SamplingParams(max_tokens=16, **greedy)),
        "len_r2": (r2, SamplingParams(max_tokens=12, **greedy)),
        # (b) seeded and engine-seeded sampling
        "seed_r3": (r3, SamplingParams(temperature=0.8, seed=1, max_tokens=12)),
        "seed_r1": (r1, SamplingParams(temperature=0.8, seed=2, max_tokens=12)),
        "seed_c2": (c2, SamplingParams(temperature=0.8, seed=3, max_tokens=16)),
        "noseed_r4": (r4, SamplingParams(temperature=0.8, max_tokens=12)),
        # (c) n=3
        "n3_seed": (r1, SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=10)),
        "n3_chat": (c1, SamplingParams(n=3, temperature=0.8, max_tokens=12)),
        # (d) logprobs
        "lp_greedy": (r2, SamplingParams(logprobs=2, max_tokens=10, **greedy)),
        "lp_sample": (c3, SamplingParams(logprobs=2, temperature=0.8, seed=5, max_tokens=12)),
        "lp_eos_max9": (c1, SamplingParams(logprobs=2, max_tokens=9, **greedy)),
        # (e) stop strings (hit two before max_tokens too), stop tokens, min_tokens
        "stop_str": (r1, SamplingParams(stop=["answer"], max_tokens=16, **greedy)),
        "stop_str_max7": (r1, SamplingParams(stop=["answer"], max_tokens=7, **greedy)),
        "stop_str_max6": (r1, SamplingParams(stop=["answer"], max_tokens=6, **greedy)),
        "stop_str_incl": (r4, SamplingParams(stop=[" 7,"], include_stop_str_in_output=True,
                                             max_tokens=16, **greedy)),
        "stop_tok_max4": (r4, SamplingParams(stop_token_ids=[COMMA], max_tokens=4, **greedy)),
        "stop_tok_min": (r4, SamplingParams(stop_token_ids=[COMMA], min_tokens=5,
                                            max_tokens=12, **greedy)),
        "min_tokens_eos": (c1, SamplingParams(min_tokens=10, max_tokens=13, **greedy)),
    }
    return cases


@pytest.fixture(scope="module")
def mixed(llms, prompts):
    cases = _mixed(prompts)
    outs = _compare(llms, [p for p, _ in cases.values()], [sp for _, sp in cases.values()])
    return dict(zip(cases, outs))


def _reasons(outs, *names):
    return [(outs[n].outputs[0].finish_reason, outs[n].outputs[0].stop_reason) for n in names]


def test_greedy_and_eos_near_max_tokens(mixed):
    assert _reasons(mixed, "eos_max7", "eos_max8", "eos_max9", "eos_max10", "eos_sky") == [
        ("length", None), ("stop", None), ("stop", None), ("stop", None), ("stop", None)]
    assert mixed["eos_max9"].outputs[0].text == "2 + 2 = 4"
    assert mixed["len_r1"].outputs[0].text.startswith(" Paris.")


def test_seeded_sampling(mixed):
    assert all(len(mixed[n].outputs[0].token_ids) > 0
               for n in ("seed_r3", "seed_r1", "seed_c2", "noseed_r4"))


def test_n3(mixed):
    for name in ("n3_seed", "n3_chat"):
        assert [c.index for c in mixed[name].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in mixed["n3_seed"].outputs}) > 1


def test_logprobs(mixed):
    for name in ("lp_greedy", "lp_sample", "lp_eos_max9"):
        c = mixed[name].outputs[0]
        assert len(c.logprobs) == len(c.token_ids)
        assert all(len(entry) in (2, 3) for entry in c.logprobs)
    assert mixed["lp_eos_max9"].outputs[0].finish_reason == "stop"


def test_stops(mixed):
    assert _reasons(mixed, "stop_str", "stop_str_max7", "stop_str_max6", "stop_str_incl",
                    "stop_tok_max4", "min_tokens_eos") == [
        ("stop", "answer"), ("stop", "answer"), ("stop", "answer"), ("stop", " 7,"),
        ("stop", COMMA), ("length", None)]
    assert mixed["stop_str"].outputs[0].text == " Paris.\n\nThe "
    assert mixed["stop_str_incl"].outputs[0].text.endswith(" 7,")
    assert COMMA not in mixed["stop_tok_min"].outputs[0].token_ids[:5]
    assert 2 not in mixed["min_tokens_eos"].outputs[0].token_ids[:10]


# ---- penalties (real tokens needed) mixed with plain requests ----------------------------

def test_penalties_mixed_with_plain(llms, prompts):
    c1, c2, c3, r1, r2, r3, r4 = prompts
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=6),
        SamplingParams(temperature=0.8, seed=4, frequency_penalty=0.5, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=14),  # runs overlapped once those are done
        SamplingParams(temperature=0.8, seed=9, max_tokens=14),
        SamplingParams(temperature=0, stop=["answer"], max_tokens=14),
    ]
    outs = _compare(llms, [r4, r3, r2, c2, r1], params)
    plain = llms[False].generate([{"prompt_token_ids": r4}],
                                 SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert outs[0].outputs[0].token_ids != plain[0].outputs[0].token_ids  # the penalty bites


# ---- preemption + chunked prefill -------------------------------------------------------

def test_preemption_and_chunked_prefill(smol_model_dir, prompts):
    # 11 usable blocks of 16 tokens for 7 requests of up to 59 tokens
    engines = {o: _llm(smol_model_dir, o, num_kv_blocks=12, max_num_batched_tokens=32)
               for o in (False, True)}
    params = [SamplingParams(temperature=0, max_tokens=16)] * 5 + [
        SamplingParams(temperature=0.8, seed=3, max_tokens=16),
        SamplingParams(temperature=0, stop=["answer"], max_tokens=16)]
    _compare(engines, prompts, params)
    for llm in engines.values():
        assert llm.engine.stats().num_preemptions > 0


# ---- abort through the Engine API -------------------------------------------------------

def _run_engine(engine, requests, abort_at: dict[int, list[str]], add_at: dict[int, list]):
    """requests: (id, prompt ids, params); abort_at / add_at: step number -> ids to abort /
    requests to add after it."""
    for rid, ids, sp in requests:
        engine.add_request(rid, ids, sp)
    outs, num_steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in outs
            outs[out.request_id] = out
        num_steps += 1
        for rid in abort_at.get(num_steps, []):
            engine.abort(rid)
        for rid, ids, sp in add_at.get(num_steps, []):
            engine.add_request(rid, ids, sp)
    return outs


def test_abort_mid_run(llms, prompts):
    c1, c2, c3, r1, r2, r3, r4 = prompts
    requests = [
        ("keep_greedy", r1, SamplingParams(temperature=0, max_tokens=12)),
        ("keep_seeded", r2, SamplingParams(temperature=0.8, seed=6, max_tokens=12)),
        ("keep_eos", c1, SamplingParams(temperature=0, max_tokens=12)),
        ("drop", r3, SamplingParams(temperature=0, max_tokens=16)),
        ("drop_n2", c2, SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=16)),
        ("drop_pen", r4, SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=16)),
    ]
    # added while a step is in flight: its penalty needs the in-flight tokens first
    late = ("late_pen", r3, SamplingParams(temperature=0, frequency_penalty=0.5, max_tokens=4))
    results = {}
    for overlap, llm in llms.items():
        outs = _run_engine(llm.engine, requests, {2: ["drop_pen"], 4: ["drop", "drop_n2"]},
                           {5: [late]})
        assert sorted(outs) == ["keep_eos", "keep_greedy", "keep_seeded", "late_pen"], overlap
        _check_idle(llm, 0, outs.values())
        results[overlap] = outs
    for rid, sync in results[False].items():
        _assert_same(sync, results[True][rid], rid)


@pytest.mark.parametrize("penalized", [False, True])
def test_abort_finished_but_not_emitted(llms, prompts, penalized):
    """With overlap a request finished by length is emitted one step later: an abort in
    between wins (it is never emitted), for an n > 1 child too, and nothing leaks."""
    engine = llms[True].engine
    r1, r2 = prompts[3], prompts[4]
    penalty = {"repetition_penalty": 1.3} if penalized else {}
    engine.add_request("short", r1, SamplingParams(temperature=0, max_tokens=2, **penalty))
    engine.add_request("fan", r2, SamplingParams(n=2, temperature=0.8, seed=2,
                                                 max_tokens=2, **penalty))
    engine.add_request("other", r2, SamplingParams(temperature=0, max_tokens=6))
    outs = [o for _ in range(2) for o in engine.step()]
    pending = engine._inflight.finished if engine._inflight is not None else []
    assert {r.request_id for r in pending} == {"short", "fan#0", "fan#1"}
    assert not outs
    engine.abort("short")
    engine.abort("fan")
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs] == ["other"]
    _check_idle(llms[True], 0, outs)


# ---- counters ---------------------------------------------------------------------------

def test_stats_back_to_idle(llms, prompts):
    """After a run (with EOS one step before max_tokens, where overlap computes a token it
    drops) the counters agree between the modes and nothing is held."""
    c1 = prompts[0]
    params = [SamplingParams(temperature=0, max_tokens=9),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=3)]
    generated = {}
    for overlap, llm in llms.items():
        before = llm.engine.stats().num_generated_tokens
        outs = llm.generate([{"prompt_token_ids": c1}] * 2, params, use_tqdm=False)
        generated[overlap] = _check_idle(llm, before, outs)
    assert generated[True] == generated[False] == 8 + 3


def test_decoded_blocks_hit_prefix_cache(llms, prompts):
    r1 = prompts[3]
    hits = {}
    for overlap, llm in llms.items():
        first = llm.generate([{"prompt_token_ids": r1}], SamplingParams(temperature=0, max_tokens=16),
                             use_tqdm=False)[0]
        # The first block (5 prompt + 11 output tokens) was completed by a decode step.
        again = r1 + first.outputs[0].token_ids[:14]
        out = llm.generate([{"prompt_token_ids": again}],
                           SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
        hits[overlap] = out.num_cached_tokens
    assert hits[False] == 16
    assert hits[True] == hits[False]
