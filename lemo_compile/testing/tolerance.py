"""Kernel-test tolerance relative to the reference's own rounding error (STYLE 10)."""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_within_twice(name: str, got: torch.Tensor, low: torch.Tensor, ref: torch.Tensor, floor: float) -> None:
    """`got` may be at most 2x worse than `low` (the plain ops in the same dtype) against the high-
    precision `ref`, plus `floor`; prints the worst offenders before failing."""
    e_got, e_low = max_err(got, ref), max_err(low, ref)
    if e_got > 2 * e_low + floor:
        diff = (got.double() - ref.double()).abs().flatten()
        worst = diff.topk(min(5, diff.numel()))
        print(f"{name}: err {e_got:.3g} vs plain-op err {e_low:.3g}; worst at {worst.indices.tolist()}: "
              f"{got.flatten()[worst.indices].tolist()} vs ref {ref.flatten()[worst.indices].tolist()}")
    assert e_got <= 2 * e_low + floor, name
