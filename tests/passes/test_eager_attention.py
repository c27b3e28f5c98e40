"""Eager attention (q @ k^T, scale, mask, softmax, p @ v written out) becomes SDPA (passes.eager_attention,
issue 31): the rewritten graph computes the same values, what SDPA cannot express is left with a reason,
and a Llama loaded with attn_implementation="eager" then gets sparse layers equal to the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lemo_compile import LemoConfig
from lemo_compile.passes.eager_attention import sdpa_from_eager
from lemo_compile.reference import reference_forward
from lemo_compile.testing.models import assert_step_close, lemo_step_grads, random_batch, step_grads, tiny_model

_step, _close = step_grads, assert_step_close
_compiled = lemo_step_grads

B, H, N, D = 2, 3, 37, 8  # 37: no multiple of anything


def _mask():
    """Additive float mask (B, 1, N, N): causal, row 1 right-padded by 5 tokens (its last rows see nothing
    but the causal part of what is left), -1e9 for masked entries as HF's eager masks use finfo.min."""
    allowed = torch.ones(N, N).tril().bool().expand(B, 1, N, N).clone()
    allowed[1, :, :, N - 5:] = False
    return torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def plain(q, k, v, m):
    s = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + m
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(p, p=0.1, training=False), v)


def divided(q, k, v, m):  # BERT / RoFormer: divide by sqrt(d), then add
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
    return torch.matmul(torch.softmax(s + m, dim=-1), v)


def prescaled_shifted(q, k, v, m):  # query scaled first; max subtracted before the softmax (MiMo)
    s = torch.matmul(q * 0.5, k.transpose(-2, -1)) + m
    s = s - s.max(dim=-1, keepdim=True).values
    return torch.matmul(s.softmax(-1), v)


def permuted_keys(q, k, v, m):  # k^T made by a permute (GPT-1 style): SDPA gets a transpose of it
    return torch.matmul(torch.softmax(torch.matmul(q, k.permute(0, 1, 3, 2)) * 0.3 + m, -1), v)


def no_mask(q, k, v, m):
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.3, -1), v)


def soft_capped(q, k, v, m):  # Gemma 2
    s = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    s = torch.tanh(s / 50.0) * 50.0 + m
    return torch.matmul(torch.softmax(s, -1), v)


def sinks(q, k, v, m):  # scores read twice (GPT-OSS style sinks)
    s = torch.matmul(q, k.transpose(2, 3)) + m
    return torch.matmul(torch.softmax(s, -1), v) * torch.sigmoid(torch.logsumexp(s, -1, keepdim=True))


def mask_then_scale(q, k, v, m):  # the mask is scaled too: not SDPA's (qk^T) * c + mask
    return torch.matmul(torch.softmax((torch.matmul(q, k.transpose(2, 3)) + m) * 0.3, -1), v)


def dropout_training(q, k, v, m):
    return torch.matmul(F.dropout(torch.softmax(torch.matmul(q, k.transpose(2, 3)) + m, -1), 0.1, True), v)


def batched_3d(q, k, v, m):  # BART-era attention over (batch x heads, n, d), mask added in 4-D
    q3, k3, v3 = (t.reshape(B * H, N, D) for t in (q * 0.3, k, v))  # BART scales the query projection
    s = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, N, N) + m
    s = torch.max(s, torch.tensor(torch.finfo(s.dtype).min)).view(B * H, N, N)  # XGLM's clamp
    return torch.bmm(torch.softmax(s, -1), v3).view(B, H, N, D)


def baddbmm_scaled(q, k, v, m):  # GPT-NeoX-Japanese: alpha * q @ k^T over (batch x heads), then 4-D
    q3, k3 = (t.reshape(B * H, N, D) for t in (q, k))
    s = torch.baddbmm(torch.zeros(B * H, N, N), q3, k3.transpose(1, 2), beta=1.0, alpha=0.25)
    return torch.matmul(F.softmax(s.view(B, H, N, N) + m, dim=-1), v)


