"""Small device tensors that depend only on a call's sizes or hyperparameters (a threshold filled
per head, the causally valid blocks of a shape), made once and reused.

On a GPU every tensor operation costs host time (about 8 us for a fill on an H100 machine), and
at short lengths host time is a call's time. A constant is kept per (key, device) for calls on
the device's default stream, where a later call is ordered after the operations that made it.
Nothing is kept for calls on other streams: ``torch.compile(mode="reduce-overhead")`` warms its
CUDA graphs up on a stream of its own, with every allocation in the graphs' private memory pool,
and fails when a tensor made there outlives the call. Nothing is kept while a CUDA graph is being
captured (a tensor made during capture holds its values only when the graph replays) or under
``torch.compile`` tracing, nor on the CPU, where the operations are cheap. The cache holds at most
:data:`MAX_ENTRIES` tensors, dropping the oldest first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MAX_ENTRIES = 256
_CACHE: dict[tuple, torch.Tensor] = {}
_DEFAULT_STREAMS: dict[int, int] = {}


def current_stream(index: int) -> int:
    """The current stream's handle on device ``index`` (the raw query Triton's launcher uses
    too, without building a ``torch.cuda.Stream``)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def _default_stream(index: int) -> int:
    """The handle of device ``index``'s default stream (queried once)."""
    handle = _DEFAULT_STREAMS.get(index)
    if handle is None:
        handle = _DEFAULT_STREAMS[index] = torch.cuda.default_stream(index).cuda_stream
    return handle


def device_constant(key: tuple, device: torch.device,
                    make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, a tensor on ``device`` that callers only read, reused for equal ``key``s on
    the device's default stream.

    ``key`` must hold everything the tensor depends on but the device.
    """
    if device.type != "cuda" or torch.compiler.is_compiling() \
            or torch.cuda.is_current_stream_capturing():
        return make()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if current_stream(index) != _default_stream(index):
        return make()
    full_key = (key, index)
    value = _CACHE.get(full_key)
    if value is None:
        if len(_CACHE) >= MAX_ENTRIES:
            del _CACHE[next(iter(_CACHE))]
        value = _CACHE[full_key] = make()
    return value


__all__ = ["MAX_ENTRIES", "current_stream", "device_constant"]
