"""EngineConfig: everything the engine needs to start; it validates itself."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# CPU defaults: a 2-core laptop or CI box; large enough for batching to pay, small enough
# that one step stays under a second with a 135M model in fp32.
CPU_MAX_NUM_SEQS = 64
CPU_MAX_NUM_BATCHED_TOKENS = 2048
CPU_KV_CACHE_MEMORY = 2 * 1024**3
# CUDA defaults: vLLM's on the H200 (bounded by the KV pool when it holds fewer).
CUDA_MAX_NUM_SEQS = 1024
CUDA_MAX_NUM_BATCHED_TOKENS = 16384

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    load_format: str = "auto"  # "auto" | "dummy" (seeded random weights from config.json)
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False  # no CUDA graphs
    # Decode steps read a prompt prefix every running request shares once for the batch
    # when it pays (batchgen.engine.input_batch); True always reads it per request.
    disable_cascade_attn: bool = False
    # CUDA: runs of fresh prompts of one length are attended by cuDNN's fused attention
    # (batchgen.layers.dense_attention); True keeps every request on the paged kernels.
    disable_dense_attn: bool = False
    # CUDA (Hopper+): steps (decode graphs included) of sizes where gate_up_silu.pays_off
    # run the MLP's gate/up projection and SwiGLU as one Triton GEMM; True keeps cuBLAS and
    # silu_and_mul.
    disable_fused_mlp: bool = False
    # Schedule and launch step n+1 while the device runs step n (None: on for CUDA).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet: "
                "batchgen runs one engine per GPU (use --data-parallel or Slurm arrays)")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' asked for, but torch sees no CUDA GPU")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks",
                     "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.max_num_seqs is None:
            self.max_num_seqs = CUDA_MAX_NUM_SEQS if self.is_cuda else CPU_MAX_NUM_SEQS
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = (
                CUDA_MAX_NUM_BATCHED_TOKENS if self.is_cuda else CPU_MAX_NUM_BATCHED_TOKENS)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self, config_dtype: torch.dtype | None) -> torch.dtype:
        """'auto' = fp32 on CPU, the checkpoint's fp16/bf16 on CUDA (bf16 if it says fp32)."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if not self.is_cuda:
            return torch.float32
        if config_dtype in (torch.float16, torch.bfloat16):
            return config_dtype
        return torch.bfloat16