def batched_3d_mask_3d(q, k, v, m):  # a mask over (batch x heads) rows: SDPA would broadcast it otherwise
    q3, k3, v3 = (t.reshape(B * H, N, D) for t in (q, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)) + m.expand(B, H, N, N).reshape(B * H, N, N)
    return torch.bmm(torch.softmax(s, -1), v3).view(B, H, N, D)


def batched_3d_left_3d(q, k, v, m):  # output never viewed back to (batch, heads, n, d)
    q3, k3, v3 = (t.reshape(B * H, N, D) for t in (q, k, v))
    return torch.bmm(torch.softmax(torch.bmm(q3, k3.transpose(1, 2)), -1), v3) * 2


def where_masked(q, k, v, m):  # GPT-Neo: scores in fp32, causal torch.where with finfo.min, then a mask
    s = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2))
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    pad = torch.zeros(1, 1, N, N).masked_fill(torch.arange(N) == 3, torch.finfo(torch.float32).min)  # key 3 off
    s = torch.where(causal, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype)) + pad
    return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)


def where_masked_input(q, k, v, m):  # the same with the mask an input (padding): a row may see no key
    s = torch.matmul(q, k.transpose(-1, -2))
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    return torch.matmul(torch.softmax(torch.where(causal, s, torch.tensor(torch.finfo(s.dtype).min)) + m, -1), v)


def where_full_row(q, k, v, m):  # scaled, then where; row 3 sees no key: uniform, but the gradients differ
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.3
    allowed = torch.ones(N, N, dtype=torch.bool).tril() & (torch.arange(N) != 3)[:, None]
    return torch.matmul(torch.softmax(torch.where(allowed, s, torch.tensor(-3.4e38)), -1), v)


def where_written_in_place(q, k, v, m):  # the same row cleared in place after the condition is built
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.3
    allowed = torch.ones(N, N, dtype=torch.bool).tril()
    allowed[3] = False
    return torch.matmul(torch.softmax(torch.where(allowed, s, torch.tensor(-3.4e38)), -1), v)


def plain_empty_row(q, k, v, m):  # a constant additive mask under which query 3 sees no key
    allowed = torch.ones(N, N, dtype=torch.bool).tril() & (torch.arange(N) != 3)[:, None]
    return plain(q, k, v, torch.zeros(N, N).masked_fill(~allowed, torch.finfo(torch.float32).min))


def bool_added(q, k, v, m):  # a bool tensor added to the scores adds 0 or 1; SDPA would read a mask
    s = torch.matmul(q, k.transpose(-1, -2)) + torch.ones(N, N, dtype=torch.bool).tril()
    return torch.matmul(torch.softmax(s, -1), v)


def plain_mask_input(q, k, v, m):  # the mask an input: it may leave a query no key
    return plain(q, k, v, m)


MASK_INPUT = (where_masked_input, plain_mask_input)


def where_small_fill(q, k, v, m):  # a fill of -1e4 is a bias, not a mask: s + c differs from c
    s = torch.matmul(q, k.transpose(-1, -2))
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    return torch.matmul(torch.softmax(torch.where(causal, s, torch.tensor(-1e4)), -1), v)


