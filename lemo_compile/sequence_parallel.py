"""Sequence parallelism, Ulysses layout: one sequence split across the ranks of a process group.

Each rank holds a contiguous slice of every sequence (n / P rows) for everything but attention. Around
the attention, an all-to-all trades the slice of all heads for the whole sequence of H / P heads, attention
runs causally over the whole sequence, and a second all-to-all trades back (DeepSpeed-Ulysses, as ALST
packages it for transformers; docs/sequence-parallel.md says why this engine). The collectives are torch's
functional ones, which Dynamo traces into the graph lemo compiles; the attention plugs in where
transformers looks up attention functions, so no model code changes:

    from lemo_compile import sequence_parallel as sp
    model.set_attn_implementation(sp.register(group))      # "lemo_ulysses"
    batch = sp.shard_batch(input_ids, labels, group=group)  # input_ids, position_ids, labels, num_items_in_batch
    loss = compiled(**batch).loss                           # this rank's share of the global mean
    loss.backward(); sp.all_reduce_grads(model, group)      # sum of the shares = the global gradient

Contract (checked, with errors naming what is wrong): the sequence length divides by P; the query heads
divide by P (key/value heads that do not are repeated up to the query heads first); no attention mask
(one causal sequence per row: padded and packed rows are not supported yet); labels are shifted once,
globally, before sharding, so the last row of a slice predicts the first token of the next slice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

NAME = "lemo_ulysses"
_GROUPS: dict[str, Any] = {}


def register(group: Any = None, name: str = NAME) -> str:
    """Register the Ulysses attention for `group` (default: the world) with transformers; returns the
    name to pass to `model.set_attn_implementation` (or `attn_implementation=` when loading)."""
    from transformers import AttentionInterface

    if not dist.is_initialized():
        raise RuntimeError("sequence_parallel.register: torch.distributed is not initialized")
    _GROUPS[name] = group if group is not None else dist.group.WORLD

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return ulysses_attention(module, query, key, value, attention_mask, _GROUPS[name], scaling=scaling,
                                 dropout=dropout, **kwargs)

    AttentionInterface.register(name, attention)
    return name


def _size(group: Any) -> int:
    return dist.get_world_size(group)


def _seq_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(b, h, n/P, d) on every rank -> (b, h/P, n, d): rank r keeps heads [r h/P, (r+1) h/P) of all slices."""
    from torch.distributed._functional_collectives import all_to_all_single

    p = _size(group)
    b, h, s, d = x.shape
    x = x.reshape(b, p, h // p, s, d).transpose(0, 1).contiguous()  # (P: head group, b, h/P, s, d)
    y = all_to_all_single(x, None, None, group)                      # (P: source rank = slice, ...)
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)


def _heads_to_seq(y: torch.Tensor, group: Any) -> torch.Tensor:
    """Inverse of _seq_to_heads: (b, h/P, n, d) -> (b, h, n/P, d)."""
    from torch.distributed._functional_collectives import all_to_all_single

    p = _size(group)
    b, hp, n, d = y.shape
    y = y.reshape(b, hp, p, n // p, d).permute(2, 0, 1, 3, 4).contiguous()  # (P: slice, b, h/P, n/P, d)
    x = all_to_all_single(y, None, None, group)                             # (P: source = head group, ...)
    return x.transpose(0, 1).reshape(b, p * hp, n // p, d)


def ulysses_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, group: Any, scaling: float | None = None,
                      dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (b, h, n/P, d), key/value (b, h_kv, n/P, d) of this rank's
    slice; returns (b, n/P, h, d)."""
    if attention_mask is not None:
        raise NotImplementedError("lemo_ulysses: attention masks (padded or packed rows) are not supported yet; "
                                  "pass one unpadded sequence per row without attention_mask")
    p = _size(group)
    h, h_kv = query.shape[1], key.shape[1]
    if h % p:
        raise ValueError(f"lemo_ulysses: {h} query heads do not split over {p} ranks")
    if dropout:
        raise NotImplementedError("lemo_ulysses: attention dropout is not supported")
    if h_kv % p:  # repeat key/value heads up to the query heads: every rank then gets whole groups
        key, value = (t.repeat_interleave(h // h_kv, dim=1) for t in (key, value))
        h_kv = h
    q, k, v = (_seq_to_heads(t, group) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=h_kv != h)
    return _heads_to_seq(out, group).transpose(1, 2).contiguous(), None


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, group: Any = None,
                position_ids: torch.Tensor | None = None, ignore_index: int = -100) -> dict[str, Any]:
    """This rank's slice of a batch that every rank of `group` holds whole: input_ids, position_ids (the
    global positions), labels shifted globally (pass them to the model as labels: the loss does not shift
    them again, see `shift_labels`) and num_items_in_batch (the global count, so the loss is this rank's
    share of the global mean)."""
    group = group if group is not None else dist.group.WORLD
    p, r = _size(group), dist.get_rank(group)
    b, n = input_ids.shape
    if n % p:
        raise ValueError(f"shard_batch: sequence length {n} does not divide by {p} ranks (pad it to a multiple)")
    s = n // p
    if position_ids is None:
        position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
    mine = slice(r * s, (r + 1) * s)
    out: dict[str, Any] = {"input_ids": input_ids[:, mine].contiguous(),
                           "position_ids": position_ids[:, mine].contiguous()}
    if labels is not None:
        shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
        out["labels"] = out["shift_labels"] = shifted[:, mine].contiguous()
        out["num_items_in_batch"] = int((shifted != ignore_index).sum())
    return out


def all_reduce_grads(model: torch.nn.Module, group: Any = None) -> None:
    """Sum every trainable gradient over `group`: with shard_batch's loss shares that is the gradient of
    the global mean loss."""
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            dist.all_reduce(p.grad, group=group)
