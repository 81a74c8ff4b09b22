"""Host side of every kernel launch: integer helpers and a launch cache.

A Triton launch through ``kernel[grid](...)`` binds and specialises every argument in Python
before the driver call: for the attention kernel's 53 runtime arguments that took 52 to 86 us of
host time per launch on H100 machines, against 20 to 28 us for a direct call of the compiled
kernel (``bench/host_overhead.py``). At short lengths the host time is the call's time, so
:func:`run` calls the compiled kernel directly once a launch of the same specialisation has gone
through Triton.

The cache key holds at least everything Triton specialises a compiled kernel on: each tensor's
dtype and whether its address is a multiple of 16, each integer's value (Triton looks at its
width and whether it is 1 or a multiple of 16), each tensor descriptor's dtype, shape, strides,
block shape and padding, every constexpr and launch option, the device. A launch that differs in
any of them goes through Triton (and compiles if Triton must); so does the first launch of each
new shape. The key is a flat tuple built in one pass over the arguments: computing it must cost
less than the binding it saves.

``triton.cdiv`` and ``triton.next_power_of_2`` are device-side ``constexpr`` functions: on the
host each call costs microseconds, so the host code uses :func:`cdiv` and :func:`next_pow2`.

Programmatic dependent launch (sm90 and newer): each kernel of a call is launched with Triton's
``launch_pdl`` option and compiled with ``PDL`` (:func:`dependent_launch`), so that the GPU may
schedule its programs while the kernel before it in the stream finishes. Every such kernel
starts with :func:`wait_for_previous_kernel`: its programs wait there until the previous kernel
has completed and its writes are visible, before touching memory, then allow the next kernel to
be scheduled. What overlaps is the launch and the programs' start, never their memory accesses.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import settings
from ..backend import capability_of, version_tuple


def compiles_dependent_launch(triton_version: str) -> bool:
    """Whether Triton ``triton_version`` compiles the dependent-launch wait: from 3.5 on. Triton
    3.4 has the functions, but its compiler calls them with an argument they do not take
    (``_semantic``)."""
    return (version_tuple(triton_version) or (0, 0)) >= (3, 5)


if compiles_dependent_launch(triton.__version__):
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
else:
    gdc_launch_dependents = gdc_wait = None

MAX_ENTRIES = 4096  # launches remembered (one per kernel, specialisation and shape)
_CACHE: dict[tuple, tuple[Any, tuple]] = {}
_enabled = settings.LAUNCH_CACHE.enabled()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


_NOT_DEPENDENT = {"PDL": False}
_DEPENDENT = {"PDL": True, "launch_pdl": True}


def dependent_launch(device: torch.device) -> dict[str, bool]:
    """The launch arguments of a kernel with a ``PDL`` constexpr on ``device``: programmatic
    dependent launch on CUDA devices of compute capability 9.0 and newer (unless
    ``SPARGE_DEPENDENT_LAUNCH=0``), else none."""
    if (device.type == "cuda" and gdc_wait is not None and capability_of(device) >= (9, 0)
            and settings.DEPENDENT_LAUNCH.enabled()):
        return _DEPENDENT
    return _NOT_DEPENDENT


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL, the first step of a kernel launched by :func:`dependent_launch`: wait until the
    previous kernel in the stream has completed and its writes are visible, then let the next
    kernel's programs be scheduled (they wait in turn). Without PDL, nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _on_gpu(first: Any) -> bool:
    """Whether a launch whose first argument is ``first`` runs compiled on a GPU (the CPU
    interpreter has no compiled kernel to call)."""
    return isinstance(first, torch.Tensor) and first.is_cuda


def _key(kernel, args: tuple, meta: dict) -> tuple | None:
    """The cache key of a launch: a flat tuple, finer than Triton's specialisation (integers
    by value, tensors by dtype and 16-byte alignment, descriptors by everything but the
    address); None for an argument the cache does not handle."""
    key = [kernel, torch.cuda.current_device(), *meta.keys(), *meta.values()]
    append = key.append
    for arg in args:
        kind = type(arg)
        if kind is int:
            append(arg)
        elif kind is torch.Tensor:
            append(arg.dtype)
            append(arg.data_ptr() % 16 == 0)
        elif kind is float:
            append(float)
        elif arg is None:
            append(None)
        elif kind is bool:
            append((bool, arg))  # True == 1: kept apart from the integers
        elif kind is TensorDescriptor:
            base = arg.base
            append((base.dtype, base.data_ptr() % 16 == 0, tuple(arg.shape),
                    tuple(arg.strides), tuple(arg.block_shape), arg.padding))
        else:
            return None  # a tensor subclass, anything else: Triton's own path
    return tuple(key)


def run(kernel, grid: tuple[int, ...], *args: Any, **meta: Any):
    """``kernel[grid](*args, **meta)``, through the compiled kernel when one of the same
    specialisation has been launched before. ``args`` are the kernel's leading runtime arguments
    in order, ``meta`` its constexprs and launch options by name. Returns Triton's handle of the
    compiled kernel (``n_regs``, ``n_spills``, ``asm``)."""
    global _enabled
    if not _enabled or not _on_gpu(args[0]):
        return kernel[grid](*args, **meta)
    key = _key(kernel, args, meta)
    hit = None if key is None else _CACHE.get(key)
    if hit is None:
        handle = kernel[grid](*args, **meta)
        # the constexprs, in parameter order after the runtime arguments
        names = kernel.arg_names[len(args):]
        if key is not None and handle is not None and all(name in meta for name in names):
            if len(_CACHE) >= MAX_ENTRIES:
                del _CACHE[next(iter(_CACHE))]  # the oldest
            _CACHE[key] = (handle, tuple(meta[name] for name in names))
        return handle
    handle, constexprs = hit
    try:
        handle[(*grid, 1, 1)[:3]](*args, *constexprs)
    except Exception as error:  # noqa: BLE001 - an incompatible Triton: stop using the cache
        _enabled = False
        warnings.warn(f"sparge: direct kernel launches failed ({type(error).__name__}: "
                      f"{error}); using Triton's launch path from now on", RuntimeWarning,
                      stacklevel=2)
        return kernel[grid](*args, **meta)
    return handle


__all__ = ["MAX_ENTRIES", "cdiv", "dependent_launch", "next_pow2", "run",
           "wait_for_previous_kernel"]