def _captured(fn):
    """The Dynamo graph of fn (example values in its meta, as lemo's passes see it), the mask built in the
    graph from constants, or an input for the fns of MASK_INPUT (a user's mask, HF's padding mask)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    if fn in MASK_INPUT:
        torch.compile(fn, backend=backend, fullgraph=True)(*_qkv(), _mask())
    else:
        torch.compile(lambda q, k, v: fn(q, k, v, _mask()), backend=backend, fullgraph=True)(*_qkv())
    (gm,) = graphs
    return gm


@pytest.mark.parametrize("fn", [plain, divided, prescaled_shifted, permuted_keys, no_mask, batched_3d, baddbmm_scaled,
                                where_masked])
def test_provable_chains_become_one_sdpa_with_the_same_values_and_gradients(fn):
    gm = _captured(fn)
    res = sdpa_from_eager(gm)
    assert res.counters["attention_rewritten"] == 1 and not res.skips
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention in targets
    assert not any(t in (F.softmax, torch.softmax) for t in targets)
    got, want = _values_and_grads(lambda *a: _call(gm, a), fn)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # gradients: sums of n products


def _values_and_grads(*fns):
    """(output, dq, dk, dv) of each fn on the same q, k, v, mask and a random output gradient."""
    res = []
    for fn in fns:
        q, k, v = (t.requires_grad_() for t in _qkv(seed=1))
        out = fn(q, k, v, _mask())
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        res.append((out.detach(), q.grad, k.grad, v.grad))
    return res


def test_where_mask_gradient_of_a_row_that_sees_no_key():
    """Why a torch.where mask is made SDPA only where every query keeps a key: a row that sees none is
    uniform either way, but the where passes no gradient to the scores it masks, SDPA's mask does. (SDPA's
    math kernel: the fused CPU kernel is further off there, its backward recomputing probabilities from a
    log-sum-exp that rounds to the mask value.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def as_sdpa(q, k, v, m):
        allowed = torch.ones(N, N, dtype=torch.bool).tril()
        allowed[3] = False
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(allowed, 0.0, -3.4e38), scale=0.3)

    (out, dq, dk, dv), (out_sdpa, dq_sdpa, dk_sdpa, dv_sdpa) = _values_and_grads(where_full_row, as_sdpa)
    torch.testing.assert_close(out_sdpa, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dv_sdpa, dv, rtol=1e-5, atol=1e-6)
    assert dq[:, :, 3].abs().max() == 0 and dq_sdpa[:, :, 3].abs().max() > 1e-3
    assert not torch.allclose(dk_sdpa, dk, rtol=1e-3, atol=1e-4)


def _call(gm, args):
    """gm on (q, k, v, m) whatever order Dynamo lifted them in (placeholders L_q_, L_k_, ...)."""
    named = dict(zip("qkvm", args))
    return gm(*(named[n.name[2]] for n in gm.graph.nodes if n.op == "placeholder"))[0]


@pytest.mark.parametrize("fn,kind,words", [
    (soft_capped, "eager_attention", "tanh"),
    (sinks, "eager_attention", "read 2 times"),
    (mask_then_scale, "eager_attention", "added before a scale"),
    (dropout_training, "attention_dropout", "p=0.1 while training"),
    (batched_3d_mask_3d, "eager_attention", "not 4-D"),
    (batched_3d_left_3d, "eager_attention", "not viewed back"),
    (where_small_fill, "eager_attention", "bottom of the float range"),
    (where_masked_input, "eager_attention", "reads the input"),
    (plain_mask_input, "eager_attention", "may leave a query no key"),
    (where_full_row, "eager_attention", "a query sees no key"),
    (where_written_in_place, "eager_attention", "written in place by setitem"),
    (plain_empty_row, "eager_attention", "a query sees no key"),
    (bool_added, "eager_attention", "torch.bool tensor added to torch.float32 scores"),
])
def test_what_sdpa_cannot_express_is_left_as_written_with_the_reason(fn, kind, words):
    gm = _captured(fn)
    before, nodes = gm.code, len(gm.graph.nodes)
    res = sdpa_from_eager(gm)
    assert res.counters["attention_rewritten"] == 0
    (skip,) = res.skips
    assert skip.kind == kind and words in skip.detail, str(skip)
    assert gm.code == before and len(gm.graph.nodes) == nodes  # nothing inserted before the refusal


def test_a_mask_of_another_dtype_is_refused():
    graphs = []
    torch._dynamo.reset()
    torch.compile(plain, backend=lambda gm, ex: graphs.append(gm) or gm, fullgraph=True)(
        *(t.double() for t in _qkv()), _mask())
    res = sdpa_from_eager(graphs[0])
    assert res.skips and "a torch.float32 tensor added to torch.float64 scores" in res.skips[0].detail


