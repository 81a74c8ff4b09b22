"""NaN and infinities in q, k or v reach the output.

Wherever SDPA's output would be non-finite over the key blocks a call attends, sparge's is too.
The quantized modes spread a non-finite input further, through the scale it enters:

- q: every row of its query block (one INT8 scale per block of rows);
- k: every row of the query heads that read its key head (K is smoothed by its channel mean over
  all tokens, so every key block of that head holds the value);
- v: its channel in every row of those heads, in the FP8 mode (one V scale per channel).

In every mode a value of v also reaches its channel in all rows of each query block that computes
its key block, the rows that causal masking hides it from included (P.V on the tensor cores
multiplies it by their zero weights). Every other output stays finite. The predictor keeps every
key block for a query block whose pooled scores are not finite, so the attention meets the value
wherever SDPA would.

The cases run on the reference path (CPU), through Triton's interpreter (CPU, one child process,
fewer cases) and on a GPU at larger shapes (a third of the cases, chosen so that every call
meets every tensor, mode and value). Each case draws fresh inputs and a fresh position.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import sparge
from conftest import run_interpreted
from sparge import settings

MODES = ("none", "int8_fp16", "int8_fp8")
VALUES = (math.nan, math.inf, -math.inf)
CALLS = ("sparse_attn", "quantized_attn", "block_sparse_attn")


def sdpa_non_finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor) -> torch.Tensor:
    """Bool (B, Hq, Lq, D): where attention over the ``allowed`` (B, Hq, Lq, Lk) keys is
    non-finite, as SDPA's flash and cuDNN kernels make it (keys outside the mask take no part).

    A row is non-finite when one of its allowed scores is NaN or +inf (the softmax then holds NaN);
    a channel of a row when one of its allowed keys has a non-finite value there. Positions are
    chosen so that no row has only -inf scores (SDPA: NaN; sparge: a row without keys, zero)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(-1, -2)
    rows = ((scores.isnan() | (scores == math.inf)) & allowed).any(dim=-1)
    channels = (allowed.double() @ (~v.isfinite()).double()) > 0
    return rows[..., None] | channels


