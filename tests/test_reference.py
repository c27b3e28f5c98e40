"""Tests of lemo_compile.reference, the eager oracle of docs/design.md §2, on the tiny models of every arch."""

from __future__ import annotations

import math
from fractions import Fraction
import types

import pytest
import torch

from lemo_compile.config import LemoConfig
from lemo_compile.reference import (ATTN_IMPLEMENTATION, decoder_layers, dense_forward, kept_rows,
                                    reference_forward, sparse_attention)
from lemo_compile.testing.models import ARCHS, random_batch, tiny_model, trainable_grads

VOCAB = 256
BLOCK = 64
ARCH_LORA = [pytest.param(a, l, id=f"{a}-{'lora' if l else 'full'}") for a in ARCHS for l in (False, True)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _run(model, fn):
    """(loss, logits, trainable grads, result of fn) for one forward + backward."""
    model.zero_grad(set_to_none=True)
    res = fn()
    out = res.output if hasattr(res, "keep_sets") else res
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), trainable_grads(model), res


def _dense(model, batch):
    return _run(model, lambda: dense_forward(model, **batch))


def _ref(model, cfg, batch, **kw):
    return _run(model, lambda: reference_forward(model, cfg, **kw, **batch))


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- exactness at keep_ratio = 1 ---------------------------------------------------------------------

@pytest.mark.parametrize("arch,lora", ARCH_LORA)
def test_no_sparse_layer_is_bit_identical(arch, lora):
    model = tiny_model(arch, lora=lora)
    batch = random_batch(VOCAB, 2, 200, seed=1, pad_right=[0, 21])
    loss, logits, grads, _ = _dense(model, batch)
    for cfg in (LemoConfig(keep_ratio=0.5, dense_layers=(0, 1, 2, 3)), LemoConfig(keep_ratio=0.5, enabled=False)):
        r_loss, r_logits, r_grads, res = _ref(model, cfg, batch)
        assert res.keep_sets == {}
        assert torch.equal(r_loss, loss) and torch.equal(r_logits, logits)
        assert grads.keys() == r_grads.keys()
        for name in grads:
            assert torch.equal(r_grads[name], grads[name]), name