# -- a whole model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_llama():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    return model








def _batch(model):
    """Documents packed into 2 rows of 150 (position_ids, no attention_mask; a one-token document): a
    mask read from an input that leaves every query a key (its own)."""
    from lemo_compile.testing.padding import packed_batch

    return packed_batch(150, seed=3)


@pytest.mark.parametrize("attn_mode,mlp_mode", [("backward", "backward"), ("tokens", "tokens"), ("keys", "dense")])
def test_eager_llama_is_sparse_and_equals_the_reference(eager_llama, attn_mode, mlp_mode):
    batch = _batch(eager_llama)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, attn_mode=attn_mode, mlp_mode=mlp_mode, predictor="random")
    *got, recs = _compiled(eager_llama, cfg, batch)
    (rec,) = [r for r in recs if r.detect and r.detect.layers]
    assert rec.eager_attention.counters["attention_rewritten"] == 4
    assert [d["layer"] for d in rec.sparsify.layers] == [2]
    want = _step(eager_llama, lambda **b: reference_forward(eager_llama, cfg, **b).output, batch)
    assert all(torch.isfinite(g).all() for g in got[1].values())
    _close(tuple(got), want)


def test_eager_llama_at_keep_one_equals_its_own_eager_run(eager_llama):
    batch = _batch(eager_llama)
    got = _compiled(eager_llama, LemoConfig(inner="eager", keep_ratio=1.0), batch)[:2]
    _close(got, _step(eager_llama, eager_llama, batch))


@pytest.mark.parametrize("kind", ["left", "right", "empty_row"])
def test_eager_llama_with_a_padding_mask_stays_eager_and_equals_the_model(eager_llama, kind):
    """A padding mask may leave a query no key (left padding; which side cannot be known at compile time).
    Its eager softmax averages every value; HF's loss reads it (the last pad token predicts the first real
    one), and SDPA's fused backward (CPU) is off there by thousands: the chain stays as written, with
    the reason, and the step equals the model's."""
    from lemo_compile.testing.padding import padded_batch

    batch = padded_batch(kind)
    got = _compiled(eager_llama, LemoConfig(inner="eager", keep_ratio=1.0), batch)
    skips = [s for r in got[2] if r.eager_attention for s in r.eager_attention.skips]
    assert len(skips) == 4 and all("may leave a query no key" in s.detail for s in skips), skips
    _close(tuple(got[:2]), _step(eager_llama, eager_llama, batch))


def test_checkpointed_eager_llama_checks_the_mask_its_layers_receive(eager_llama):
    """Under gradient checkpointing each layer's mask is an operand of the checkpoint: the pass checks the
    root-graph mask it stands for (packed: every query keeps a key), rewrites every layer and equals the
    model."""
    eager_llama.gradient_checkpointing_enable()
    eager_llama.train()
    try:
        batch = _batch(eager_llama)
        got = _compiled(eager_llama, LemoConfig(inner="eager", keep_ratio=1.0), batch)
        assert sum(r.eager_attention.counters["attention_rewritten"] for r in got[2] if r.eager_attention) == 4
        assert not [s for r in got[2] if r.eager_attention for s in r.eager_attention.skips]
        _close(tuple(got[:2]), _step(eager_llama, eager_llama, batch))
    finally:
        eager_llama.gradient_checkpointing_disable()
        eager_llama.eval()


def test_switched_off_it_leaves_eager_layers_dense_and_says_why(eager_llama):
    batch = _batch(eager_llama)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, eager_attention=False)
    with pytest.warns(UserWarning, match="trains dense"):
        *got, recs = _compiled(eager_llama, cfg, batch)
    assert not any(r.sparsified for r in recs)
    assert any("scaled_dot_product_attention" in str(s) for r in recs if r.detect for s in r.detect.skips)
    _close(tuple(got), _step(eager_llama, eager_llama, batch))


