"""Calls replayed as CUDA graphs, where the host would otherwise set the pace.

An eager call of the pipeline issues four or five kernel launches and a few dozen tensor
operations: 0.4 to 0.8 ms of host time on H100 machines (``bench/host_overhead.py``), more than
the GPU needs below about L8192, so at those lengths a call runs at the speed of its Python. A
CUDA graph replays the same launches for the host cost of one.

A graph replays its kernels with the arguments of its capture, but a caller's q, k, v and output
are new tensors on every call. The kernels that touch them therefore read their addresses, when
compiled with ``INDIRECT``, from a small int64 device buffer (:func:`caller_pointer`, slots
:data:`Q`, :data:`K`, :data:`V`, :data:`OUT`, and :data:`MASK` for a caller's block mask, which
the lookup-table kernel reads); every other tensor of the call (the quantized copies,
statistics, the predicted mask and the lookup table) is the graph's own, in its private memory
pool. Thresholds given as numbers are filled before the capture, by the eager run that
precedes it, and kept with the graph, so that a replay runs the library's kernels alone.
Thresholds given as tensors are read by value: the graph holds its own copies, into which each
replay first copies the caller's current values (one small device copy each). A key naming
everything the launches depend on (shapes, strides, dtypes, device, stream, arguments) selects
the graph:

1. the first call of a key runs eagerly (compiling and tuning its kernels);
2. the second runs eagerly with ``INDIRECT`` kernels, then captures itself into a graph;
3. later calls write their tensors' addresses into the graph's buffer, where they differ from
   the ones it holds (a host-to-device copy), and replay it.

At most :data:`MAX_GRAPHS` keys are remembered (the oldest is dropped first, with its graph and
its memory), for calls whose graph keeps at most :data:`MAX_HELD_BYTES` (:func:`held_bytes`).
``SPARGE_CUDA_GRAPHS=0`` turns replay off.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .. import settings
from ..mask import num_blocks

# the slots of the address buffer (constexpr: the kernels read them)
Q, K, V, OUT, MASK = (tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3),
                      tl.constexpr(4))
MAX_GRAPHS = 8
# The most memory one graph may keep, as held_bytes counts it: 2^27 bytes admit L8192 at H32
# or L32768 at H8 (D128). The limit is on memory, not on work: a call that skips most blocks is
# host-bound at any length.
MAX_HELD_BYTES = 2 ** 27
# bytes per block pair (see held_bytes): the lookup table's int32 index; with a prediction also
# its float32 pooled score and its bool mask entry
_PAIR_BYTES = {None: 0, "given": 4, "predicted": 4 + 4 + 1}


@triton.jit
def caller_pointer(addresses, slot: tl.constexpr, like):
    """The address in int64 ``addresses[slot]`` as a pointer of ``like``'s type, 16-byte aligned
    (:func:`aligned` checks it before a graph is used)."""
    address = tl.load(addresses + slot)
    return tl.multiple_of(address.to(like.dtype, bitcast=True), 16)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    addresses: torch.Tensor  # int64 (4 or 5,) on the device, read by the graph's kernels
    values: tuple[torch.Tensor, ...] = ()  # the graph's copies of the caller's values
    result: Any = None  # what the captured call returned: tensors the replays write
    made: Any = None  # tensors the call made before the capture and read under it
    copied: tuple[int, ...] = ()  # the addresses last copied into ``addresses``


_SEEN = "seen"  # the key's first call ran eagerly
_EAGER = "eager"  # the key's capture failed: it runs eagerly from then on
_GRAPHS: dict[tuple, _Graph | str] = {}


def enabled() -> bool:
    return settings.CUDA_GRAPHS.enabled()


def held_bytes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, v_bytes: int,
               block_q: int, block_k: int, mask: str | None) -> int:
    """Bytes a graph of a call keeps in its memory pool, from the sizes of its largest buffers.

    q (B, Hq, Lq, D) and k, v (B, Hk, Lk, D) in HND order. The quantized copies take one byte
    per element of q and k and ``v_bytes`` per element of v (1 for FP8, 2 for FP16). Per block
    pair (b, query head, query block, key block), a given mask (``mask="given"``) adds the
    lookup table's int32 index, a predicted one (``"predicted"``) also the pooled scores
    (float32) and the mask (bool), with the blocks' float32 means; dense calls (None) add
    nothing. Scales, per-block statistics and the allocator's rounding come on top (a graph of
    the demo's call, L32768 at H8 and D128, reserved 120 MiB where this gives 108 MiB)."""
    batch, heads_q, q_len = q.shape[:3]
    pairs = batch * heads_q * num_blocks(q_len, block_q) * num_blocks(k.shape[2], block_k)
    total = q.numel() + k.numel() + v.numel() * v_bytes + _PAIR_BYTES[mask] * pairs
    if mask == "predicted":
        total += 4 * (q.numel() // block_q + k.numel() // block_k)
    return total


def aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's address is a multiple of 16 bytes (as :func:`caller_pointer`
    promises the compiler)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _pointers(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


def _write(buffer: torch.Tensor, pointers: tuple[int, ...]) -> torch.Tensor:
    """Copy ``pointers`` into the device buffer without synchronising: from pageable memory, a
    non-blocking copy is staged before ``copy_`` returns and runs in stream order (a blocking
    one would wait for the GPU)."""
    return buffer.copy_(torch.tensor(pointers, dtype=torch.int64), non_blocking=True)


def address_buffer(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """int64 (len(tensors),) on the tensors' device: their addresses, slot i for tensors[i].
    Written without synchronising (see :func:`run`)."""
    buffer = torch.empty(len(tensors), dtype=torch.int64, device=tensors[0].device)
    return _write(buffer, _pointers(tensors))


def run(key: tuple, tensors: tuple[torch.Tensor, ...],
        call: Callable[[torch.Tensor | None, tuple[torch.Tensor, ...]], Any],
        values: tuple[torch.Tensor, ...] = (), made: Any = None) -> Any:
    """Run ``call`` eagerly or as a replay of its graph (see the module docstring).

    ``tensors`` are the caller's (q, k, v, out), or (q, k, v, out, mask blocks), in slot order,
    all on one CUDA device and 16-byte aligned. ``values`` are tensors on that device that the
    call reads by value (the caller's threshold tensors). ``call(None, values)`` must compute
    the whole call with ordinary kernels; ``call(addresses, own)`` the same with ``INDIRECT``
    kernels reading the tensors' addresses from ``addresses`` and the values from ``own``
    (copies of the same shapes and dtypes), using nothing of the caller's tensors but their
    addresses and making every other tensor it uses itself. On a key's second call it runs
    twice, eagerly and then under capture: tensors that depend only on the key (filled
    constants) may be made by the first run, kept in ``made`` (a container of the caller's), and
    read by the second, which then captures no operation for them; the graph keeps ``made``.
    ``key`` must name everything ``call`` depends on but the addresses and the values'
    contents: the current stream and the values' shapes and dtypes included.

    Returns what ``call`` returns; on a replay, what the captured call returned: tensors of the
    graph's own, which the next replay overwrites (copy what is kept).
    """
    entry = _GRAPHS.get(key)
    if entry is None:
        if len(_GRAPHS) >= MAX_GRAPHS:
            _drop(next(iter(_GRAPHS)))  # the oldest
        _GRAPHS[key] = _SEEN
        return call(None, values)
    if entry is _SEEN:
        addresses = address_buffer(tensors)
        own = tuple(value.clone() for value in values)
        try:
            result = call(addresses, own)  # compiles the INDIRECT kernels outside the capture
        except Exception as error:  # noqa: BLE001 - the ordinary kernels still serve
            _GRAPHS[key] = _eager_from_now("kernels reading addresses", error)
            return call(None, values)
        entry = _GRAPHS[key] = _capture(call, addresses, own, made)
        if isinstance(entry, _Graph):
            entry.copied = _pointers(tensors)
        return result
    if entry is _EAGER:
        return call(None, values)
    pointers = _pointers(tensors)
    if pointers != entry.copied:  # the caching allocator often hands out the same addresses
        _write(entry.addresses, pointers)
        entry.copied = pointers
    for own, value in zip(entry.values, values, strict=True):
        own.copy_(value)
    entry.graph.replay()
    return entry.result


def _drop(key: tuple) -> None:
    """Forget ``key``; a graph is released once the GPU has finished its replays."""
    entry = _GRAPHS.pop(key)
    if isinstance(entry, _Graph):
        torch.cuda.synchronize(entry.addresses.device)


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` that captures run on: one per device, since PyTorch keeps
    a cuBLAS workspace per stream that the pooled scores' product uses."""
    stream = _CAPTURE_STREAMS.get(device.index)
    if stream is None:
        stream = _CAPTURE_STREAMS[device.index] = torch.cuda.Stream(device)
    return stream


def _capture(call: Callable[[torch.Tensor | None, tuple[torch.Tensor, ...]], Any],
             addresses: torch.Tensor, values: tuple[torch.Tensor, ...], made: Any
             ) -> _Graph | str:
    """``call(addresses, values)`` captured into a graph with a memory pool of its own, on a
    side stream (a capture may not run on the default stream), with what the call returned and
    ``made`` (see :func:`run`); ``_EAGER`` if the capture fails."""
    caller = torch.cuda.current_stream(addresses.device)
    side = _capture_stream(addresses.device)
    side.wait_stream(caller)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                result = call(addresses, values)
            finally:
                graph.capture_end()
    except Exception as error:  # noqa: BLE001 - the eager call still serves
        return _eager_from_now("capturing a CUDA graph", error)
    finally:
        caller.wait_stream(side)
    return _Graph(graph, addresses, values, result, made)


def _eager_from_now(step: str, error: Exception) -> str:
    """Warn that ``step`` failed with ``error``; returns ``_EAGER``, the entry of a key that runs
    eagerly from then on."""
    warnings.warn(f"sparge: {step} failed ({type(error).__name__}: {error}); this call "
                  "signature runs eagerly from now on", RuntimeWarning, stacklevel=4)
    return _EAGER


def clear() -> None:
    """Forget every key and release the graphs' memory (once their replays have finished)."""
    for key in list(_GRAPHS):
        _drop(key)


__all__ = ["K", "MASK", "MAX_GRAPHS", "MAX_HELD_BYTES", "OUT", "Q", "V", "address_buffer",
           "aligned", "caller_pointer", "clear", "enabled", "held_bytes", "run"]