@pytest.mark.parametrize("attn_mode,mlp_mode", [("tokens", "tokens"), ("keys", "dense"), ("backward", "backward")])
@pytest.mark.parametrize("arch,lora", ARCH_LORA)
def test_every_block_kept_matches_dense(arch, lora, attn_mode, mlp_mode):
    """All layers sparse, but k = nb: the hooks and the attention function run and change nothing
    beyond float rounding (backward mode: the dropped-term gradient is then the full gradient)."""
    model = tiny_model(arch, lora=lora)
    batch = random_batch(VOCAB, 2, 200, seed=2, pad_right=[0, 37])
    loss, _, grads, _ = _dense(model, batch)
    cfg = LemoConfig(keep_ratio=1.0, dense_layers=(), attn_mode=attn_mode, mlp_mode=mlp_mode)
    r_loss, _, r_grads, res = _ref(model, cfg, batch)
    assert sorted(res.keep_sets) == [0, 1, 2, 3]
    assert all(kept_rows(*ks, 200)[0].all() for ks in res.keep_sets.values())
    if attn_mode == "backward":
        assert torch.equal(r_loss, loss)
    torch.testing.assert_close(r_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(r_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.config._attn_implementation == "sdpa"  # restored


# -- forward-exact modes ---------------------------------------------------------------------------

@pytest.mark.parametrize("mlp_mode", ["backward", "dense"])
@pytest.mark.parametrize("arch,lora", ARCH_LORA)
def test_backward_mode_loss_exact_gradient_approximate(arch, lora, mlp_mode):
    model = tiny_model(arch, lora=lora)
    batch = random_batch(VOCAB, 2, 256, seed=3)
    loss, logits, grads, _ = _dense(model, batch)
    cfg = LemoConfig(keep_ratio=0.5, attn_mode="backward", mlp_mode=mlp_mode)  # layer 2 of 4 sparse
    r_loss, r_logits, r_grads, res = _ref(model, cfg, batch)
    assert sorted(res.keep_sets) == [2]
    torch.testing.assert_close(r_loss, loss, rtol=1e-6, atol=0)
    assert torch.equal(r_loss, loss) and torch.equal(r_logits, logits)  # forward is bit-exact
    # Above the sparse layer nothing changes, below it the gradient is the approximation.
    above = [n for n in grads if ".layers.3." in n or "lm_head" in n]
    below = [n for n in grads if ".layers.0." in n or ".layers.1." in n or ".layers.2." in n]
    assert above and below
    for name in above:
        assert torch.equal(r_grads[name], grads[name]), name
    assert max((r_grads[n] - grads[n]).abs().max().item() for n in below) > 1e-4


# -- tokens and keys modes -------------------------------------------------------------------------

def _layer_io(model, layer: int):
    """Forward hook recording (input hidden states, output hidden states) of one decoder layer."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach()
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = decoder_layers(model)[layer].register_forward_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("arch,lora", ARCH_LORA)
def test_tokens_mode_eliminated_rows_pass_through(arch, lora):
    model = tiny_model(arch, lora=lora)
    batch = random_batch(VOCAB, 2, 256, seed=4)
    loss, _, _, _ = _dense(model, batch)
    seen, handle = _layer_io(model, 2)
    try:
        cfg = LemoConfig(keep_ratio=0.5, attn_mode="tokens", mlp_mode="tokens")
        r_loss, _, r_grads, res = _ref(model, cfg, batch)
    finally:
        handle.remove()
    kept = kept_rows(*res.keep_sets[2], 256)
    assert kept.sum().item() == 2 * 128 and (~kept).any()
    assert torch.equal(seen["out"][~kept], seen["in"][~kept])  # no update at all
    assert not torch.equal(seen["out"][kept], seen["in"][kept])
    assert torch.isfinite(r_loss) and not torch.allclose(r_loss, loss, rtol=1e-5, atol=0)
    assert all(torch.isfinite(g).all() for g in r_grads.values())


@pytest.mark.parametrize("arch,lora", ARCH_LORA)
def test_keys_mode_updates_every_row(arch, lora):
    model = tiny_model(arch, lora=lora)
    batch = random_batch(VOCAB, 2, 256, seed=5)
    loss, _, _, _ = _dense(model, batch)
    seen, handle = _layer_io(model, 2)
    try:
        r_loss, _, r_grads, _ = _ref(model, LemoConfig(keep_ratio=0.5, attn_mode="keys", mlp_mode="dense"), batch)
    finally:
        handle.remove()
    assert (seen["out"] != seen["in"]).any(-1).all()
    assert torch.isfinite(r_loss) and not torch.allclose(r_loss, loss, rtol=1e-5, atol=0)
    assert all(torch.isfinite(g).all() for g in r_grads.values())


# -- keep sets, padding, ragged lengths ------------------------------------------------------------

@pytest.mark.parametrize("arch,lora", ARCH_LORA)
def test_keep_sets_padding_and_ragged_length(arch, lora):
    """n = 200 (a partial last block), right padding in row 1 (tokens 163..199, so block 3 is all
    padding), every layer sparse; gemma3's sliding layers (window 96) drop keys at this length."""
    n, pad = 200, [0, 37]
    model = tiny_model(arch, lora=lora)
    batch = random_batch(VOCAB, 2, n, seed=6, pad_right=pad)
    nb = math.ceil(n / BLOCK)
    k = math.ceil(0.5 * nb)
    for attn_mode, mlp_mode in (("tokens", "backward"), ("keys", "dense"), ("backward", "backward"),
                                ("backward", "tokens")):
        cfg = LemoConfig(keep_ratio=0.5, dense_layers=(), attn_mode=attn_mode, mlp_mode=mlp_mode)
        r_loss, _, r_grads, res = _ref(model, cfg, batch)
        assert torch.isfinite(r_loss), attn_mode
        assert all(torch.isfinite(g).all() for g in r_grads.values())
        assert sorted(res.keep_sets) == [0, 1, 2, 3]
        for layer, (token_index, in_range) in res.keep_sets.items():
            assert token_index.shape == in_range.shape == (2, k * BLOCK)
            assert token_index.dtype == torch.int64 and in_range.dtype == torch.bool
            assert (token_index.diff(dim=-1) >= 0).all()  # sorted
            assert torch.equal(token_index[:, :BLOCK], torch.arange(BLOCK).expand(2, -1))  # block 0 forced
            assert (token_index < n).all()
            blocks = token_index.view(2, k, BLOCK)[..., 0] // BLOCK
            assert (blocks.diff(dim=-1) > 0).all()  # whole, distinct blocks
            raw = blocks[..., None] * BLOCK + torch.arange(BLOCK)
            assert torch.equal(in_range, (raw < n).view(2, -1))
            assert 3 not in blocks[1].tolist()  # the all-padding block loses to real ones
    # The same keep sets passed back in give the same result.
    cfg = LemoConfig(keep_ratio=0.5, dense_layers=(), attn_mode="tokens")
    a_loss, _, a_grads, a = _ref(model, cfg, batch)
    b_loss, _, b_grads, b = _ref(model, cfg, batch, keep_sets=a.keep_sets)
    assert torch.equal(a_loss, b_loss) and _max_diff(a_grads, b_grads) == 0.0


def test_custom_scorer_and_errors():
    model = tiny_model("llama", lora=True)
    batch = random_batch(VOCAB, 2, 256, seed=7)
    calls = []

    def scorer(layer, x, tv):  # prefer late blocks
        calls.append((layer, tuple(x.shape), x.requires_grad, tuple(tv.shape)))
        return torch.arange(x.shape[1] // BLOCK, dtype=torch.float32).expand(x.shape[0], -1)

    cfg = LemoConfig(keep_ratio=0.5, attn_mode="keys")
    res = reference_forward(model, cfg, scorer=scorer, **batch)
    assert calls == [(2, (2, 256, 64), False, (2, 256))]
    blocks = res.keep_sets[2][0][:, ::BLOCK] // BLOCK
    assert blocks.tolist() == [[0, 3], [0, 3]]
    with pytest.raises(ValueError, match="dense"):
        reference_forward(model, cfg, keep_sets={0: res.keep_sets[2]}, **batch)
    assert model.config._attn_implementation == "sdpa"


# -- the attention function against explicit float64 formulas ----------------------------------------

def _problem(b=2, h=4, kv=2, n=13, d=8, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, generator=g, dtype=torch.float64) for hh in (h, kv, kv))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, n - pad:] = False
    # HF's 4-D mask: causal, keys restricted to real tokens (padding queries still see real keys).
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    kept = torch.rand(b, n, generator=g) < 0.5
    kept[:, 0] = True
    module = types.SimpleNamespace(num_key_value_groups=h // kv, is_causal=True)
    return q, k, v, mask, kept, module


def _brute_force(q, k, v, mask, kept, scale, d_out):
    """Explicit loops: dense softmax P, O; the dropped-term gradients over kept i, j (float64)."""
    b, h, n, d = q.shape
    groups = h // k.shape[1]
    o = torch.zeros_like(q)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            kh = hi // groups
            for i in range(n):
                keys = [j for j in range(n) if mask[bi, 0, i, j]]
                s = torch.stack([scale * (q[bi, hi, i] @ k[bi, kh, j]) for j in keys])
                p = torch.exp(s - torch.logsumexp(s, 0))
                o[bi, hi, i] = sum(pj * v[bi, kh, j] for pj, j in zip(p, keys))
                if not kept[bi, i]:
                    continue
                g = d_out[bi, i, hi]  # (b, n, h, d) layout of HF attention outputs
                for pj, j in zip(p, keys):
                    if not kept[bi, j]:
                        continue
                    dv[bi, kh, j] += pj * g
                    ds = pj * (g @ v[bi, kh, j] - g @ o[bi, hi, i])
                    dq[bi, hi, i] += scale * ds * k[bi, kh, j]
                    dk[bi, kh, j] += scale * ds * q[bi, hi, i]
    return o, dq, dk, dv


@pytest.mark.parametrize("use_none_mask", [False, True])
def test_backward_attention_matches_explicit_formulas(use_none_mask):
    q, k, v, mask, kept, module = _problem(pad=0 if use_none_mask else 3)
    scale = 0.3
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = sparse_attention("backward", module, *leaves, None if use_none_mask else mask, kept, scaling=scale)
    d_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(d_out)
    o, dq, dk, dv = _brute_force(q, k, v, mask.expand(2, 1, -1, -1), kept, scale, d_out)
    torch.testing.assert_close(out, o.transpose(1, 2), rtol=1e-12, atol=1e-12)
    for got, want in zip((l.grad for l in leaves), (dq, dk, dv)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Eliminated rows of q receive nothing, nor do eliminated keys/values.
    assert (leaves[0].grad.transpose(1, 2)[~kept] == 0).all()
    assert (leaves[1].grad.transpose(1, 2)[~kept] == 0).all()
    assert (leaves[2].grad.transpose(1, 2)[~kept] == 0).all()


def test_backward_attention_all_kept_is_the_true_gradient():
    q, k, v, mask, _, module = _problem(seed=1)
    kept = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
    a = [t.clone().requires_grad_(True) for t in (q, k, v)]
    b = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = sparse_attention("backward", module, *a, mask, kept, scaling=0.3)
    rep = q.shape[1] // k.shape[1]
    ref = torch.nn.functional.scaled_dot_product_attention(
        b[0], b[1].repeat_interleave(rep, 1), b[2].repeat_interleave(rep, 1), attn_mask=mask, scale=0.3)
    d_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(d_out)
    ref.backward(d_out.transpose(1, 2))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["tokens", "keys"])
def test_tokens_and_keys_attention_forward(mode):
    q, k, v, mask, kept, module = _problem(seed=2)
    out = sparse_attention(mode, module, q, k, v, mask, kept, scaling=0.3)
    b, h, n, d = q.shape
    groups = h // k.shape[1]
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keys = [j for j in range(n) if mask[bi, 0, i, j] and kept[bi, j]]
                if mode == "tokens" and not kept[bi, i]:
                    keys = []
                if not keys:
                    assert (out[bi, i, hi] == 0).all()
                    continue
                s = torch.stack([0.3 * (q[bi, hi, i] @ k[bi, hi // groups, j]) for j in keys])
                want = torch.softmax(s, 0) @ v[bi, hi // groups, keys]
                torch.testing.assert_close(out[bi, i, hi], want, rtol=1e-12, atol=1e-12)


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model = tiny_model("qwen3")
    reference_forward(model, LemoConfig(keep_ratio=0.5), **random_batch(VOCAB, 1, 128, seed=8))
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    assert ATTN_IMPLEMENTATION in AttentionMaskInterface._global_mapping
    assert model.config._attn_implementation == "sdpa"


# -- keep sets per document (packed and padded batches) ----------------------------------------------

def test_keep_sets_force_every_document_start_and_share_blocks():
    from lemo_compile import traced
    from lemo_compile.selection import document_blocks, keep_set

    # documents of 70, 1, 300 and 200 tokens packed in 571 (9 blocks); keep 0.6 -> 6 blocks
    pos = torch.cat([torch.arange(70), torch.arange(1), torch.arange(300), torch.arange(200)])[None]
    seg = traced.segments_from_positions(pos)
    doc, start = document_blocks(seg, 64)
    assert doc.tolist() == [[1, 1, 3, 3, 3, 3, 4, 4, 4]]  # a straddling block belongs to the document it starts in
    assert start.tolist() == [[True, True, False, False, False, True, False, False, False]]
    scores = torch.tensor([[0.0, 0.0, 9.0, 8.0, 7.0, 0.0, -5.0, -6.0, -7.0]])  # doc 3 scores far higher
    idx, ok = keep_set(scores, seg != 0, 64, Fraction(3, 5), (0,), seg)
    blocks = sorted(set((idx[0][ok[0]] // 64).tolist()))
    assert {0, 1, 5} <= set(blocks)  # every document's first block
    assert 6 in blocks  # doc 4 keeps its best block although every doc-3 block scores higher
    # without segments: the plain top-k (block 0 forced), doc 4 gets nothing
    idx, ok = keep_set(scores, seg != 0, 64, Fraction(3, 5), (0,))
    assert not {6, 7, 8} & set((idx[0][ok[0]] // 64).tolist())


def test_left_padded_rows_force_their_first_real_block():
    from lemo_compile import traced
    from lemo_compile.selection import keep_set

    am = torch.ones(2, 300, dtype=torch.int64)
    am[0, :130] = 0  # blocks 0 and 1 padding, the first real token in block 2
    seg = traced.segments_from_padding(am)
    scores = torch.tensor([[5.0, 5.0, -9.0, 1.0, 2.0], [-9.0, 1.0, 2.0, 3.0, 4.0]])
    idx, ok = keep_set(scores, am.bool(), 64, Fraction(2, 5), (0,), seg)
    assert (idx[:, ::64] // 64).tolist() == [[2, 4], [0, 4]]