# -- an eager-only model whose rotary table carries the sequence on axis 2 -----------------------------


@pytest.fixture(scope="module")
def roformer():
    """RoFormer's causal LM: attention written into the model (no SDPA path, no attention interface, so
    lemo_compile.reference cannot make it sparse) and sinusoidal positions (1, 1, n, d) as a block input."""
    import transformers

    from lemo_compile.testing import sweep

    cfg = sweep.tiny_config("roformer", "RoFormerForCausalLM")
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    return transformers.RoFormerForCausalLM(cfg).to(torch.float32).eval()


@pytest.mark.parametrize("attn_mode,mlp_mode", [("tokens", "tokens"), ("backward", "backward")])
def test_roformer_rotary_table_is_gathered_on_its_own_axis(roformer, attn_mode, mlp_mode):
    """Every block kept (keep 0.99 of 4 blocks): the sparse layer is rewritten, its rotary table gathered
    on axis 2, and tokens mode must equal dense; backward mode's forward equals dense at any keep."""
    batch = random_batch(roformer.config.vocab_size, 2, 200, seed=4)
    del batch["attention_mask"]  # a padding mask keeps eager attention as written (see the Llama test)
    dense = _step(roformer, roformer, batch)
    for keep in (0.99, 0.5):
        cfg = LemoConfig(inner="eager", keep_ratio=keep, attn_mode=attn_mode, mlp_mode=mlp_mode, predictor="random")
        *got, recs = _compiled(roformer, cfg, batch)
        (rec,) = [r for r in recs if r.sparsified]
        assert [d["layer"] for d in rec.sparsify.layers] == [2]
        assert "gather_seq" in rec.after and all(torch.isfinite(g).all() for g in got[1].values())
        if keep == 0.99 and attn_mode == "tokens":
            _close(tuple(got), dense)
        if attn_mode == "backward":  # forward exact
            torch.testing.assert_close(got[0], dense[0], rtol=1e-6, atol=0)
            if keep == 0.5:  # ... and the gradient is not the dense one
                assert any(not torch.allclose(got[1][k], dense[1][k]) for k in dense[1])


@pytest.mark.parametrize("kind", ["left", "empty_row", "no_mask"])
def test_gpt_neo_where_mask_is_sdpa_only_where_every_query_keeps_a_key(kind):
    """GPT-Neo masks its fp32 scores with torch.where(causal buffer, s, finfo.min), then adds HF's mask. With
    no attention_mask the buffer and HF's causal mask are evaluated at compile time, every query keeps its
    own key: SDPA, a sparse layer, equal to the model at keep 1.0. With an attention_mask (left padding: a
    query that sees no key; a fully padded row) the rows cannot be checked: left dense with the reason, and
    still finite and equal to the model (test_where_mask_gradient_of_a_row_that_sees_no_key says why)."""
    from lemo_compile.testing import sweep
    from lemo_compile.testing.padding import padded_batch

    model = sweep.build_model("gpt_neo", sweep.causal_lm_classes()["gpt_neo"])
    batch = padded_batch("left" if kind == "no_mask" else kind)
    if kind == "no_mask":
        batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    want = _step(model, model, batch)
    loss, grads, recs = _compiled(model, LemoConfig(inner="eager", keep_ratio=1.0), batch)
    skips = [s for r in recs if r.eager_attention for s in r.eager_attention.skips]
    if kind == "no_mask":
        assert not skips and sum(r.eager_attention.counters["attention_rewritten"] for r in recs) == 4
        assert any(r.sparsified for r in recs)
    else:
        assert len(skips) == 4 and all("attention_mask" in s.detail and "may leave a query no key" in s.detail
                                       for s in skips), skips  # the input's name differs across torch versions
        assert not any(r.sparsified for r in recs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    _close((loss, grads), want)