def tolerated_spread(tensor: str, where: tuple, mode: str, allowed: torch.Tensor, dim: int,
                     group: int, block_q: int, block_k: int) -> torch.Tensor:
    """Bool (B, Hq, Lq, D) on the CPU: the outputs sparge may make non-finite beyond SDPA's, the
    quantized modes' spread of the module docstring and, for v in every mode, its channel in
    the rows of each query block that computes the value's key block: P.V on the tensor cores
    multiplies the value by the zero weight of a row that the causal mask hides it from."""
    b, h, t, c = where
    batch, heads_q, q_len, _ = allowed.shape
    spread = torch.zeros(batch, heads_q, q_len, dim, dtype=torch.bool)
    heads = slice(h * group, (h + 1) * group)
    if tensor == "q":
        if mode != "none":
            first = t // block_q * block_q
            spread[b, h, first:first + block_q] = True
    elif tensor == "k":
        if mode != "none":
            spread[b, heads] = True
    elif mode == "int8_fp8":
        spread[b, heads, :, c] = True
    else:
        first = t // block_k * block_k
        meets = allowed[b, heads, :, first:first + block_k].any(dim=-1).cpu()  # (group, Lq)
        n_q = -(-q_len // block_q)
        meets = torch.nn.functional.pad(meets, (0, n_q * block_q - q_len))
        tiles = meets.view(group, n_q, block_q).any(dim=-1)
        spread[b, heads, :, c] = tiles.repeat_interleave(block_q, dim=1)[:, :q_len]
    return spread


def check_case(*, device: str, backend: str, call: str, tensor: str, value: float, mode: str,
               causal: bool, shape: tuple, gen: random.Random) -> None:
    """One call with one non-finite element; asserts the pattern of the module docstring."""
    batch, heads_q, heads_k, q_len, k_len, dim = shape
    block_q, block_k = gen.choice([64, 128]), gen.choice([64, 128])
    seed = gen.randrange(2**31)
    tgen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads_q, q_len, dim, generator=tgen, device=device, dtype=torch.float16)
    k, v = (torch.randn(batch, heads_k, k_len, dim, generator=tgen, device=device,
                        dtype=torch.float16) for _ in range(2))
    # q, k: in the second half, where every row it meets has scores of both signs (a key that
    # causal masking hides from every query excluded); v: in key block 0, which the selection
    # below always keeps
    length = q_len if tensor == "q" else min(q_len, k_len) if causal else k_len
    token = gen.randrange(64) if tensor == "v" else gen.randrange(length // 2, length)
    where = (gen.randrange(batch), gen.randrange(heads_q if tensor == "q" else heads_k), token,
             gen.randrange(dim))
    dict(q=q, k=k, v=v)[tensor][where] = value

    kw = dict(is_causal=causal, quant=mode, backend=backend, block_q=block_q, block_k=block_k)
    if call == "sparse_attn":
        # a selection that drops blocks: only the rule for non-finite scores keeps them all
        out, stats = sparge.sparse_attn(q, k, v, sim_threshold=-1.0, topk=0.3,
                                        attention_sink=True, return_stats=True, **kw)
        allowed = stats.mask.to_token_mask()
    elif call == "quantized_attn":
        out = sparge.quantized_attn(q, k, v, **kw)
        allowed = sparge.SparseMask.full(batch, heads_q, q_len, k_len, block_q, block_k,
                                         causal=causal, device=device).to_token_mask()
    else:
        blocks = torch.rand(batch, heads_q, -(-q_len // block_q), -(-k_len // block_k),
                            generator=tgen, device=device) < 0.6
        if tensor == "q":  # the element's query block keeps every key block
            blocks[where[0], where[1], where[2] // block_q] = True
        else:  # and every query block the element's key block
            blocks[where[0], where[1] * (heads_q // heads_k):, :, where[2] // block_k] = True
        mask = sparge.SparseMask(blocks, block_q, block_k, q_len, k_len, causal)
        out = sparge.block_sparse_attn(q, k, v, mask, **kw)
        allowed = mask.to_token_mask()

    what = (f"{call} {mode} causal={causal} {tensor}{list(where)} = {value} seed {seed} "
            f"blocks {block_q}x{block_k}")
    got = ~out.isfinite().cpu()
    must = sdpa_non_finite(q, k, v, allowed).cpu()
    may = must | tolerated_spread(tensor, where, mode, allowed, dim, heads_q // heads_k, block_q,
                                  block_k)
    assert must.any(), what  # the case exercises something
    assert not (must & ~got).any(), f"{what}: {int((must & ~got).sum())} outputs lost it"
    assert not (got & ~may).any(), f"{what}: {int((got & ~may).sum())} outputs too many"


def run_cases(device: str, backend: str, shape: tuple, cases: list[tuple]) -> None:
    """check_case for each (call, tensor, value, mode, causal) of ``cases``."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"random seed: {seed}")
    gen = random.Random(seed)
    for call, tensor, value, mode, causal in cases:
        check_case(device=device, backend=backend, call=call, tensor=tensor, value=value,
                   mode=mode, causal=causal, shape=shape, gen=gen)


EVERY_CASE = list(itertools.product(CALLS, "qkv", VALUES, MODES, (False, True)))


@pytest.mark.parametrize("tensor", "qkv")
def test_reference_path_propagates_nan_and_infinities(tensor: str) -> None:
    run_cases("cpu", "reference", (2, 4, 2, 300, 280, 32),
              [case for case in EVERY_CASE if case[1] == tensor])


def case_interpreted_kernels() -> None:
    """The kernels through the interpreter: each tensor, value and mode once, the calls and
    causal masking taking turns. Not q and k in the FP8 mode: the interpreter converts a NaN
    to FP8 as 384, and reads FP8 NaN as 480 (the GPU keeps NaN), so a NaN in P is lost there."""
    cases = [(CALLS[i % 3], tensor, value, mode, i % 2 == 1) for i, (tensor, value, mode)
             in enumerate(itertools.product("qkv", (math.nan, math.inf), MODES))
             if tensor == "v" or mode != "int8_fp8"]
    run_cases("cpu", "triton", (1, 2, 1, 150, 200, 32), cases)


def test_interpreted_kernels_propagate_nan_and_infinities() -> None:
    run_interpreted(__file__, "case_interpreted_kernels")


# Every tensor, value, mode and causal setting, and every call with each tensor, mode and
# causal setting: the value picks the call, so that each call meets each value too (54 cases)
GPU_CASES = [(CALLS[(VALUES.index(value) + MODES.index(mode)) % 3], tensor, value, mode, causal)
             for tensor, value, mode, causal
             in itertools.product("qkv", VALUES, MODES, (False, True))]


def test_gpu_cases_cover_every_call_with_every_tensor_mode_and_causal_setting() -> None:
    assert len(GPU_CASES) == 54
    assert {(c, t, m, causal) for c, t, _, m, causal in GPU_CASES} == {
        (c, t, m, causal) for c, t, _, m, causal in EVERY_CASE}
    assert {(c, str(v)) for c, _, v, _, _ in GPU_CASES} == {(c, str(v)) for c, _, v, _, _
                                                             in EVERY_CASE}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_propagates_nan_and_infinities(monkeypatch: pytest.MonkeyPatch) -> None:
    # each attention signature on its first candidate configuration, without timing the others
    # (a compilation each); every candidate's arithmetic is tested in test_kernels_attention
    monkeypatch.setenv(settings.AUTOTUNE.name, "0")
    run_cases("cuda", "triton", (1, 8, 2, 1500, 1300, 128), GPU_CASES)
