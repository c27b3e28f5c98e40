"""lemo_compile.kernels.oracle on CPU: block max scores and block attention mass.

The twins (on chunks of query rows) and the Triton kernels run by the interpreter (TRITON_INTERPRET=1,
set in tests/conftest.py) against a dense n x n evaluation written out block by block; row sums of the
mass; dispatch; input validation.

Tolerances follow the reference's own error: fp32 results are compared with the dense reference in
fp64, and may be at most 2x (plus a floor of 1e-6 times the largest value) worse than the dense
reference run in fp32."""

import pytest
import torch

from lemo_compile.kernels import oracle
from lemo_compile.testing.tolerance import check_within_twice

# the Triton 3.6 interpreter converts 1-element arrays to scalars the way numpy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
interpreted = pytest.mark.skipif(not oracle.triton_interpreted(),
                                 reason="needs Triton kernels defined under TRITON_INTERPRET=1")

# (n, block): block 64 only where n has at least one whole block of it; n = 1 is one partial block.
LENGTHS = [(1, 16), (63, 16), (64, 16), (64, 64), (150, 16), (150, 64), (257, 16), (257, 64)]
HEADS = [(4, 4), (6, 2)]  # (hq, hkv); (6, 2) is GQA with 3 query heads per key head

# The interpreter is slow (a few ms per tile step): a spread of the same cases for the Triton kernels,
# (b, hq, hkv, n, d, block), covering one partial block, GQA, batch 2, d not a power of two.
TRITON_CASES = [
    (1, 4, 4, 1, 16, 16),
    (2, 6, 2, 63, 40, 16),
    (1, 4, 4, 64, 40, 64),
    (2, 6, 2, 150, 16, 64),
    (1, 6, 2, 150, 40, 16),
    (2, 4, 4, 257, 16, 64),
    (1, 4, 4, 257, 40, 16),
]


