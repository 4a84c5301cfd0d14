"""Host -> device copies that do not wait for the device.

A copy from pageable host memory makes CUDA wait for everything already queued on the stream
(the host blocks until the device has drained), so a prefill prepared while a decode step runs
would lose the overlap at its first upload. Going through pinned memory with non_blocking=True
queues the copy and returns at once; the pinned buffer is kept until the copy has run.
"""
from __future__ import annotations

import numpy as np
import torch


def upload(host: torch.Tensor | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (or a nested list, as `dtype`) on `device`, queued without a host wait on CUDA."""
    pinned = device.type == "cuda"
    if isinstance(host, torch.Tensor):
        host = host.to(dtype) if dtype is not None else host
        return host.pin_memory().to(device, non_blocking=True) if pinned else host.to(device)
    return torch.tensor(host, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


# The dtypes upload_arrays takes, as torch names them.
_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.bool_): torch.bool,
           np.dtype(np.float32): torch.float32}


def upload_arrays(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays of any shapes -> each on `device` in its own dtype (int64, int32, bool or
    float32), in one copy: they are packed into one (pinned, on CUDA) byte buffer, each at an
    8-byte-aligned offset, whose device copy they are views of."""
    offsets, end = [], 0
    for a in arrays:
        if a.dtype not in _DTYPES:
            raise ValueError(f"upload_arrays takes {sorted(map(str, _DTYPES))} arrays, got {a.dtype}")
        offsets.append(end)
        end += -(-a.nbytes // 8) * 8
    host = torch.empty(end, dtype=torch.uint8, pin_memory=device.type == "cuda")
    buffer, strides = host.numpy(), []
    for a, offset in zip(arrays, offsets):
        part = buffer[offset: offset + a.nbytes].view(a.dtype).reshape(a.shape)
        part[...] = a
        strides.append([stride // a.itemsize for stride in part.strides])
    packed = host.to(device, non_blocking=device.type == "cuda")
    typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer as each dtype (offsets are 8-byte aligned)
    out = []
    for a, offset, stride in zip(arrays, offsets, strides):
        dtype = _DTYPES[a.dtype]
        if dtype not in typed:
            typed[dtype] = packed.view(dtype)
        out.append(typed[dtype].as_strided(a.shape, stride, offset // a.itemsize))
    return out


def pack(tensors: list[torch.Tensor], pin: bool) -> list[torch.Tensor]:
    """Copies of host tensors (one dtype and row shape) as back-to-back views of one buffer, pinned
    if `pin`: what `upload_cat` then takes as it is, without concatenating them again."""
    if len(tensors) < 2 or len({(t.dtype, t.shape[1:]) for t in tensors}) > 1:
        return tensors
    return list(_concatenated(tensors, pin).split([t.shape[0] for t in tensors]))


def _concatenated(tensors: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """torch.cat(tensors) written straight into a new (pinned, if `pin`) host buffer."""
    buffer = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype,
                         pin_memory=pin)
    return torch.cat(tensors, out=buffer)


def spanned(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one view covering `tensors` (any device) when they lie back to back in one buffer, in
    order (as `pack` or a split leaves them): their concatenation without a copy; None otherwise."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    row, dtype, end, storage = first.shape[1:], first.dtype, first.data_ptr(), first.untyped_storage().data_ptr()
    for t in tensors:
        if (t.data_ptr() != end or not t.is_contiguous() or t.dtype != dtype or t.shape[1:] != row
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.nbytes
    return first.as_strided((sum(t.shape[0] for t in tensors), *row), first.stride())


def upload_cat(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.cat(tensors) (host tensors, along dim 0) on `device`. Tensors that lie back to back in
    one buffer (`pack`) are not copied on the host: on the CPU they are used where they are, on
    CUDA uploaded in one copy (asynchronous when the buffer is pinned). Others are concatenated,
    on CUDA straight into a pinned buffer (one host copy where cat + upload would make two)."""
    span = spanned(tensors)
    if device.type != "cuda":
        return span if span is not None else torch.cat(tensors)
    if span is not None:
        return upload(span, device)  # pin_memory() keeps a pinned buffer as it is
    return _concatenated(tensors, pin=True).to(device, non_blocking=True)
