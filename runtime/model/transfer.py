"""Host -> device copies that do not wait for the device.

A copy from pageable host memory makes CUDA wait for everything already queued on the stream
(the host blocks until the device has drained), so a prefill prepared while a decode step runs
would lose the overlap at its first upload. Going through pinned memory with non_blocking=True
queues the copy and returns at once; the pinned buffer is kept until the copy has run.
"""
from __future__ import annotations

import torch


def upload(host: torch.Tensor | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (or a nested list, as `dtype`) on `device`, queued without a host wait on CUDA."""
    pinned = device.type == "cuda"
    if isinstance(host, torch.Tensor):
        host = host.to(dtype) if dtype is not None else host
        return host.pin_memory().to(device, non_blocking=True) if pinned else host.to(device)
    return torch.tensor(host, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)
