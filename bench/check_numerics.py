"""Numerics check at the model level: a random-init transformers model's weights loaded into
batchgen's model, logits compared for a varlen prefill batch and one decode step over the
paged KV cache. No engine, no sampling: the ForwardContext is built here by hand (contiguous
blocks per request), so a mismatch points at the model, its layers or its kernels. The prefill
step runs the MLPs fused (batchgen.kernels.gate_up_silu) where the model can, as the engine's
big steps do (gate_up_silu.pays_off); the decode step runs them on cuBLAS and silu_and_mul.
"""
from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass

import torch

from baseline_hf import build_hf_model
from shapes import Shape

# (cosine at least, relative max error at most) per dtype.
_TOLERANCES = {"float32": (0.99999, 1e-3), "bfloat16": (0.999, 5e-2), "float16": (0.9995, 2e-2)}


@dataclass
class LogitsDiff:
    max_abs_diff: float
    max_abs_ref: float
    cosine: float
    argmax_agreement: float  # fraction of positions where both pick the same token

    @property
    def relative_error(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-12)

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "max_abs_ref": self.max_abs_ref,
                "relative_error": self.relative_error, "cosine": self.cosine,
                "argmax_agreement": self.argmax_agreement}


@dataclass
class NumericsResult:
    prefill: LogitsDiff
    decode: LogitsDiff
    dtype: str

    @property
    def is_close(self) -> bool:
        min_cosine, max_rel = _TOLERANCES[self.dtype]
        return all(d.cosine >= min_cosine and d.relative_error <= max_rel
                   for d in (self.prefill, self.decode))

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "is_close": self.is_close,
                "prefill": self.prefill.as_dict(), "decode": self.decode.as_dict()}


def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> LogitsDiff:
    # ours, ref: [N, vocab]
    ours, ref = ours.float(), ref.float()
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0)
    return LogitsDiff(
        max_abs_diff=(ours - ref).abs().max().item(), max_abs_ref=ref.abs().max().item(),
        cosine=cosine.item(),
        argmax_agreement=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item())


def _context(prompt_lens: list[int], query_lens: list[int], kv_caches, block_size: int,
             blocks_per_req: int, device: torch.device):
    """The ForwardContext of a step where request b computes its last query_lens[b] positions of
    prompt_lens[b]; request b owns blocks 1 + b * blocks_per_req onwards (block 0 unused)."""
    from batchgen.layers.context import ForwardContext

    num_reqs = len(prompt_lens)
    tables = torch.tensor([[1 + b * blocks_per_req + j for j in range(blocks_per_req)]
                           for b in range(num_reqs)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n - q, n) for n, q in zip(prompt_lens, query_lens)])
    owner = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(query_lens))
    slots = tables[owner, positions // block_size].long() * block_size + positions % block_size
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)
    ctx = ForwardContext(
        query_start_loc=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(prompt_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device), slot_mapping=slots.to(device), kv_caches=kv_caches,
        max_query_len=max(query_lens), max_seq_len=max(prompt_lens),
        is_decode_only=max(query_lens) == 1)
    return ctx, positions.to(device)


@torch.inference_mode()
def check_numerics(shape: Shape, device: torch.device, num_layers: int | None = 4,
                   prompt_lens: tuple[int, ...] = (37, 128, 201), block_size: int = 16,
                   seed: int = 0) -> NumericsResult:
    """Prefill of len(prompt_lens) random prompts, then one decode token each; batchgen's
    logits against transformers' (one unpadded forward per request over prompt + next)."""
    from batchgen.models.loader import load_hf_config, load_model

    dtype = getattr(torch, shape.dtype)
    hf = build_hf_model(shape, device, seed, num_layers=num_layers)
    with tempfile.TemporaryDirectory() as folder:
        shape.write_config(folder)
        config = load_hf_config(folder)
    config.num_hidden_layers = hf.config.num_hidden_layers
    ours = load_model(None, config, dtype=dtype, device=device, load_format="dummy", seed=seed)
    ours.load_weights(hf.state_dict().items())

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, shape.vocab_size, (n + 1,), generator=gen) for n in prompt_lens]
    ref = [hf(input_ids=p[None].to(device)).logits[0] for p in prompts]  # [n + 1, vocab] each

    blocks_per_req = -(-(max(prompt_lens) + 1) // block_size)
    num_blocks = 1 + len(prompt_lens) * blocks_per_req
    kv_caches = [(torch.zeros(num_blocks, block_size, shape.num_kv_heads, shape.head_dim,
                              dtype=dtype, device=device),
                  torch.zeros(num_blocks, block_size, shape.num_kv_heads, shape.head_dim,
                              dtype=dtype, device=device))
                 for _ in range(config.num_hidden_layers)]

    lens = list(prompt_lens)
    ctx, positions = _context(lens, lens, kv_caches, block_size, blocks_per_req, device)
    ids = torch.cat([p[:-1] for p in prompts]).to(device)
    ctx.fused_mlp = device.type == "cuda" and ours.can_fuse_mlp()
    prefill = ours.compute_logits(ours(ids, positions, ctx))  # [sum(lens), vocab]

    lens1 = [n + 1 for n in lens]
    ctx, positions = _context(lens1, [1] * len(lens), kv_caches, block_size, blocks_per_req,
                              device)
    ids = torch.stack([p[-1] for p in prompts]).to(device)
    decode = ours.compute_logits(ours(ids, positions, ctx))  # [B, vocab]

    result = NumericsResult(
        prefill=compare_logits(prefill, torch.cat([r[:-1] for r in ref])),
        decode=compare_logits(decode, torch.stack([r[-1] for r in ref])), dtype=shape.dtype)
    del hf, ours, kv_caches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
