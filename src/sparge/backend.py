"""Which execution path a call takes, and why.

- ``triton``: the Triton kernels in :mod:`sparge.kernels`, on CUDA GPUs of compute capability 8.0
  (Ampere) or newer; also on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``) when
  asked for explicitly, which is how the kernels are tested without a GPU.
- ``reference``: plain PyTorch (:mod:`sparge.predict`, :mod:`sparge.reference`), on any device,
  Turing GPUs included. For compute capability 7.5, Triton (3.6 to 3.9, compiled offline) emits
  no tensor-core instructions, not even for FP16 products, and cannot compile the attention
  kernel's INT8 product (``bench/sass_report.py --arch 75`` fails); with the INT8 operands
  widened to FP16 it compiles to FMA loops whose tiles need 128 KB of shared memory, where
  Turing has 64 KB.

The kernels need Triton 3.4 or newer: older releases have no host-side tensor descriptors
(with 3.4 they run without programmatic dependent launch, see :mod:`sparge.kernels.launcher`).
A CUDA call with ``backend="auto"`` that cannot take the kernels warns once per reason, since
the reference path is slower than SDPA.

The PV product runs in FP8 e4m3 where the GPU has FP8 tensor cores (compute capability 8.9 and
newer) and in FP16 elsewhere, CPU included, unless the caller chooses.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import warnings

import torch

from . import settings
from .quant import PV_FP8, PV_FP16

MIN_CAPABILITY = (8, 0)
FP8_CAPABILITY = (8, 9)
MIN_TRITON = (3, 4)


def _constant_under_compile(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does (``torch.compile`` calls it
    once at trace time and uses the result as a constant), without importing ``torch._dynamo``,
    which that function does and which took 2 to 3 s of ``import sparge`` on a CPU machine. The
    marking is checked against PyTorch's own by ``tests/test_api.py``."""
    fn._dynamo_marked_constant = True
    return fn


_CAPABILITIES: dict[int, int] = {}


@_constant_under_compile
def cuda_capability(index: int) -> int:
    """Compute capability of CUDA device ``index`` as 10 * major + minor (8.9 -> 89).

    Asked of the driver once per device (a device's capability never changes), and evaluated
    once at trace time under ``torch.compile``.
    """
    if index not in _CAPABILITIES:
        major, minor = torch.cuda.get_device_capability(index)
        _CAPABILITIES[index] = 10 * major + minor
    return _CAPABILITIES[index]


def capability_of(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of a CUDA device (the current one for ``cuda``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    value = cuda_capability(index)
    return value // 10, value % 10


_TRITON_FOUND: list[bool] = []


@_constant_under_compile
def triton_installed() -> bool:
    """Whether Triton can be imported (looked up once)."""
    if not _TRITON_FOUND:
        _TRITON_FOUND.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_FOUND[0]


_TRITON_VERSION: list[str] = []


@_constant_under_compile
def triton_version() -> str:
    """The installed Triton's version string (the ``triton`` distribution, ``triton-windows``
    on Windows, or ``pytorch-triton`` with PyTorch's nightly builds), looked up once without
    importing Triton; "" if none is found."""
    if not _TRITON_VERSION:
        found = ""
        for dist in ("triton", "triton-windows", "pytorch-triton"):
            try:
                found = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        _TRITON_VERSION.append(found)
    return _TRITON_VERSION[0]


def version_tuple(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``3.6.0`` or ``3.5.0+git1a2b``; None if it
    does not start with two numbers."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return None if match is None else (int(match[1]), int(match[2]))


def interpreter_enabled() -> bool:
    return settings.INTERPRET.enabled()


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and the reason."""
    if not triton_installed():
        return False, "Triton is not installed"
    version = triton_version()
    parsed = version_tuple(version)
    if parsed is not None and parsed < MIN_TRITON:
        return False, (f"Triton {version} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the "
                       "oldest release that compiles the kernels")
    if device.type == "cuda":
        major, minor = capability_of(device)
        if (major, minor) < MIN_CAPABILITY:
            return False, (f"compute capability {major}.{minor} is below 8.0: Triton has no "
                           "tensor-core products there")
        return True, f"CUDA GPU of compute capability {major}.{minor}"
    if device.type == "cpu" and interpreter_enabled():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"no Triton kernels for device type {device.type!r}"


_WARNED: set[str] = set()


def choose_backend(requested: str, device: torch.device) -> str:
    """Resolve ``"auto"``; refuse an explicit ``"triton"`` that cannot run. A CUDA device that
    cannot run the kernels takes the reference path with a warning, once per reason."""
    if requested == "reference":
        return "reference"
    ok, why = triton_status(device)
    if requested == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run here: {why}")
        return "triton"
    if ok and device.type == "cuda":
        return "triton"
    if device.type == "cuda" and why not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(why)
        warnings.warn(f"sparge: the Triton kernels cannot run on this GPU ({why}); calls take "
                      "the PyTorch reference path, which is slower than "
                      "scaled_dot_product_attention", RuntimeWarning, stacklevel=3)
    return "reference"


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and capability_of(device) >= FP8_CAPABILITY


def choose_quant(requested: str, device: torch.device) -> str:
    """Resolve ``quant="auto"``: FP8 PV where the GPU has FP8 tensor cores, FP16 PV elsewhere."""
    if requested != "auto":
        if requested == PV_FP8 and device.type == "cuda" and not has_fp8_tensor_cores(device):
            raise RuntimeError("quant='int8_fp8' needs FP8 tensor cores (compute capability 8.9 "
                               "or newer); use quant='int8_fp16' or 'auto'")
        return requested
    return PV_FP8 if has_fp8_tensor_cores(device) else PV_FP16
