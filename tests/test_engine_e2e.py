"""End to end: batchgen's greedy tokens equal transformers' generate on the real small model
(SmolLM2-135M-Instruct, fp32, CPU), in every engine configuration that changes the schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.engine.request import child_seed

MAX_TOKENS = 20
SYSTEM = ("You are a meticulous support assistant for an online shop. Answer in one short "
          "sentence, politely, without making anything up.")


def _prompts(tokenizer) -> list[list[int]]:
    long_text = " ".join(f"Review {i}: the blender was loud but it crushed ice well." for i in range(22))
    raw = [
        "The capital of France is",
        long_text + "\nSummary:",
        "Le petit déjeuner à Paris coûte combien? 日本語でも答えてください。",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    ]
    ids = [tokenizer(p)["input_ids"] for p in raw]
    for question in ("Where is my order #1234?", "Can I return a used blender?",
                     "Do you ship to Canada?"):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


@pytest.fixture(scope="module")
def reference(smol_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_model_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_model_dir, dtype=torch.float32)
    model.eval()
    prompts = _prompts(tokenizer)
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            expected.append(out[0, len(ids):].tolist())
    assert any(len(p) > 250 for p in prompts)
    return prompts, expected


@pytest.fixture(scope="module")
def llm(smol_model_dir):
    """One default engine for the API tests below that need no special configuration."""
    return LLM(str(smol_model_dir), device="cpu")


CONFIGS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 64},
    # 28 blocks of 16 tokens: the 323-token prompt alone needs 22, so others get preempted.
    "preemption": {"num_kv_blocks": 28},
    "no_prefix_cache": {"enable_prefix_caching": False},
    # Overlapped steps (the CUDA default) with chunks and preemption on top.
    "overlap": {"async_scheduling": True, "num_kv_blocks": 28, "max_num_batched_tokens": 64},
}


def _generate_in_input_order(engine, prompts, params) -> list[list[int]]:
    """Engine-level generate admitting in input order (LLM.generate reorders admissions), so
    the 323-token prompt runs beside the others and the small pools force preemptions."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step())
    return [done[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(smol_model_dir, reference, name):
    prompts, expected = reference
    llm = LLM(str(smol_model_dir), device="cpu", **CONFIGS[name])
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    if name == "default":
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = [out.outputs[0].token_ids for out in outs]
    else:
        tokens = _generate_in_input_order(llm.engine, prompts, params)
    for i, (got, exp) in enumerate(zip(tokens, expected)):
        assert got == exp, f"prompt {i} differs in config {name}"
    stats = llm.engine.stats()
    if name in ("preemption", "overlap"):
        assert stats.num_preemptions > 0
    if name == "default":
        # The three chat prompts share the system prompt: the later ones hit the cache.
        assert stats.prefix_cache_hit_rate > 0
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0


def test_text_prompts_and_chat(smol_model_dir):
    llm = LLM(str(smol_model_dir), device="cpu")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text.strip().endswith(".")  # EOS not in the text
    texts = llm.generate(["Hello", "The capital of France is"],
                         SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [o.prompt for o in texts] == ["Hello", "The capital of France is"]
    assert texts[1].prompt_token_ids == llm.tokenizer("The capital of France is")["input_ids"]
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 5
               for o in texts)


def test_bad_requests_do_not_break_the_batch(smol_model_dir):
    llm = LLM(str(smol_model_dir), device="cpu", max_model_len=128)
    outs = llm.generate(
        [[], list(range(5, 200)), "The capital of France is"],
        SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "empty" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "error" and "max_model_len" in outs[1].error
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) == 4
    # ids outside the vocabulary are refused, not run: test_add_request_checks_token_ids
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_seeded_sampling_is_batch_independent_and_n(smol_model_dir):
    llm = LLM(str(smol_model_dir), device="cpu")
    p = SamplingParams(temperature=1.0, max_tokens=12, seed=1234)
    alone = llm.generate("Once upon a time", p, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate(["Tell me a joke", "Once upon a time", "1 2 3"],
                         [SamplingParams(temperature=0.7, max_tokens=9), p,
                          SamplingParams(temperature=1.0, max_tokens=12, seed=7)],
                         use_tqdm=False)[1].outputs[0].token_ids
    assert alone == crowd
    many = llm.generate("Once upon a time", SamplingParams(temperature=1.0, max_tokens=8, n=3,
                                                           seed=5, logprobs=2), use_tqdm=False)[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in many.outputs}) > 1
    for c in many.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        assert all(tok in entry for tok, entry in zip(c.token_ids, c.logprobs))


def test_a_request_id_in_use_is_refused(smol_model_dir):
    engine = LLM(str(smol_model_dir), device="cpu").engine
    params = SamplingParams(max_tokens=2)
    engine.add_request("x", [], params)  # cannot run: finished at once, emitted by a step
    engine.add_request("y", [1, 2, 3], params)
    engine.add_request("z", [1, 2, 3], SamplingParams(max_tokens=2, n=2))
    for rid in ("x", "y", "z"):
        with pytest.raises(ValueError, match="already in the engine"):
            engine.add_request(rid, [4, 5], params)
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert sorted(o.request_id for o in done) == ["x", "y", "z"]
    assert done[[o.request_id for o in done].index("x")].outputs[0].finish_reason == "error"
    engine.add_request("x", [4, 5], params)  # an emitted id is free again


def test_logprobs_are_each_requests_own(smol_model_dir):
    # A request's entries are its own top-k plus the sampled token at its rank in the whole
    # vocabulary, whatever k the other requests of its steps ask for.
    llm = LLM(str(smol_model_dir), device="cpu")
    asked = SamplingParams(temperature=1.5, max_tokens=6, seed=1, logprobs=1)
    crowd = llm.generate(["The weather today is", "My favourite food is"],
                         [asked, SamplingParams(temperature=0, max_tokens=6, logprobs=5)],
                         use_tqdm=False)
    alone = llm.generate("The weather today is", asked, use_tqdm=False)[0].outputs[0]
    mine = crowd[0].outputs[0]
    assert mine.token_ids == alone.token_ids
    for tok, entry, entry_alone in zip(mine.token_ids, mine.logprobs, alone.logprobs):
        # the same entries; a rank deep in the vocabulary may move by one, as a batch of two
        # gives logits that differ from one's in the last bits on CPU
        assert entry.keys() == entry_alone.keys()
        assert all(abs(entry[t].rank - entry_alone[t].rank) <= (entry[t].rank > 100)
                   for t in entry)
        best = min(entry, key=lambda t: entry[t].rank)
        assert entry[best].rank == 1 and len(entry) == (1 if tok == best else 2)
        assert entry[tok].rank == 1 + sum(lp.logprob > entry[tok].logprob
                                          for lp in entry.values()) or entry[tok].rank > 2
    assert all(len(e) in (5, 6) for e in crowd[1].outputs[0].logprobs)


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_strings(smol_model_dir, overlap):
    llm = LLM(str(smol_model_dir), device="cpu", async_scheduling=overlap)
    base = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12),
                        use_tqdm=False)[0].outputs[0].text
    word = base.split()[1] if len(base.split()) > 1 else base.strip()[:3]
    cut = llm.generate("The capital of France is",
                       SamplingParams(temperature=0, max_tokens=12, stop=[word]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == word
    assert cut.text == base[:base.index(word)]


def test_n_samples_of_nearby_seeds_do_not_repeat(llm):
    # child i used seed + i: sample 1 of seed 7 was sample 0 of seed 8
    params = [SamplingParams(temperature=1.0, max_tokens=6, n=3, seed=s) for s in (7, 8, 9)]
    outs = llm.generate(["Once upon a time"] * 3, params, use_tqdm=False)
    samples = [tuple(c.token_ids) for o in outs for c in o.outputs]
    assert len(set(samples)) == len(samples) == 9
    # sample 0 keeps the seed: a seeded n=1 request draws what it always drew
    one = llm.generate("Once upon a time", SamplingParams(temperature=1.0, max_tokens=6, seed=7),
                       use_tqdm=False)[0].outputs[0]
    assert tuple(one.token_ids) == samples[0]
    assert child_seed(7, 0) == 7
    assert len({child_seed(s, i) for s in range(50) for i in range(4)}) == 200


def _with_and_without_stop(llm, prompt, **kwargs):
    return [llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop=stop, **kwargs),
                         use_tqdm=False)[0].outputs[0] for stop in (None, ["NEVER"])]


