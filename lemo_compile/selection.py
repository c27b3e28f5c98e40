"""Keep sets: which token blocks of a sequence take part in a sparse layer.

Everything here is plain PyTorch shared by the compiled graph (through `lemo::` ops) and by
`lemo_compile.reference`, so both pick exactly the same tokens from the same scores.

Conventions (docs/design.md §2, item 2):
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


def pad_tokens(t: torch.Tensor, after, before=0, value=0) -> torch.Tensor:
    """t (b, n, ...) with `before` and `after` entries of `value` added on the token axis (1), written
    into a full-size tensor. Not F.pad: its kernel needs concrete sizes, and lemo runs these functions
    outside Dynamo too (fake propagation of the rewritten graph's metadata), where a symbolic pad made CPU
    raise and CUDA specialize the length (a new graph at every length). No tensor of the pad's size
    either: a pad of 0 or 1 at the traced length is specialized (a guard that splits multiples of the
    block from other lengths)."""
    n = t.shape[1]
    full = t.new_full((t.shape[0], before + n + after, *t.shape[2:]), value)
    return full.slice_scatter(t, dim=1, start=before, end=before + n)


def block_validity(token_valid: torch.Tensor, block: int) -> torch.Tensor:
    """(b, n) bool -> (b, nb) bool: a block is real if any of its tokens is."""
    b, n = token_valid.shape
    nb = num_blocks(n, block)
    pad = nb * block - n
    tv = pad_tokens(token_valid.to(torch.int8), pad)
    return tv.view(b, nb, block).amax(-1) > 0


def select_blocks(scores: torch.Tensor, block_valid: torch.Tensor, k: int,
                  forced: Sequence[int], forced_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k blocks per sequence, sorted. scores, block_valid: (b, nb). Returns (b, k) int64.

    Forced blocks (the indices `forced`, and where `forced_mask` (b, nb) is True) come first (if real),
    padding blocks last; ties break toward lower indices."""
    s = torch.nan_to_num(scores.detach().float(), nan=0.0, posinf=1e30, neginf=-1e30).clamp(-1e30, 1e30)
    if forced or forced_mask is not None:
        is_forced = torch.zeros_like(block_valid) if forced_mask is None else forced_mask.clone()
        if forced:
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


def document_blocks(seg: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids seg (b, n) (0 = padding, k = the k-th document of a row) -> per block (b, nb): the
    document of the block's first real token (0 for a block of padding only), and whether a document
    starts in it.

    A block that straddles a boundary belongs to the document it starts in for the share below, and it
    holds the next document's first token, so it is that document's first block: forced, the
    document's attention sink. Attention never crosses documents whatever is kept (the segments
    say which keys a query sees)."""
    b, n = seg.shape
    nb = num_blocks(n, block)
    pad = nb * block - n
    s = pad_tokens(seg, pad).view(b, nb, block)
    prev = pad_tokens(seg, 0, 1)[:, :n]
    starts = (seg != 0) & (seg != prev)
    has_start = pad_tokens(starts.to(torch.int8), pad).view(b, nb, block).amax(-1) > 0
    first_real = torch.argmax((s != 0).to(torch.int8), dim=-1, keepdim=True)  # 0 for an all-padding block
    return s.gather(-1, first_real).squeeze(-1), has_start


def share_scores(scores: torch.Tensor, doc: torch.Tensor, max_doc: int) -> torch.Tensor:
    """Scores (b, nb) -> scores of equal shares: -(rank of the block within its document + 1/2) / (blocks
    of that document), doc ids in [0, max_doc]. A global top-k of these keeps about the same fraction of
    every document's blocks, each document's best first (ties toward lower indices)."""
    b, nb = scores.shape
    s = torch.nan_to_num(scores.detach().float(), nan=0.0, posinf=1e30, neginf=-1e30)
    by_score = torch.argsort(-s, dim=-1, stable=True)
    order = by_score.gather(1, torch.argsort(doc.gather(1, by_score), dim=-1, stable=True))  # doc, then score
    sorted_doc = doc.gather(1, order)
    pos = torch.arange(nb, device=scores.device).expand(b, nb)
    new = torch.ones_like(sorted_doc, dtype=torch.bool)
    new[:, 1:] = sorted_doc[:, 1:] != sorted_doc[:, :-1]
    first = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=-1).values
    rank = torch.empty_like(pos).scatter_(1, order, pos - first)
    counts = torch.zeros(b, max_doc + 1, dtype=torch.int64, device=scores.device)
    counts.scatter_add_(1, doc.long(), torch.ones_like(doc, dtype=torch.int64))
    return -(rank.float() + 0.5) / counts.gather(1, doc.long()).float()


def keep_set(scores: torch.Tensor, token_valid: torch.Tensor, block: int, keep: Fraction,
             forced: Sequence[int], seg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole rule: scores (b, nb), token_valid (b, n) -> (token_index, in_range), each (b, m).

    With segment ids seg (b, n) (a padded or packed batch, docs/design.md §2.1) the real tokens are those of
    a segment, every document's first block is forced (its attention sink) and the blocks are ranked
    within their document (share_scores), so each document keeps about its share; the count kept, k,
    is still a function of n only. Forced blocks beyond k (more documents than kept blocks) are dropped
    from the end."""
    n = token_valid.shape[1]
    nb = num_blocks(n, block)
    fb = resolve_forced(forced, nb)
    k = keep_blocks_count(nb, keep, len(fb))
    if seg is None:
        blocks = select_blocks(scores, block_validity(token_valid, block), k, fb)
    else:
        doc, has_start = document_blocks(seg, block)
        blocks = select_blocks(share_scores(scores, doc, n), block_validity(seg != 0, block), k, fb, has_start)
    return token_index(blocks, block, n)


def kept_tokens_count(n, block: int, keep: Fraction, forced: Sequence[int]):
    """m, the compacted length, as a function of n (int or SymInt)."""
    nb = num_blocks(n, block)
    n_forced = len({(f + nb if f < 0 else f) for f in forced}) if isinstance(nb, int) else len(forced)
    return keep_blocks_count(nb, keep, n_forced) * block
