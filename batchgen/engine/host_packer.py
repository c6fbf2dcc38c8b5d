"""HostPacker: host arrays of one dtype sent to the device in one copy, from one (pinned)
staging buffer, and handed back as device views."""
from __future__ import annotations

import numpy as np
import torch


# Every segment starts on a 16-byte boundary: Triton compiles a kernel variant per pointer
# alignment, so a segment whose offset followed the batch size would compile a second one.
ALIGN_BYTES = 16


class HostPacker:
    """Concatenates named host segments of one dtype; `send` copies them to the device at
    once and hands back device views by name (flat; callers reshape)."""

    def __init__(self, dtype: torch.dtype, np_dtype) -> None:
        self.dtype = dtype
        self.np_dtype = np_dtype
        self._align = max(1, ALIGN_BYTES // np.dtype(np_dtype).itemsize)
        self._parts: list[np.ndarray] = []
        self._spans: dict[str, tuple[int, int]] = {}
        self._size = 0

    def add(self, name: str, values) -> None:
        if isinstance(values, torch.Tensor):
            values = values.numpy()
        a = np.asarray(values, dtype=self.np_dtype).reshape(-1)
        pad = -self._size % self._align
        if pad:
            self._parts.append(np.zeros(pad, dtype=self.np_dtype))
            self._size += pad
        self._parts.append(a)
        self._spans[name] = (self._size, self._size + a.size)
        self._size += a.size

    def send(self, device, pin_memory: bool) -> dict[str, torch.Tensor]:
        on_cpu = torch.device(device).type == "cpu"
        # Concatenate straight into the staging buffer: one host copy, one transfer. A fresh
        # buffer from torch's caching host allocator each time: it is not reused before its
        # copy has run (the host may run a step ahead of the device).
        host = torch.empty(self._size, dtype=self.dtype, pin_memory=pin_memory and not on_cpu)
        if self._parts:
            np.concatenate(self._parts, out=host.numpy())
        if not on_cpu:
            host = host.to(device, non_blocking=True)
        return {name: host[a:b] for name, (a, b) in self._spans.items()}


def send_arrays(device, pin_memory: bool, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Arrays of one dtype -> device tensors of their shapes, in one copy."""
    packer = HostPacker(torch.from_numpy(arrays[0][:0]).dtype, arrays[0].dtype)
    for i, a in enumerate(arrays):
        packer.add(str(i), a)
    views = packer.send(device, pin_memory)
    return [views[str(i)].view(a.shape) for i, a in enumerate(arrays)]
