"""Block scorers: one informativeness score per key block, per sequence, per sparse layer.

A scorer reads the layer's normalized hidden states `x` (b, n, d) — all tokens, under no-grad — and
returns scores (b, nb). Higher means keep. Built in:

- `random_scores`: a seeded integer hash of (seed, layer, sequence, block). Exact and identical on
  every device, so graph and reference pick the same blocks; for tests and ablations.
- `pooled_qk_scores`: training-free, from the layer's own frozen W_q, W_k applied to block means.
- `pooled_attention_scores`: the same score from the attention's own query and key (after rotary), for
  layers whose q/k are no linear map of x (multi-head latent attention: a norm between two projections).
"""

from __future__ import annotations

import torch

from .selection import num_blocks, pad_tokens

_MASK31 = (1 << 31) - 1


def random_scores(layer: int, seed: int, b: int, nb, device=None) -> torch.Tensor:
    """(b, nb) float32 scores in [0, 1), a pure function of (seed, layer, row, block)."""
    blk = torch.arange(nb, device=device, dtype=torch.int64)
    row = torch.arange(b, device=device, dtype=torch.int64).unsqueeze(-1)
    h = (blk * 2654435761 + row * 40503 + (layer + 1) * 97531 + seed * 2246822519) & _MASK31
    for _ in range(3):  # xorshift-multiply rounds, int64 arithmetic masked to 31 bits
        h = ((h ^ (h >> 13)) * 1274126177) & _MASK31
        h = h ^ (h >> 16)
    return h.to(torch.float32) / float(1 << 31)


def block_mean(x: torch.Tensor, token_valid: torch.Tensor | None, block: int) -> torch.Tensor:
    """(b, n, d) -> (b, nb, d): mean of each block's real tokens (zeros for an all-padding block)."""
    b, n, d = x.shape
    nb = num_blocks(n, block)
    w = torch.ones(b, n, device=x.device, dtype=torch.float32) if token_valid is None else token_valid.float()
    xp = pad_tokens(x.float() * w.unsqueeze(-1), nb * block - n)
    wp = pad_tokens(w, nb * block - n)
    s = xp.view(b, nb, block, d).sum(2)
    c = wp.view(b, nb, block).sum(2).clamp(min=1.0)
    return s / c.unsqueeze(-1)


def pooled_qk_scores(x: torch.Tensor, token_valid: torch.Tensor | None, w_q: torch.Tensor, b_q: torch.Tensor | None,
                     w_k: torch.Tensor, b_k: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                     block: int) -> torch.Tensor:
    """Training-free scores from the layer's own projections applied to block means.

    Projections are linear, so projecting the block mean equals the mean of the projected tokens:
    q_i, k_j are the mean pre-RoPE query of block i and key of block j, per head. Key block j scores
    sum over query blocks i >= j of the head-averaged relu(q_i . k_j) / sqrt(head_dim) (the paper's
    positive-score column sum, at block resolution). Cost: two (nb x d) @ (d x heads*hd) GEMMs."""
    return qk_block_scores(block_mean(x, token_valid, block).to(w_q.dtype), w_q, b_q, w_k, b_k, num_heads,
                           num_kv_heads)


def pooled_attention_scores(q: torch.Tensor, k: torch.Tensor, token_valid: torch.Tensor | None,
                            block: int) -> torch.Tensor:
    """(b, heads, n, hd) query and (b, kv_heads, n, hd) key -> (b, nb) key-block scores: pooled_qk_scores'
    formula on the block means of the attention's own q and k (computed anyway in attn_mode='backward')."""
    h, hd = q.shape[1], q.shape[-1]
    qb = block_mean(q.transpose(1, 2).flatten(2), token_valid, block).unflatten(-1, (h, hd)).transpose(1, 2)
    kb = block_mean(k.transpose(1, 2).flatten(2), token_valid, block).unflatten(-1, (k.shape[1], hd)).transpose(1, 2)
    return _head_block_scores(qb, kb, qb.shape[2])


def _head_block_scores(q: torch.Tensor, k: torch.Tensor, nb) -> torch.Tensor:
    """Per-head block queries q (b, heads, nb, hd) and keys k (b, kv_heads, nb, hd) -> (b, nb): sum over
    query blocks i >= j of the head mean of relu(q_i . k_j) / sqrt(head_dim)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.relu(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5).mean(1)  # (b, nb_q, nb_k)
    causal = torch.ones(nb, nb, device=s.device, dtype=torch.bool).tril()
    return (s * causal).sum(-2)


def qk_block_scores(xb: torch.Tensor, w_q: torch.Tensor, b_q: torch.Tensor | None, w_k: torch.Tensor,
                    b_k: torch.Tensor | None, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(b, nb, d) block means -> (b, nb) key-block scores: sum over query blocks i >= j of the
    head mean of relu(q_i . k_j) / sqrt(head_dim), with q = xb W_q^T + b_q, k = xb W_k^T + b_k."""
    b, nb, _ = xb.shape
    rows = xb.flatten(0, 1)  # 2-D GEMMs: a 3-D linear's reshape guards on nb under dynamic shapes (recompiles)
    q = torch.nn.functional.linear(rows, w_q, b_q).float()
    k = torch.nn.functional.linear(rows, w_k, b_k).float()
    hd = q.shape[-1] // num_heads
    q = q.unflatten(0, (b, nb)).unflatten(-1, (num_heads, hd)).transpose(1, 2)
    k = k.unflatten(0, (b, nb)).unflatten(-1, (num_kv_heads, hd)).transpose(1, 2)
    return _head_block_scores(q, k, nb)
