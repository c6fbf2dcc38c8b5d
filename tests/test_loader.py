"""Finding models, reading their config files, and loading weights from safetensors."""
from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import save_file

from batchgen.models import loader
from batchgen.models.loader import (load_eos_token_ids, load_generation_defaults, load_hf_config,
                                    load_model, load_tokenizer, resolve_model)
from batchgen.models.registry import attention_window, get_model_spec, supported_architectures

CPU = torch.device("cpu")
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_hf_model():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**TINY, architectures=["Qwen2ForCausalLM"])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_hf_model):
    path = tmp_path_factory.mktemp("sharded")
    tiny_hf_model.save_pretrained(path, max_shard_size="20KB")
    return path


def _ours_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sharded_checkpoint_loads_every_weight(sharded_dir, tiny_hf_model):
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    model = load_model(sharded_dir, load_hf_config(sharded_dir), dtype=torch.float32, device=CPU)
    hf = tiny_hf_model.state_dict()
    attn = model.model.layers[1].self_attn
    qkv = torch.cat([hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    torch.testing.assert_close(attn.qkv_proj.weight, qkv, rtol=0, atol=0)
    torch.testing.assert_close(attn.qkv_proj.bias, torch.cat(
        [hf[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]), rtol=0, atol=0)
    gate_up = torch.cat([hf["model.layers.1.mlp.gate_proj.weight"],
                         hf["model.layers.1.mlp.up_proj.weight"]])
    torch.testing.assert_close(model.model.layers[1].mlp.gate_up_proj.weight, gate_up,
                               rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, hf["lm_head.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_weights_are_converted_to_the_requested_dtype(sharded_dir, tiny_hf_model):
    model = load_model(sharded_dir, load_hf_config(sharded_dir), dtype=torch.bfloat16, device=CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = tiny_hf_model.state_dict()["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(model.model.norm.weight, want)
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert model.model.rotary_emb.cos_sin_cache.device == CPU


def _write_single_file(path, tensors, config):
    path.mkdir()
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def test_consolidated_copy_beside_model_safetensors_is_skipped(tmp_path, tiny_hf_model):
    path = _write_single_file(tmp_path / "m", tiny_hf_model.state_dict(), tiny_hf_model.config)
    save_file({"tok_embeddings.weight": torch.zeros(96, 32)}, str(path / "consolidated.safetensors"))
    assert loader.safetensors_files(path) == [path / "model.safetensors"]
    load_model(path, load_hf_config(path), dtype=torch.float32, device=CPU)


def test_missing_weight_is_a_clear_error(tmp_path, tiny_hf_model):
    state = dict(tiny_hf_model.state_dict())
    del state["model.layers.0.self_attn.k_proj.weight"]
    path = _write_single_file(tmp_path / "m", state, tiny_hf_model.config)
    with pytest.raises(ValueError, match=r"1 missing weight.*qkv_proj\.weight\[k\]"):
        load_model(path, load_hf_config(path), dtype=torch.float32, device=CPU)


def test_unexpected_weight_is_a_clear_error(tmp_path, tiny_hf_model):
    state = dict(tiny_hf_model.state_dict())
    state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # ignored
    path = _write_single_file(tmp_path / "m", state, tiny_hf_model.config)
    with pytest.raises(ValueError, match=r"0 missing.*1 unexpected.*extra_proj"):
        load_model(path, load_hf_config(path), dtype=torch.float32, device=CPU)


def test_shape_mismatch_is_a_clear_error(tmp_path, tiny_hf_model):
    state = dict(tiny_hf_model.state_dict())
    state["model.norm.weight"] = torch.ones(31)
    path = _write_single_file(tmp_path / "m", state, tiny_hf_model.config)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(31,\).*\(32,\)"):
        load_model(path, load_hf_config(path), dtype=torch.float32, device=CPU)


def test_pickle_only_folder_is_refused(tmp_path, tiny_hf_model):
    tiny_hf_model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        load_model(tmp_path, load_hf_config(tmp_path), dtype=torch.float32, device=CPU)


def test_unknown_architecture_lists_the_supported():
    config = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, "
                                         "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        get_model_spec(config)
    assert supported_architectures() == [
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def test_dummy_load_is_seeded_and_reads_only_the_config(tmp_path, tiny_hf_model):
    tiny_hf_model.config.save_pretrained(tmp_path)  # no weights at all
    config = load_hf_config(tmp_path)

    def dummy(seed):
        return load_model(tmp_path, config, dtype=torch.float32, device=CPU,
                          load_format="dummy", seed=seed)

    first, again, other = _ours_state(dummy(3)), _ours_state(dummy(3)), _ours_state(dummy(4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert torch.equal(first["model.norm.weight"], torch.ones(32))
    assert torch.equal(first["model.layers.0.self_attn.qkv_proj.bias"], torch.zeros(64))
    std = first["model.layers.0.mlp.gate_up_proj.weight"].std().item()
    assert 0.015 < std < 0.025


def test_bad_load_format_is_refused(tmp_path, tiny_hf_model):
    with pytest.raises(ValueError, match="load_format"):
        load_model(tmp_path, tiny_hf_model.config, dtype=torch.float32, device=CPU,
                   load_format="pt")


@pytest.mark.parametrize("url", ["s3://bucket/model", "https://huggingface.co/org/name",
                                 "http://host/model"])
def test_remote_urls_are_not_supported(url):
    with pytest.raises(ValueError, match="not supported"):
        resolve_model(url)


def test_hub_id_resolves_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model("batchgen-test/not-cached")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_tokenizer("batchgen-test/not-cached")
    # A snapshot laid out as huggingface_hub stores it.
    repo = tmp_path / "models--batchgen-test--cached"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model("batchgen-test/cached") == snapshot


def test_local_folders_and_files(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(empty)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model(str(tmp_path / "missing"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    monkeypatch.setattr(loader.gguf, "converted_gguf_path", lambda p: tmp_path / "converted")
    assert resolve_model(gguf_file) == tmp_path / "converted"
    monkeypatch.setattr(loader.gguf, "default_model_path", lambda: tmp_path / "default")
    assert resolve_model(None) == tmp_path / "default"


def test_generation_defaults_and_eos_ids(tmp_path, tiny_hf_model):
    config = transformers.LlamaConfig(**TINY, eos_token_id=2)
    assert load_generation_defaults(tmp_path) == {}
    assert load_eos_token_ids(tmp_path, config) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "temperature": 0.6, "top_p": 0.9, "top_k": None, "max_new_tokens": 64,
        "repetition_penalty": 1.1, "do_sample": True, "eos_token_id": [7, 2]}))
    assert load_generation_defaults(tmp_path) == {
        "temperature": 0.6, "top_p": 0.9, "max_tokens": 64, "repetition_penalty": 1.1}
    assert load_eos_token_ids(tmp_path, config) == (2, 7)


def test_real_model_config_tokenizer_and_eos(smol_model_dir):
    config = load_hf_config(smol_model_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert load_eos_token_ids(smol_model_dir, config)[0] == 2
    tokenizer = load_tokenizer(smol_model_dir)
    assert tokenizer.is_fast
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.parametrize("config,window", [
    (transformers.MistralConfig(sliding_window=4096), 4096),  # Mistral 7B v0.1
    (transformers.MistralConfig(sliding_window=None), None),  # v0.2 and later
    (transformers.Qwen2Config(sliding_window=4096, use_sliding_window=False), None),
    (transformers.Qwen2Config(sliding_window=64, use_sliding_window=True, max_window_layers=1,
                              num_hidden_layers=2), 64),
    (transformers.LlamaConfig(), None),
])
def test_attention_window(config, window):
    assert attention_window(config) == window


def test_a_sliding_window_caps_max_model_len(tmp_path):
    # Full attention matches a sliding-window model only while sequences fit the window.
    from batchgen import LLM

    config = transformers.MistralConfig(**TINY, sliding_window=16,
                                        architectures=["MistralForCausalLM"])
    config.save_pretrained(tmp_path)
    options = dict(device="cpu", load_format="dummy", skip_tokenizer_init=True,
                   kv_cache_memory=2**20)
    assert LLM(str(tmp_path), **options).engine.max_model_len == 16
    assert LLM(str(tmp_path), max_model_len=12, **options).engine.max_model_len == 12
    with pytest.raises(ValueError, match="sliding attention window \\(16\\)"):
        LLM(str(tmp_path), max_model_len=32, **options)