def make_qk(b, hq, hkv, n, d, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * n + 10 * d + hq)
    q = torch.randn(b, hq, n, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    return q.to(dtype), k.to(dtype)


def dense_reference(q, k, block, scale=None):
    """The definition, with the full (b, hq, n, n) scores, in q's dtype: M if scale is None, else A."""
    b, hq, n, d = q.shape
    s = q @ k.repeat_interleave(hq // k.shape[1], dim=1).transpose(-1, -2)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if scale is None:
        per_pair = s.clamp_min(0).sum(1) / hq
    else:
        per_pair = torch.softmax((s * scale).masked_fill(~causal, float("-inf")), dim=-1).sum(1) / hq
    nb = -(-n // block)
    out = torch.zeros(b, nb, nb, dtype=q.dtype)
    for m in range(nb):
        rs = slice(m * block, min(n, (m + 1) * block))
        for c in range(m + 1):
            cs = slice(c * block, min(n, (c + 1) * block))
            vals = per_pair[:, rs, cs][:, causal[rs, cs]]  # (b, causal pairs of the tile)
            out[:, m, c] = vals.amax(-1) if scale is None else vals.sum(-1)
    return out


def check(name, got, q, k, block, scale=None):
    """got (fp32) against the fp64 definition, within twice the fp32 definition's error."""
    ref = dense_reference(q.double(), k.double(), block, scale)
    low = dense_reference(q.float(), k.float(), block, scale)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    check_within_twice(name, got, low, ref, 1e-6 * max(1.0, ref.abs().max().item()))
    assert (got.triu(1) == 0).all(), f"{name}: key blocks after the query block must be 0"


def check_row_sums(mass, n, block):
    nb = mass.shape[1]
    real = torch.tensor([min(block, n - m * block) for m in range(nb)], dtype=torch.float32)
    torch.testing.assert_close(mass.sum(-1), real.expand_as(mass.sum(-1)), rtol=0, atol=1e-5 * block)


# --- twins against the dense definition ------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 40])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("n,block", LENGTHS)
def test_twins_match_dense_definition(n, block, hq, hkv, b, d, monkeypatch):
    monkeypatch.setattr(oracle, "_CHUNK_ROWS", 32)  # several query chunks even at these lengths
    q, k = make_qk(b, hq, hkv, n, d)
    scale = d ** -0.5
    check("max", oracle.block_max_scores_torch(q, k, block), q, k, block)
    mass = oracle.block_attention_mass_torch(q, k, block, scale)
    check("mass", mass, q, k, block, scale)
    check_row_sums(mass, n, block)


@pytest.mark.parametrize("n,block", [(150, 16), (257, 64)])
def test_twins_fp64_and_chunking(n, block, monkeypatch):
    """fp64 inputs are computed in fp64 (then rounded to the fp32 output); the chunk size changes
    only the rounding."""
    q, k = make_qk(2, 6, 2, n, 40, torch.float64)
    ref_max, ref_mass = dense_reference(q, k, block), dense_reference(q, k, block, 0.3)
    for chunk in (16, 64, 4096):
        monkeypatch.setattr(oracle, "_CHUNK_ROWS", chunk)
        torch.testing.assert_close(oracle.block_max_scores_torch(q, k, block), ref_max.float(),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(oracle.block_attention_mass_torch(q, k, block, 0.3), ref_mass.float(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_twins_low_precision_inputs_accumulate_in_fp32(dtype):
    q, k = make_qk(2, 6, 2, 150, 40, dtype)
    check("max", oracle.block_max_scores_torch(q, k, 16), q, k, 16)
    mass = oracle.block_attention_mass_torch(q, k, 16, 40 ** -0.5)
    check("mass", mass, q, k, 16, 40 ** -0.5)
    check_row_sums(mass, 150, 16)


def test_large_scale_is_stable():
    """A sharp softmax (scale 10) neither overflows nor loses mass."""
    q, k = make_qk(1, 4, 4, 150, 16)
    mass = oracle.block_attention_mass_torch(q, k, 16, 10.0)
    check("mass", mass, q, k, 16, 10.0)
    check_row_sums(mass, 150, 16)


# --- Triton kernels in the interpreter -------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("b,hq,hkv,n,d,block", TRITON_CASES)
def test_triton_matches_dense_definition(b, hq, hkv, n, d, block):
    q, k = make_qk(b, hq, hkv, n, d)
    scale = d ** -0.5
    check("max", oracle.block_max_scores_triton(q, k, block), q, k, block)
    mass = oracle.block_attention_mass_triton(q, k, block, scale)
    check("mass", mass, q, k, block, scale)
    check_row_sums(mass, n, block)


@interpreted
def test_triton_strided_inputs_and_large_scale():
    """q and k as views of a (b, n, h, d) projection (the layout of a layer's q_proj output)."""
    q, k = make_qk(1, 6, 2, 100, 40)
    q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    check("max", oracle.block_max_scores_triton(q, k, 32), q, k, 32)
    mass = oracle.block_attention_mass_triton(q, k, 32, 10.0)
    check("mass", mass, q, k, 32, 10.0)
    check_row_sums(mass, 100, 32)


# --- dispatch ---------------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(oracle, "block_max_scores_triton", lambda *a: calls.append("max") or "triton")
    monkeypatch.setattr(oracle, "block_attention_mass_triton", lambda *a: calls.append("mass") or "triton")
    q, k = make_qk(1, 4, 4, 20, 16)
    # CPU tensors run the twins, interpreter or not (CUDA tensors take the Triton kernels)
    torch.testing.assert_close(oracle.block_max_scores(q, k, 16), oracle.block_max_scores_torch(q, k, 16))
    torch.testing.assert_close(oracle.block_attention_mass(q, k, 16, 0.25),
                               oracle.block_attention_mass_torch(q, k, 16, 0.25))
    # fp64 and LEMO_KERNEL_IMPL=torch run the twins
    torch.testing.assert_close(oracle.block_max_scores(q.double(), k.double(), 16),
                               oracle.block_max_scores_torch(q, k, 16))
    monkeypatch.setenv("LEMO_KERNEL_IMPL", "torch")
    torch.testing.assert_close(oracle.block_attention_mass(q, k, 16, 0.25),
                               oracle.block_attention_mass_torch(q, k, 16, 0.25))
    assert calls == []
    monkeypatch.setenv("LEMO_KERNEL_IMPL", "cuda")
    with pytest.raises(ValueError, match="LEMO_KERNEL_IMPL"):
        oracle.block_max_scores(q, k, 16)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["block_max_scores", "block_attention_mass"])
@pytest.mark.parametrize("impl", ["", "_torch", "_triton"])
def test_bad_input_names_the_tensor(fn, impl):
    if impl == "_triton" and oracle.triton is None:
        pytest.skip("Triton is not installed")
    op = getattr(oracle, fn + impl)
    call = (lambda q, k, block: op(q, k, block)) if fn == "block_max_scores" else \
        (lambda q, k, block: op(q, k, block, 0.25))
    q, k = make_qk(1, 6, 2, 20, 16)
    with pytest.raises(ValueError,
                       match=f"lemo::{fn}: `q` must be a \\(b, hq, n, d\\) tensor, got shape \\(6, 20, 16\\)"):
        call(q[0], k, 16)
    with pytest.raises(ValueError, match="`k` must be a \\(b, hkv, n, d\\) tensor"):
        call(q, k[0], 16)
    with pytest.raises(ValueError, match="`q` must be floating point, got torch.int64"):
        call(q.long(), k.long(), 16)
    with pytest.raises(ValueError, match="`k` must have `q`'s dtype torch.float32, got torch.float16"):
        call(q, k.half(), 16)
    with pytest.raises(ValueError, match="`k` is on meta, `q` on cpu"):
        call(q, k.to("meta"), 16)
    with pytest.raises(ValueError, match="`k` must be \\(b, hkv, n, d\\) with \\(b, n, d\\) = \\(1, 20, 16\\).*"
                                         "\\(1, 2, 19, 16\\)"):
        call(q, k[:, :, :19], 16)
    with pytest.raises(ValueError, match="`q`'s heads \\(6\\) must be a positive multiple of `k`'s heads"):
        call(q, make_qk(1, 4, 4, 20, 16)[1], 16)
    for block in (48, 0, -16, 16.0, True):
        with pytest.raises(ValueError, match="`block` must be a power of two"):
            call(q, k, block)
    if fn == "block_attention_mass":
        for scale in (float("nan"), float("inf"), None):
            with pytest.raises(ValueError, match="`scale` must be a finite number"):
                op(q, k, 16, scale)


@pytest.mark.skipif(oracle.triton is None, reason="Triton is not installed")
def test_triton_limits_are_named():
    q, k = make_qk(1, 4, 4, 20, 16)
    with pytest.raises(ValueError, match="lemo::block_max_scores: .*`block` in \\[16, 128\\], got 8"):
        oracle.block_max_scores_triton(q, k, 8)
    with pytest.raises(ValueError, match="`block` in \\[16, 128\\], got 256"):
        oracle.block_attention_mass_triton(q, k, 256, 0.25)
    with pytest.raises(ValueError, match="fp16/bf16/fp32 `q`, got torch.float64"):
        oracle.block_max_scores_triton(q.double(), k.double(), 16)
    q, k = make_qk(1, 4, 4, 4, 300)
    with pytest.raises(ValueError, match="head dim d <= 256, got 300"):
        oracle.block_attention_mass_triton(q, k, 16, 0.25)
