"""What every Triton kernel module shares: the optional import, the dtypes the kernels take, the
LEMO_KERNEL_IMPL switch, the interpreter check and the error helpers. Each kernel has a PyTorch twin, so
without Triton (or with LEMO_KERNEL_IMPL=torch) dispatch falls back to the twins."""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the twins still work; CUDA dispatch falls back to them
    triton = None
    tl = None

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted(kernel: Any) -> bool:
    """Whether `kernel` was defined under TRITON_INTERPRET=1 (it runs on the host)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def kernel_impl() -> str:
    """LEMO_KERNEL_IMPL, read at call time: 'triton' (default) or 'torch' (the twins everywhere)."""
    impl = os.environ.get("LEMO_KERNEL_IMPL", "triton")
    if impl not in ("triton", "torch"):
        raise ValueError(f"LEMO_KERNEL_IMPL must be 'triton' or 'torch', got {impl!r}")
    return impl


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch to a Triton kernel: CUDA only (on a CPU the twin is the implementation; the interpreter
    is for testing the kernels, which tests call directly), a dtype the kernels take, not switched off."""
    return triton is not None and kernel_impl() == "triton" and t.is_cuda and t.dtype in TRITON_DTYPES


def fail(op: str, msg: str):
    raise ValueError(f"lemo::{op}: {msg}")


def require_triton(op: str) -> None:
    if triton is None:
        fail(op, "Triton is not installed; use the *_torch twin")