def test_text_does_not_depend_on_stop_strings(llm, sp_model_dir):
    # a character cut by max_tokens: no U+FFFD, as on the stop-string path
    plain, stop = _with_and_without_stop(llm, "Write three emoji: 😀", ignore_eos=True)
    assert plain.token_ids == stop.token_ids
    assert plain.text == stop.text and not plain.text.endswith("\ufffd")
    # a token-id prompt that ends inside a character: the output completes it both ways
    tok = llm.tokenizer
    ids = tok.encode("Say:🎉", add_special_tokens=False)  # 🎉: 3 tokens
    plain, stop = _with_and_without_stop(llm, {"prompt_token_ids": ids[:-1]})
    assert plain.text == stop.text == tok.decode(ids[-3:-1] + plain.token_ids)
    # SentencePiece (Llama-2 / Mistral): the first output token keeps its leading space
    sp = LLM(str(sp_model_dir), device="cpu")
    plain, stop = _with_and_without_stop(sp, "The capital of France is")
    assert plain.text == stop.text and plain.text.startswith(" ")


def test_extra_eos_ids_stop_with_their_id(two_eos_model_dir):
    llm = LLM(str(two_eos_model_dir), device="cpu")
    assert llm.engine.eos_token_ids == (2, 30)
    plain, stop = _with_and_without_stop(llm, "The capital of France is")
    for out in (plain, stop):
        assert out.token_ids[-1] == 30 and out.finish_reason == "stop"
        # vLLM folds generation_config's other EOS ids into stop_token_ids: reported by id
        assert out.stop_reason == 30 and not out.text.endswith(".")
    # the tokenizer's EOS (2, after "2 + 2 = 4"): stop_reason None, as in vLLM
    chat = llm.chat([{"role": "user", "content": "What is 2+2? Answer with a number only."}],
                    SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert chat.token_ids[-1] == 2 and chat.finish_reason == "stop"
    assert chat.stop_reason is None and chat.text == "2 + 2 = 4"


@pytest.mark.parametrize("bad", [[5, "x"], [504.0, 3575.0], [5, 10**7], [-1], [True]])
def test_a_bad_prompt_raises_before_anything_runs(llm, bad):
    engine = llm.engine
    before = engine.stats().num_generated_tokens
    good = SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(["The capital of France is", {"prompt_token_ids": bad}, [1, 2]],
                     [good, good, good], use_tqdm=False)
    assert not engine.has_unfinished() and engine._num_penalized == 0
    llm.generate("Hello", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert engine.stats().num_generated_tokens == before + 2  # no orphan ran


@pytest.mark.parametrize("bad", [[5, 504.0], [5, True], [5, "7"], [5, np.float64(5)],
                                 [np.bool_(True)], [5, -1], [5, 10**7], "vocab"])
def test_add_request_checks_token_ids(llm, bad):
    """The engine's own check (the job runner calls it directly): a bad id raises before
    anything is added, so the request id stays free; numpy integers are ids like any other."""
    engine = llm.engine
    if bad == "vocab":
        bad = [5, engine.model.vocab_size]
    greedy = SamplingParams(temperature=0, max_tokens=3, repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"must be integers|outside the vocabulary"):
        engine.add_request("r", bad, greedy)
    assert not engine.has_unfinished() and engine._num_penalized == 0
    ids = llm.tokenizer("The capital of France is")["input_ids"]
    outs = {}
    for rid, prompt in (("r", ids), ("array", np.array(ids)), ("list", [np.int32(t) for t in ids])):
        engine.add_request(rid, prompt, greedy)
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step())
    for rid in ("array", "list"):
        assert outs[rid].prompt_token_ids == ids
        assert all(type(t) is int for t in outs[rid].prompt_token_ids)
        assert outs[rid].outputs[0].token_ids == outs["r"].outputs[0].token_ids


def test_chat_content_parts_and_template_arguments(llm):
    greedy = SamplingParams(temperature=0, max_tokens=4)
    parts = [{"type": "text", "text": "What is the capital"},
             {"type": "text", "text": "of France?"}]  # joined by a newline, as in vLLM
    as_parts = llm.chat([{"role": "user", "content": parts}], greedy, use_tqdm=False)[0]
    as_text = llm.chat([{"role": "user", "content": "What is the capital\nof France?"}], greedy,
                       use_tqdm=False)[0]
    assert as_parts.prompt == as_text.prompt
    assert as_parts.outputs[0].token_ids == as_text.outputs[0].token_ids
    with pytest.raises(ValueError, match="image_url"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 greedy, use_tqdm=False)
    partial = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    out = llm.chat(partial, greedy, use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)[0]
    assert out.prompt.endswith("Hello, I")
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(partial, greedy, use_tqdm=False, continue_final_message=True)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if shout %}!{% endif %}"
    out = llm.chat([{"role": "user", "content": "Hi"}], greedy, use_tqdm=False,
                   chat_template=template, chat_template_kwargs={"shout": True})[0]
    assert out.prompt == "Hi!"
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    listing = "{% for t in tools or [] %}[{{ t['function']['name'] }}]{% endfor %}" + template
    out = llm.chat([{"role": "user", "content": "Hi"}], greedy, use_tqdm=False,
                   chat_template=listing, tools=[tool])[0]
    assert out.prompt == "[get_weather]Hi"
    assert not llm.engine.has_unfinished()
