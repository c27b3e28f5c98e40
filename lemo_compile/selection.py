"""Keep sets: which token blocks of a sequence take part in a sparse layer.

Everything here is plain PyTorch shared by the compiled graph (through `lemo::` ops) and by
`lemo_compile.reference`, so both pick exactly the same tokens from the same scores.

Conventions (DESIGN 2, item 3):
- `n` tokens form `nb = ceil(n / B)` blocks; the last may be partial.
- A layer keeps `k = ceil(keep * nb)` blocks (at least 1, at least the forced blocks): a function of
  `n` only, so every shape is static for a given length, and a backed symbolic size under dynamic
  shapes (integer arithmetic only: `keep` is an exact fraction p/q).
- Kept token indices are the tokens of the kept blocks, sorted. Positions past the end of a partial
  last block are clamped to n-1 and flagged `in_range=False`; they always sit at the end of the
  compacted sequence, so under causal attention no real token sees them, and their outputs are
  dropped when rows go back into the residual stream.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch

# Finite sentinels keep topk deterministic and NaN-free.
_FORCED = 3.0e38
_PADDING = -3.0e38


def num_blocks(n, block: int):
    return (n + block - 1) // block


def keep_blocks_count(nb, keep: Fraction, n_forced: int = 1):
    """k = max(ceil(keep * nb), n_forced, 1), capped at nb. Works on ints and SymInts."""
    p, q = keep.numerator, keep.denominator
    k = (nb * p + q - 1) // q
    lo = max(n_forced, 1)
    # min/max spelled out so SymInts stay backed expressions
    k = torch.sym_max(k, lo) if not isinstance(k, int) else max(k, lo)
    return torch.sym_min(k, nb) if not isinstance(k, int) else min(k, nb)


def resolve_forced(forced: Sequence[int], nb: int) -> list[int]:
    """Forced block indices for a sequence of nb blocks; negative ones count from the end."""
    out = []
    for f in forced:
        g = f + nb if f < 0 else f
        if not 0 <= g < nb:
            raise ValueError(
                f"forced block {f} is outside a sequence of {nb} blocks; use LemoConfig(forced_blocks=...) "
                f"with indices in [-{nb}, {nb})")
        if g not in out:
            out.append(g)
    return out


def block_validity(token_valid: torch.Tensor, block: int) -> torch.Tensor:
    """(b, n) bool -> (b, nb) bool: a block is real if any of its tokens is."""
    b, n = token_valid.shape
    nb = num_blocks(n, block)
    pad = nb * block - n
    tv = torch.nn.functional.pad(token_valid.to(torch.int8), (0, pad))
    return tv.view(b, nb, block).amax(-1) > 0


def select_blocks(scores: torch.Tensor, block_valid: torch.Tensor, k: int,
                  forced: Sequence[int]) -> torch.Tensor:
    """Top-k blocks per sequence, sorted. scores, block_valid: (b, nb). Returns (b, k) int64.

    Forced blocks come first (if real), padding blocks last; ties break toward lower indices."""
    s = torch.nan_to_num(scores.detach().float(), nan=0.0, posinf=1e30, neginf=-1e30).clamp(-1e30, 1e30)
    if forced:
        is_forced = torch.zeros_like(block_valid)
        is_forced[:, list(forced)] = True
        s = torch.where(is_forced & block_valid, torch.full_like(s, _FORCED), s)
    s = torch.where(block_valid, s, torch.full_like(s, _PADDING))
    idx = torch.topk(s, k, dim=-1, sorted=True).indices
    return torch.sort(idx, dim=-1).values


def token_index(block_idx: torch.Tensor, block: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, k) sorted block indices -> token indices (b, k*block) clamped to n-1, and in_range (b, k*block)."""
    b, k = block_idx.shape
    offs = torch.arange(block, device=block_idx.device, dtype=torch.int64)
    raw = (block_idx.unsqueeze(-1) * block + offs).reshape(b, k * block)
    in_range = raw < n
    return raw.clamp(max=n - 1), in_range


def keep_set(scores: torch.Tensor, token_valid: torch.Tensor, block: int, keep: Fraction,
             forced: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole rule: scores (b, nb), token_valid (b, n) -> (token_index, in_range), each (b, m)."""
    n = token_valid.shape[1]
    nb = num_blocks(n, block)
    fb = resolve_forced(forced, nb)
    k = keep_blocks_count(nb, keep, len(fb))
    blocks = select_blocks(scores, block_validity(token_valid, block), k, fb)
    return token_index(blocks, block, n)


def kept_tokens_count(n, block: int, keep: Fraction, forced: Sequence[int]):
    """m, the compacted length, as a function of n (int or SymInt)."""
    nb = num_blocks(n, block)
    n_forced = len({(f + nb if f < 0 else f) for f in forced}) if isinstance(nb, int) else len(forced)
    return keep_blocks_count(nb, keep, n_forced) * block
