"""lemo_compile.kernels.oracle's Triton kernels compiled on CUDA (needs CUDA; run with TRITON_INTERPRET=0,
tests/conftest.py sets the interpreter unless it is set already).

The kernels against the fp64 dense definition of tests/kernels/test_oracle.py, within twice the error of
the same definition evaluated in the input dtype (fp32, bf16), on shapes that are not multiples of the
block: GQA, batch 2, a partial last block, one partial block, head dim 64 and 40; then a calibration-sized
case (SmolLM2's 9/3 heads, 4K tokens) against the fp32 twin."""

import pytest
import torch

from lemo_compile.kernels import oracle
from lemo_compile.testing.tolerance import check_within_twice
from tests.kernels.test_oracle import dense_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or oracle.triton is None or oracle.triton_interpreted(),
    reason="needs CUDA and compiled Triton kernels (TRITON_INTERPRET=0)")

CASES = [  # (b, hq, hkv, n, d, block)
    (1, 4, 4, 1, 64, 64),
    (2, 6, 2, 63, 40, 16),
    (1, 9, 3, 300, 64, 64),
    (2, 8, 8, 257, 64, 64),
    (1, 6, 2, 1000, 40, 128),
]


def _qk(b, hq, hkv, n, d, dtype):
    gen = torch.Generator(device="cuda").manual_seed(7 * n + d)
    q = torch.randn(b, hq, n, d, generator=gen, device="cuda")
    k = torch.randn(b, hkv, n, d, generator=gen, device="cuda")
    return q.to(dtype), k.to(dtype)


def _check(name, got, q, k, block, scale=None):
    ref = dense_reference(q.cpu().double(), k.cpu().double(), block, scale)
    low = dense_reference(q.cpu(), k.cpu(), block, scale) if q.dtype == torch.float32 else \
        dense_reference(q.cpu().float(), k.cpu().float(), block, scale)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    check_within_twice(name, got.cpu(), low, ref, 1e-5 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,hq,hkv,n,d,block", CASES, ids=str)
def test_kernels_match_the_dense_definition(b, hq, hkv, n, d, block, dtype):
    q, k = _qk(b, hq, hkv, n, d, dtype)
    scale = d ** -0.5
    _check("max", oracle.block_max_scores(q, k, block), q, k, block)
    mass = oracle.block_attention_mass(q, k, block, scale)
    _check("mass", mass, q, k, block, scale)
    rows = torch.tensor([min(block, n - i * block) for i in range(mass.shape[1])], dtype=torch.float32)
    torch.testing.assert_close(mass.sum(-1).cpu(), rows.expand(b, -1), rtol=0, atol=1e-4 * block)


def test_calibration_sized_case_matches_the_twin():
    """SmolLM2's heads (9 query, 3 key/value, head dim 64) at 4K tokens, strided views as the capture
    passes them: the kernels against the fp32 twins (chunked, no n x n matrix)."""
    q, k = _qk(1, 9, 3, 4096, 64, torch.float32)
    q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    for got, want in ((oracle.block_max_scores(q, k, 64), oracle.block_max_scores_torch(q, k, 64)),
                      (oracle.block_attention_mass(q, k, 64, 0.125),
                       oracle.block_attention_mass_torch(q, k, 64, 0.125))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
