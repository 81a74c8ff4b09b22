"""Block masks: which (query block, key block) pairs an attention call computes.

A :class:`SparseMask` is a description, not a kernel: it knows its block sizes, the sequence lengths
it was made for and whether causal masking applies inside blocks. The block-sparse kernels and the
reference path read it; it converts to a token-level mask (for checking against masked SDPA), to the
upstream lookup-table format and to FlexAttention-style index lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._constants import device_constant

SUPPORTED_BLOCK_SIZES = (64, 128)


def check_block_sizes(block_q: int, block_k: int) -> None:
    """Refuse a block size other than the int 64 or 128 (a float such as 64.0 included)."""
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if (isinstance(size, bool) or not isinstance(size, (int, torch.SymInt))
                or size not in SUPPORTED_BLOCK_SIZES):
            raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES} (an int), got "
                             f"{size!r}")


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of ``block`` rows that cover ``length`` rows (the last may be partial)."""
    return -(-length // block)


def causal_block_mask(q_len: int, k_len: int, block_q: int, block_k: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Blocks holding at least one causally valid element, top-left aligned like SDPA.

    Query ``i`` may attend key ``j`` iff ``j <= i``. Returns a bool tensor (nQ, nK).
    """
    n_q, n_k = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    last_q = torch.clamp((torch.arange(n_q, device=device) + 1) * block_q, max=q_len) - 1
    first_k = torch.arange(n_k, device=device) * block_k
    return first_k[None, :] <= last_q[:, None]


@dataclass(frozen=True)
class DeferredSparsity:
    """A mask's sparsity, its kept blocks counted on the mask's device and read back only when
    the value is asked for: ``float(x)``. It holds a 0-dim int64 tensor, not the mask."""

    kept: torch.Tensor
    total: int

    def __float__(self) -> float:
        return 1.0 - int(self.kept) / self.total


@dataclass(frozen=True)
class SparseMask:
    """A block-level attention mask.

    Attributes:
        blocks: bool tensor (B, H, nQ, nK); True where the key block is computed for the query
            block. H is the number of query heads. Causally invalid blocks are always False.
        block_q: query rows per block.
        block_k: key rows per block.
        q_len: number of query tokens Lq (nQ = ceil(Lq / block_q)).
        k_len: number of key tokens Lk (nK = ceil(Lk / block_k)).
        causal: whether element-level causal masking (top-left, like SDPA) applies inside blocks.
    """

    blocks: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    causal: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, torch.Tensor):
            raise TypeError(f"SparseMask.blocks must be a 4-D bool tensor (B, H, nQ, nK), got "
                            f"{type(self.blocks).__name__}")
        if self.blocks.dtype != torch.bool or self.blocks.dim() != 4:
            raise ValueError(
                f"SparseMask.blocks must be a 4-D bool tensor (B, H, nQ, nK), got "
                f"{self.blocks.dtype} with shape {tuple(self.blocks.shape)}")
        check_block_sizes(self.block_q, self.block_k)
        for name in ("q_len", "k_len"):
            length = getattr(self, name)
            if isinstance(length, bool) or not isinstance(length, (int, torch.SymInt)):
                raise TypeError(f"{name} must be an int, got {length!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        if self.q_len < 1 or self.k_len < 1:
            raise ValueError(f"sequence lengths must be >= 1, got Lq={self.q_len}, Lk={self.k_len}")
        expected = (num_blocks(self.q_len, self.block_q), num_blocks(self.k_len, self.block_k))
        if tuple(self.blocks.shape[2:]) != expected:
            raise ValueError(
                f"blocks has {tuple(self.blocks.shape[2:])} (nQ, nK) blocks but Lq={self.q_len}, "
                f"Lk={self.k_len} with block sizes ({self.block_q}, {self.block_k}) "
                f"need {expected}")
        if self.causal:
            sizes = (self.q_len, self.k_len, self.block_q, self.block_k)
            valid = device_constant(("causal blocks", *sizes), self.blocks.device,
                                    lambda: causal_block_mask(*sizes, self.blocks.device))
            object.__setattr__(self, "blocks", self.blocks & valid)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def _of_valid_blocks(cls, blocks: torch.Tensor, block_q: int, block_k: int, q_len: int,
                         k_len: int, causal: bool) -> SparseMask:
        """A mask around ``blocks`` known to be valid (a kernel of this package wrote them, or
        they are another mask's): of the right dtype and shape, causally invalid blocks already
        False. Nothing is checked and nothing runs on the device (the causal AND of the
        constructor is a kernel launch and its host time)."""
        mask = object.__new__(cls)
        for name, value in (("blocks", blocks), ("block_q", block_q), ("block_k", block_k),
                            ("q_len", q_len), ("k_len", k_len), ("causal", causal)):
            object.__setattr__(mask, name, value)
        return mask

    @classmethod
    def full(cls, batch: int, heads: int, q_len: int, k_len: int, block_q: int = 64,
             block_k: int = 128, causal: bool = False,
             device: torch.device | str | None = None) -> SparseMask:
        """The dense mask (every block kept; causal drops the blocks above the diagonal)."""
        blocks = torch.ones(batch, heads, num_blocks(q_len, block_q), num_blocks(k_len, block_k),
                            dtype=torch.bool, device=device)
        return cls(blocks, block_q, block_k, q_len, k_len, causal)

    # ----------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, nQ, nK)."""
        return tuple(self.blocks.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def visitable(self) -> torch.Tensor:
        """Bool (nQ, nK): the blocks the dense (or causal) computation would visit."""
        if self.causal:
            return causal_block_mask(self.q_len, self.k_len, self.block_q, self.block_k,
                                     self.device)
        return torch.ones(self.shape[2:], dtype=torch.bool, device=self.device)

    def visitable_count(self) -> int:
        """How many blocks of one (batch, head) the dense (or causal) computation would visit,
        counted on the host (no device work)."""
        if not self.causal:
            return self.shape[2] * self.shape[3]
        return int(causal_block_mask(self.q_len, self.k_len, self.block_q, self.block_k,
                                     "cpu").sum())

    def deferred_sparsity(self) -> DeferredSparsity:
        """:meth:`sparsity` counted on the mask's device without reading it back (one reduction
        launch on a GPU); ``float()`` of the result reads the count."""
        return DeferredSparsity(self.blocks.sum(), self.visitable_count() * self.shape[0]
                                * self.shape[1])

    def sparsity(self) -> float:
        """1 - kept blocks / blocks the dense (or causal) computation would visit, over all heads.

        This reads the mask back to the host (one synchronisation on a GPU).
        """
        return float(self.deferred_sparsity())

    def per_head_sparsity(self) -> torch.Tensor:
        """Float32 tensor (H,) on the mask's device: the sparsity of each head, counted over the
        batch (no readback)."""
        kept = self.blocks.sum(dim=(0, 2, 3)).float()
        return 1.0 - kept / float(self.visitable_count() * self.shape[0])

    # ----------------------------------------------------------------------------- conversions
    def to_token_mask(self) -> torch.Tensor:
        """Bool (B, H, Lq, Lk): True where query token i attends key token j.

        Materialises Lq x Lk per head: meant for checks and small inputs.
        """
        rows = self.blocks.repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        dense = rows.repeat_interleave(self.block_k, dim=3)[..., : self.k_len]
        if self.causal:
            i = torch.arange(self.q_len, device=self.device)[:, None]
            j = torch.arange(self.k_len, device=self.device)[None, :]
            dense = dense & (j <= i)
        return dense

    def kv_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FlexAttention-style index lists.

        Returns ``(counts, indices)``: int32 (B, H, nQ) kept-block counts and int32 (B, H, nQ, nK)
        kept key-block indices in ascending order, padded with zeros after ``counts``.
        """
        n_k = self.shape[3]
        positions = torch.arange(n_k, device=self.device, dtype=torch.int32)
        # Kept blocks sort first (key 0), in ascending index; dropped ones after (key n_k + j).
        order_key = torch.where(self.blocks, positions, positions + n_k)
        indices = torch.sort(order_key, dim=-1).values
        counts = self.blocks.sum(-1, dtype=torch.int32)
        indices = torch.where(positions < counts[..., None], indices, torch.zeros_like(indices))
        return counts, indices.to(torch.int32)

    def to_lut(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The upstream ``spas_sage_attn`` lookup table.

        Returns ``(lut, counts)``: int32 (B, H, nQ, nK) holding, per row, the kept key-block indices
        delta-encoded (first entry the index itself, then the step from the previous kept block),
        zero after the last one; and int32 (B, H, nQ) the number of kept blocks per row.
        """
        counts, indices = self.kv_indices()
        deltas = indices.clone()
        deltas[..., 1:] = indices[..., 1:] - indices[..., :-1]
        positions = torch.arange(self.shape[3], device=self.device)
        deltas = torch.where(positions < counts[..., None], deltas, torch.zeros_like(deltas))
        return deltas.to(torch.int32), counts

    @staticmethod
    def blocks_from_lut(lut: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`to_lut`: bool (B, H, nQ, nK) from a delta-encoded table and its counts."""
        indices = torch.cumsum(lut.long(), dim=-1)
        n_k = lut.shape[-1]
        live = torch.arange(n_k, device=lut.device) < counts[..., None]
        # Padding entries go to a spare column n_k that is dropped afterwards.
        blocks = torch.zeros(*lut.shape[:-1], n_k + 1, dtype=torch.bool, device=lut.device)
        blocks.scatter_(-1, torch.where(live, indices, n_k), True)
        blocks = blocks[..., :n_k]
        return blocks

    # ----------------------------------------------------------------------------- algebra
    def _check_compatible(self, other: SparseMask) -> None:
        mine = (self.block_q, self.block_k, self.q_len, self.k_len)
        theirs = (other.block_q, other.block_k, other.q_len, other.k_len)
        if mine != theirs:
            raise ValueError(f"masks differ in (block_q, block_k, Lq, Lk): {mine} vs {theirs}")
        if any(a != b and 1 not in (a, b) for a, b in zip(self.shape[:2], other.shape[:2],
                                                          strict=True)):
            raise ValueError(f"masks for (B, H) = {self.shape[:2]} and {other.shape[:2]} do not "
                             "broadcast (each of B and H must be equal or 1 in one of them)")

    def __or__(self, other: SparseMask) -> SparseMask:
        """Union: a block is kept if either mask keeps it (causal if both are causal)."""
        if not isinstance(other, SparseMask):
            return NotImplemented
        self._check_compatible(other)
        return SparseMask(self.blocks | other.blocks, self.block_q, self.block_k, self.q_len,
                          self.k_len, self.causal and other.causal)

    def __and__(self, other: SparseMask) -> SparseMask:
        """Intersection: a block is kept if both masks keep it (causal if either is causal)."""
        if not isinstance(other, SparseMask):
            return NotImplemented
        self._check_compatible(other)
        return SparseMask(self.blocks & other.blocks, self.block_q, self.block_k, self.q_len,
                          self.k_len, self.causal or other.causal)

    def expand(self, batch: int, heads: int) -> SparseMask:
        """Broadcast a mask with batch or head dimension 1 to (batch, heads)."""
        b, h = self.shape[:2]
        if (b not in (1, batch)) or (h not in (1, heads)):
            raise ValueError(f"cannot broadcast a mask for (B={b}, H={h}) to "
                             f"(B={batch}, H={heads})")
        if (b, h) == (batch, heads):
            return self
        # a view of blocks that are causally valid already: no second AND on the device
        return SparseMask._of_valid_blocks(self.blocks.expand(batch, heads, *self.shape[2:]),
                                            self.block_q, self.block_k, self.q_len, self.k_len,
                                            self.causal)

    def __repr__(self) -> str:
        b, h, n_q, n_k = self.shape
        return (f"SparseMask(B={b}, H={h}, blocks={n_q}x{n_k} of {self.block_q}x{self.block_k}, "
                f"Lq={self.q_len}, Lk={self.k_len}, causal={self.causal})")


def dense_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                causal: bool = False) -> float:
    """Dense-equivalent attention FLOPs: 4 B H Lq Lk D, halved for causal."""
    flops = 4.0 * batch * heads * q_len * k_len * head_dim
    return flops / 2 if causal else flops


__all__ = ["DeferredSparsity", "SparseMask", "causal_block_mask", "check_block_sizes", "num_blocks",
           "dense_flops", "SUPPORTED_BLOCK_SIZES"]
