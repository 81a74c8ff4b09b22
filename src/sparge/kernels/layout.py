"""The key order of the FP8 V buffer, shared by the pre-pass (which writes it) and the attention
kernel (which reads it).

The FP8 P.V product takes P from registers. Its operand layout gives each thread four
consecutive keys of every 16, while the Q.K^T accumulator that P comes from gives each thread
two pairs eight keys apart (keys 2q, 2q + 1, 2q + 8, 2q + 9 of every 16 for the thread q of a
quad; the same on Hopper's wgmma and on the mma instructions of Ada and Blackwell). Handing P
over in the accumulator's order would cost shuffles between threads on every tile. Instead, the
kernel renames the keys: within each group of 16, key ``n = 8 j + 2 q + e`` (j, e in {0, 1},
q in 0..3) takes the slot ``4 q + 2 j + e``, so that the four keys a thread holds land in
consecutive slots, and V is stored with its keys in the same slots. The sum over keys of P.V
does not depend on their order, so the product is unchanged.

Slots only move keys within aligned groups of 16: a key block of a multiple of 16 keys occupies
the same slots as before, in another order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 16  # keys per renamed group


@triton.jit
def pv_slot(n):
    """The slot of key index n (any int tensor) in the FP8 V buffer."""
    return (n & ~15) | ((n << 1) & 12) | ((n >> 2) & 2) | (n & 1)


@triton.jit
def to_pv_order(p):
    """(M, N) -> (M, N) with column n moved to column :func:`pv_slot` (n); N a multiple of 16."""
    rows: tl.constexpr = p.shape[0]
    cols: tl.constexpr = p.shape[1]
    p = tl.reshape(p, (rows, cols // 16, 2, 4, 2))  # n = 16 g + 8 j + 2 q + e
    p = tl.permute(p, (0, 1, 3, 2, 4))  # -> 16 g + 4 q + 2 j + e
    return tl.reshape(p, (rows, cols))


def pv_slots(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 (length,): the slot of each key 0 .. length - 1 (torch twin of :func:`pv_slot`)."""
    n = torch.arange(length, device=device)
    return (n & ~15) | ((n << 1) & 12) | ((n >> 2) & 2) | (n & 1)


def fp8_v_natural(buffer: torch.Tensor, k_len: int) -> torch.Tensor:
    """The FP8 V buffer (B, Hk, D, LP), keys in slots, as (B, Hk, Lk, D) in key order (a copy)."""
    return buffer[..., pv_slots(k_len, buffer.device)].transpose(2, 3)


__all__ = ["GROUP", "fp8_v_natural", "pv_slot", "pv_slots", "to_pv_order"]
