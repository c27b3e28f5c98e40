"""Padded batches on CUDA (skipped without a GPU): the default modes, where attention with a model
mask runs PyTorch's memory-efficient kernel, never give NaN and match their oracle, in fp32 and bf16,
under Inductor and the eager inner compiler (the CPU matrix is tests/test_padding.py)."""

import pytest
import torch

from lemo_compile.testing.padding import PAD_KINDS, run_case

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INDUCTOR = {("llama", "left"), ("gemma3", "right")}  # Inductor compiles are slow: two cells get it


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(PAD_KINDS))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_default_modes(arch, kind, dtype):
    inner = "inductor" if (arch, kind) in INDUCTOR else "eager"
    case = run_case(arch, kind, "backward", "backward", inner=inner, keep=0.5, device="cuda", dtype=dtype)
    assert case.finite and not case.error, case
    assert case.matches, case


@cuda
def test_keep_everything_is_dense():
    case = run_case("gemma3", "right", "backward", "backward", inner="eager", keep=1.0, device="cuda")
    assert case.finite and case.matches, case
