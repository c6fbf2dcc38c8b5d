"""The baseline in the same run: Hugging Face transformers' `model.generate_batch` (its paged,
continuous-batching path) with sdpa attention, on a random-weight model of the same shape.

It is slow, so bench.py runs it on the first 64 reviews requests with outputs capped at 128
tokens, and batchgen on the same requests in the same call. `generate_batch` has the same
signature in transformers 5.17 (the GPU machine) and 5.24 (here); the continuous-batching
config's fields differ between versions, so only the fields a version knows are passed.
"""
from __future__ import annotations

import gc
import inspect
import tempfile
import time
from dataclasses import dataclass

import torch

from shapes import Shape

Request = tuple[list[int], int]


@dataclass
class BaselineResult:
    seconds: float
    num_requests: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_wrong_lengths: int  # outputs whose length differs from the requested one
    transformers_version: str

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.seconds

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "num_requests": self.num_requests,
                "num_prompt_tokens": self.num_prompt_tokens,
                "num_output_tokens": self.num_output_tokens,
                "num_wrong_lengths": self.num_wrong_lengths,
                "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s,
                "transformers_version": self.transformers_version}


def build_hf_model(shape: Shape, device: torch.device, seed: int = 0,
                   num_layers: int | None = None):
    """A random-init transformers model of `shape` (optionally fewer layers), built directly on
    `device` in the shape's dtype, sdpa attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        shape.write_config(folder)
        config = AutoConfig.from_pretrained(folder)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def _generation_config(max_new_tokens: int):
    from transformers import GenerationConfig

    # eos -1: EOS disabled, every output runs to its cap (as `ignore_eos` does for batchgen).
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                            top_k=0, top_p=1.0, eos_token_id=-1, pad_token_id=0)


def _continuous_batching_kwargs(model) -> dict:
    """Keep sdpa (no silent switch to flash attention) where the version can be told so."""
    kwargs: dict = {}
    params = inspect.signature(model.generate_batch).parameters
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:
        return kwargs
    if "continuous_batching_config" in params:
        fields = inspect.signature(ContinuousBatchingConfig).parameters
        if "auto_switch_to_flash" in fields:
            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(auto_switch_to_flash=False)
    return kwargs


def generate_batch(model, requests: list[Request]) -> dict[int, list[int]]:
    """Runs `requests` through `model.generate_batch` with one call per distinct output length
    (generate_batch takes a single max_new_tokens); {request index: generated ids}."""
    by_length: dict[int, list[int]] = {}
    for i, (_, n) in enumerate(requests):
        by_length.setdefault(n, []).append(i)
    kwargs = _continuous_batching_kwargs(model)
    if "progress_bar" in inspect.signature(model.generate_batch).parameters:
        kwargs["progress_bar"] = False
    generated: dict[int, list[int]] = {}
    for n, indices in by_length.items():
        outputs = model.generate_batch(inputs=[list(requests[i][0]) for i in indices],
                                       generation_config=_generation_config(n), **kwargs)
        # Results come back keyed by request id, in input order.
        for i, out in zip(indices, outputs.values()):
            generated[i] = list(out.generated_tokens)
    return generated


def run_baseline(shape: Shape, requests: list[Request], device: torch.device,
                 seed: int = 0, warmup: bool = True) -> BaselineResult:
    """Builds the model, warms up on a few short requests (unless told not to: a CPU smoke run),
    times `generate_batch` over all `requests` (equal output lengths make it one call), then
    frees the model."""
    import transformers

    model = build_hf_model(shape, device, seed)
    try:
        if warmup:
            generate_batch(model, [(p, 4) for p, _ in requests[:4]])
        _synchronize(device)
        t0 = time.perf_counter()
        generated = generate_batch(model, requests)
        _synchronize(device)
        seconds = time.perf_counter() - t0
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    wrong = sum(len(generated.get(i, ())) != n for i, (_, n) in enumerate(requests))
    return BaselineResult(
        seconds=seconds, num_requests=len(requests),
        num_prompt_tokens=sum(len(p) for p, _ in requests),
        num_output_tokens=sum(len(g) for g in generated.values()),
        num_wrong_lengths=wrong, transformers_version=transformers.__version__)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
