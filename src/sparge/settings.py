"""The environment variables the library reads, with their defaults (the README's "Settings").

Each is a switch: one that is on by default is turned off only by ``0``, one that is off by
default is turned on only by ``1``. The kernels read them through :meth:`Switch.enabled`, and
``sparge info`` prints them from here, so the defaults are defined once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    """An on/off environment variable and its default."""

    name: str
    default_on: bool
    meaning: str

    def value(self) -> str:
        """The variable's value in effect: as set, else the default's ``1`` or ``0``."""
        return os.environ.get(self.name, "1" if self.default_on else "0")

    def enabled(self) -> bool:
        if self.default_on:
            return self.value() != "0"
        return self.value() == "1"

    @contextmanager
    def forced(self, on: bool) -> Iterator[None]:
        """Within the block the switch is ``on`` whatever the environment says; after it the
        variable is as it was (set to its old value, or unset)."""
        old = os.environ.get(self.name)
        os.environ[self.name] = "1" if on else "0"
        try:
            yield
        finally:
            if old is None:
                del os.environ[self.name]
            else:
                os.environ[self.name] = old


INTERPRET = Switch("TRITON_INTERPRET", False,
                   "Triton kernels run on the CPU through Triton's interpreter")
AUTOTUNE = Switch("SPARGE_AUTOTUNE", True,
                  "time the attention kernel's configurations on a shape's first call")
LAUNCH_CACHE = Switch("SPARGE_LAUNCH_CACHE", True,
                      "call compiled kernels directly after their first launch")
CUDA_GRAPHS = Switch("SPARGE_CUDA_GRAPHS", True,
                     "replay repeated short calls as CUDA graphs (sparse_attn, quantized_attn, "
                     "block_sparse_attn)")
DEPENDENT_LAUNCH = Switch("SPARGE_DEPENDENT_LAUNCH", True,
                          "on sm90 and newer, schedule each kernel of a call while the one before "
                          "it finishes (programmatic dependent launch)")
PV_TILE_SKIP = Switch("SPARGE_PV_TILE_SKIP", False,
                      "leave out the P.V product of tiles whose rows all skip")
CHECK_FINITE = Switch("SPARGE_CHECK_FINITE", False,
                      "raise when q, k or v holds NaN or an infinity (reads a flag back from the "
                      "GPU on every call)")

SWITCHES = (INTERPRET, AUTOTUNE, LAUNCH_CACHE, CUDA_GRAPHS, DEPENDENT_LAUNCH, PV_TILE_SKIP,
            CHECK_FINITE)

__all__ = ["AUTOTUNE", "CHECK_FINITE", "CUDA_GRAPHS", "DEPENDENT_LAUNCH", "INTERPRET",
           "LAUNCH_CACHE", "PV_TILE_SKIP", "SWITCHES", "Switch"]
