"""The one place that imports Triton: kernels modules import fine without it (their torch
references stay usable) and a Triton op raises a clear error only when it is called.

Kernels are compiled lazily, at their first launch: `triton.jit` reads TRITON_INTERPRET when
it wraps a function, so deferring it lets a test module switch the interpreter on even when
another module imported `batchgen.kernels` first."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references still work
    triton = None
    tl = None


def has_triton() -> bool:
    return triton is not None


def require_triton(op_name: str) -> None:
    if triton is None:
        raise RuntimeError(
            f"{op_name} needs Triton, which is not installed; install batchgen[gpu] "
            f"or call {op_name}_ref (the plain-torch reference) instead")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class LazyKernel:
    """`@jit` stand-in for `@triton.jit`: wraps the function on first `kernel[grid]`. A
    `@jit` function called from another one (a device helper) is wrapped with it: Triton
    looks helpers up in the caller's globals when it compiles, so they must be JIT functions
    there by then."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.pdl = options.pop("pdl", False)
        self.fn = fn
        self.options = options
        self._kernel = None

    def __getitem__(self, grid: Any) -> Any:
        if self._kernel is None:
            require_triton(self.fn.__name__)
            self._kernel = _wrap(self.fn, self.options)
        if not self.pdl:
            return self._kernel[grid]
        if pdl_enabled():
            return functools.partial(self._kernel[grid], PDL=True, launch_pdl=True)
        return functools.partial(self._kernel[grid], PDL=False)


def _wrap(fn: Callable[..., Any], options: dict[str, Any]) -> Any:
    scope = fn.__globals__
    for name in fn.__code__.co_names:
        helper = scope.get(name)
        if isinstance(helper, LazyKernel):
            if helper._kernel is None:
                helper._kernel = _wrap(helper.fn, helper.options)
            scope[name] = helper._kernel
    return triton.jit(fn, **options)


def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """`@jit` or `@jit(do_not_specialize=[...])` (options go to triton.jit). Triton compiles
    a variant per integer argument that is 1 or a multiple of 16; an argument that changes
    from step to step (a batch size, a table width) belongs in do_not_specialize, or a long
    run keeps meeting new variants and stalls ~0.5 s on each compile.

    `@jit(pdl=True)`: a kernel with a `PDL: tl.constexpr` parameter whose first statement is
    `wait_for_inputs(PDL)`; every launch passes PDL (and Triton's launch_pdl) as
    pdl_enabled() says."""
    if fn is None:
        return lambda f: LazyKernel(f, options)
    return LazyKernel(fn, options)


# Programmatic dependent launch (sm_90+): a kernel launched with it may be scheduled before
# the kernel ahead of it in the stream has finished, and waits in `wait_for_inputs` until
# that kernel's writes are visible. Its launch then overlaps the previous kernel's last wave
# instead of following it, at the ~5 boundaries a layer where the next kernel is ours
# (cuBLAS's kernels are launched plainly and wait as before): 0.2% of decode and of reviews
# on the H200 (bench/RESULTS.md, session 15). None: not decided yet (pdl_enabled decides on
# first use); set_pdl switches it (bench/ab_probe.py).
_pdl: bool | None = None


def _detect_pdl() -> bool:
    if triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("BATCHGEN_PDL", "1") == "0":
        return False
    import torch

    cuda = getattr(tl.extra, "cuda", None)
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
            and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents"))


def pdl_enabled() -> bool:
    global _pdl
    if _pdl is None:
        _pdl = _detect_pdl()
    return _pdl


def set_pdl(enabled: bool | None) -> None:
    """On, off, or None: back to detecting (BATCHGEN_PDL=0 turns it off for a process)."""
    global _pdl
    _pdl = enabled


@jit
def wait_for_inputs(PDL: tl.constexpr):
    # A PDL launch's first statement: wait for the previous kernel's writes, then let the
    # next kernel be scheduled (it waits here in turn, so it never reads ours early).
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def check_same_device(op_name: str, **tensors: Any) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op_name}: tensors on different devices: {devices}")


def check_dtype(op_name: str, name: str, tensor: Any, allowed: tuple) -> None:
    if tensor.dtype not in allowed:
        raise ValueError(f"{op_name}: {name} must have dtype in {allowed}, got {tensor.dtype}")


def check_last_dim_contiguous(op_name: str, **tensors: Any) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{op_name}: {name} must be contiguous in its last dim "
                             f"(stride {t.stride()})")
