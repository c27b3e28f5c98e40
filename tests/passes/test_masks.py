"""passes.masks: padded and packed masks carried as segments (no n x n tensor), exact."""

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig, traced
from lemo_compile.kernels import attention
from lemo_compile.testing.models import tiny_model, trainable_grads
from lemo_compile.testing.padding import padded_batch


def _compiled(model, cfg, batch):
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend=lemo_compile.backend(cfg))(**batch)
    out.loss.backward()
    rec = [r for r in lemo_compile.records() if r.detect and r.detect.layers][-1]
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, rec


def _dense(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _plain_and_checkpointed(model, cfg, batch):
    """_compiled without, then with HF gradient checkpointing (non-reentrant); checkpointing left off."""
    plain = _compiled(model, cfg, batch)
    torch._dynamo.reset()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        return plain, _compiled(model, cfg, batch)
    finally:
        model.gradient_checkpointing_disable()


def _close(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    for k in b[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("attn_mode", ["backward", "tokens"])
@pytest.mark.parametrize("kind,expect", [("left", "padding"), ("right", "padding"), ("empty_row", "padding"),
                                         ("packed", "packed")])
def test_masks_become_segments_and_no_mask_is_left(kind, expect, attn_mode):
    model = tiny_model("qwen2", lora=True)
    batch = padded_batch(kind)
    cfg = LemoConfig(inner="eager", keep_ratio=1.0, dense_layers=(0,), attn_mode=attn_mode, predictor="random")
    got = _compiled(model, cfg, batch)
    rec = got[2]
    assert list(rec.masks.structured.values()) == [expect] and not rec.masks.skips
    # every attention that ran the mask runs lemo::segment_attention (dense layer 0; in tokens mode the
    # compacted attention of the sparse layers too), and no mask tensor is built
    assert rec.masks.counters["segment_attention"] == (1 if attn_mode == "backward" else 4)
    code = "\n".join(line for line in rec.after.splitlines() if not line.strip().startswith("#"))
    assert "segment_mask" not in code and "scaled_dot_product_attention" not in code, code
    _close(got[:2], _dense(model, batch))  # keep 1.0 is the dense model


@pytest.mark.parametrize("kind", ["left", "packed"])
def test_checkpointed_layers_read_segments(kind):
    """Under gradient checkpointing the mask enters each layer's checkpoint body as an operand: the
    segments go in instead, and the result equals the run without checkpointing."""
    model = tiny_model("llama", lora=True)
    batch = padded_batch(kind)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0, 3), predictor="random")
    model.train()
    plain, ckpt = _plain_and_checkpointed(model, cfg, batch)
    rec = ckpt[2]
    assert rec.masks.structured and rec.masks.counters["segment_attention"] == 2  # dense layers 0 and 3
    assert rec.sparsify.counters["sparse_layers"] == 2
    _close(ckpt[:2], plain[:2])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_checkpointed_causal_attention_runs_lemo_attention(arch):
    """With no mask, the checkpointed layers' causal SDPA calls (dense layers; sparse ones already run lemo's
    ops) become lemo::attention_lse, which AOT autograd does not count as a random op; the step equals the
    run without checkpointing (SDPA) and, at keep 1.0, the eager model."""
    model = tiny_model(arch, lora=True)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 256, (2, 150), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    model.train()
    for keep in (0.5, 1.0):
        torch._dynamo.reset()
        plain, ckpt = _plain_and_checkpointed(model, LemoConfig(inner="eager", keep_ratio=keep, predictor="random"),
                                              batch)
        assert plain[2].masks.counters["causal_attention"] == 0  # not checkpointed: SDPA stays
        assert ckpt[2].masks.counters["causal_attention"] == 3  # dense layers 0, 1, 3 (2 is rewritten, even at 1.0)
        assert "run lemo::attention_lse" in ckpt[2].attention_path
        _close(ckpt[:2], plain[:2])
    _close(ckpt[:2], _dense(model, batch))


def _peak_growth(model, batch, cfg) -> float:
    ex = lemo_compile.explain(model, **batch, config=cfg, dynamic=True)
    est = max((r.memory for r in ex.records if r.memory is not None), key=lambda e: e.peak_hint)
    peak = est.peak_bytes
    (s,) = [x for x in peak.free_symbols]
    return float(peak.subs(s, 1 << 21) / peak.subs(s, 1 << 20))


@pytest.mark.parametrize("kind", ["left", "packed"])
def test_dynamic_peak_has_no_quadratic_term(kind):
    """explain(dynamic=True): the symbolic peak of a padded / packed step grows linearly in the length
    with the masks carried as segments (doubling the length at 1M tokens less than doubles the peak),
    and quadratically without (the n x n mask: about 4x)."""
    batch = padded_batch(kind, n=256)
    cfg = LemoConfig(inner="eager", dense_layers=(0,))
    assert _peak_growth(tiny_model("llama", lora=True), batch, cfg) < 2.01
    assert _peak_growth(tiny_model("llama", lora=True), batch, cfg.replace(causal_mask=False)) > 3.5


def test_sliding_window_masks_stay_tensors_with_a_reason():
    model = tiny_model("gemma3", lora=True)  # layers alternate sliding window (96) and full attention
    _, _, rec = _compiled(model, LemoConfig(inner="eager", dense_layers=(0,), predictor="random"),
                          padded_batch("right"))
    assert list(rec.masks.structured.values()) == ["padding"]  # the full-attention layers' mask
    assert len(rec.masks.skips) == 1 and "sliding window" in rec.masks.skips[0].detail


class _PrefixLM(torch.nn.Module):
    """Attention whose mask comes from an attention_mask but is not causal + padding: the first 8 tokens
    see each other (a prefix-LM pattern)."""

    def forward(self, q, k, v, attention_mask):
        n = q.shape[2]
        i = torch.arange(n)
        allowed = (i[None, :] <= i[:, None]) | ((i[None, :] < 8) & (i[:, None] < 8))
        mask = allowed[None, None] & attention_mask[:, None, None, :].bool()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_mask_that_is_not_padding_or_packing_keeps_the_tensor():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g) for _ in range(3))
    am = torch.ones(2, 40, dtype=torch.int64)
    am[1, :5] = 0
    want = _PrefixLM()(q, k, v, am)
    got = torch.compile(_PrefixLM(), backend=lemo_compile.backend(LemoConfig(inner="eager")))(q, k, v, am)
    rec = [r for r in lemo_compile.records() if r.masks is not None][-1]
    assert not rec.masks.structured and "neither" in rec.masks.skips[0].detail
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_segment_attention_is_sdpa_under_the_segment_mask(kv_heads):
    """The op against SDPA with the mask the segments stand for, fp64, on rows of real tokens (padding
    rows: 0): left padding, packed documents with a one-token one, a hole, a fully padded row, and a row
    the way TRL pads a packed batch (60 one-token documents, then three of 7 tokens and one of 11: the
    op batches equal-length segments into one call)."""
    g = torch.Generator().manual_seed(1)
    b, h, n, d = 4, 4, 150, 16
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    seg = torch.zeros(b, n, dtype=torch.int32)
    seg[0, 5:] = 1
    seg[1, :40], seg[1, 40], seg[1, 41:120], seg[1, 130] = 1, 2, 3, 3
    seg[3, 50:110] = torch.arange(1, 61)
    seg[3, 110:131] = torch.arange(61, 64).repeat_interleave(7)
    seg[3, 131:142] = 64
    out, lse = torch.ops.lemo.segment_attention(q, k, v, seg, d ** -0.5)
    rep = h // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                            attn_mask=traced.segment_mask(seg))
    want = torch.where((seg != 0)[:, None, :, None], want, 0.0)
    # the twin computes in fp32: its own rounding
    assert (out - want).abs().max() < 1e-5 and (out[2] == 0).all() and (lse[2] == float("-inf")).all()
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert (a - w).abs().max() < 1e-4 * w.abs().max()


def test_checkpointed_segments_under_inductor():
    """The 8B real loop's setting (Inductor, gradient checkpointing, a padded batch): exact against the
    eager inner compiler's run."""
    model = tiny_model("llama", lora=True)
    batch = padded_batch("left")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0, 3), predictor="random")
        eager = _compiled(model, cfg, batch)
        torch._dynamo.reset()
        ind = _compiled(model, cfg.replace(inner="inductor"), batch)
    finally:
        model.gradient_checkpointing_disable()
    assert ind[2].masks.counters["segment_attention"] == 2 and ind[2].sparsify.counters["sparse_layers"] == 2
    _close(ind[:2], eager[:2])


def test_kept_backward_segment_groups_match_the_twin(monkeypatch):
    """The CUDA kept-rows backward over segments batches equal-length segments (one flash call per group).
    Its grouping, gather and scatter, checked on CPU with the flash call replaced by the twin: equal to
    the twin over the whole row with segment ids, on one-token documents, equal-length ones, a hole and
    padding."""
    g = torch.Generator().manual_seed(2)
    b, h, kvh, n, d = 2, 4, 2, 90, 8
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, kvh, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    seg = torch.zeros(b, n, dtype=torch.int64)
    seg[0, :30] = torch.arange(1, 31)
    seg[0, 30:60] = torch.arange(31, 34).repeat_interleave(10)
    seg[0, 60:85] = 34
    seg[1, 3:40], seg[1, 50:60] = 1, 1  # one segment with a hole
    seg[1, 60:89] = 2
    scale = d ** -0.5
    out, lse = attention.segment_attention_lse_impl(q, k, v, seg, scale)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).masked_fill((seg == 0)[:, None, :, None], 0)
    pos = torch.arange(n).expand(b, n)
    want = attention.attention_kept_backward_torch(grad, q, k, v, out, lse, None, scale, pos=pos, valid=seg)

    def flash_on_cpu(go, q, k, v, out, lse, valid, scale):
        p = torch.arange(q.shape[2]).expand(q.shape[0], -1)
        return attention.attention_kept_backward_torch(go, q, k, v, out, lse, None, scale, pos=p, valid=valid)

    calls = []
    monkeypatch.setattr(attention, "attention_kept_backward_flash",
                        lambda *a: calls.append(a[1].shape[2]) or flash_on_cpu(*a))
    monkeypatch.setattr(attention, "FLASH_MIN_SEGMENT", 10)  # 10 tokens or more: "flash"; one-token ones: the twin
    got = attention._kept_backward_flash_segments(grad, q, k, v, out, lse, seg, scale)
    assert sorted(calls) == [10, 25, 29, 47]
    for a, w in zip(got, want):
        assert a.shape == w.shape and (a - w).abs().max() < 1e-6 * w.abs().max()


def test_segment_calls_send_short_segments_to_the_twin_in_bounded_batches():
    """A row the way TRL pads a packed 8B/32K batch (thousands of one-token documents) made PyTorch's flash
    backward ask for 58 GiB (every segment padded to a 128-row tile). Segments shorter than a tile run the
    twin, split so that a call's scores stay within the budget; longer ones stay one flash call per length;
    every token is in exactly one call."""
    b, h, n = 2, 4, 3000
    seg = torch.zeros(b, n, dtype=torch.int64)
    seg[0, :2000] = torch.arange(1, 2001)  # one-token documents
    seg[0, 2000:2390] = torch.arange(2001, 2004).repeat_interleave(130)
    seg[0, 2390:2990] = 2004
    seg[1, 10:2010] = torch.arange(1, 1001).repeat_interleave(2)
    seg[1, 2100:2300] = 1001
    budget = 3000
    seen = torch.zeros(b, n, dtype=torch.int64)
    flash_lengths = []
    for (rows, cols), flash in attention._segment_calls(seg, h, budget):
        if isinstance(cols, slice):
            count, length = 1, cols.stop - cols.start
            seen[rows, cols] += 1
        else:
            count, length = cols.shape
            seen[rows, cols] += 1
        assert flash == (length >= attention.FLASH_MIN_SEGMENT)
        if flash:
            flash_lengths.append((count, length))
        else:
            assert count * h * length * length <= budget
    assert sorted(flash_lengths) == [(1, 200), (1, 600), (3, 130)]
    assert torch.equal(seen, (seg != 0).long())


def test_dynamic_length_masks_are_read_band_by_band(monkeypatch):
    """A dynamic-length graph's padding mask is read a band of rows at a time, as a static one is: with
    whole-mask evaluation off it is still carried as segments (before, symbolic sizes always evaluated
    the whole n x n mask, and a mask over FULL_EVAL_BYTES stayed a tensor)."""
    from lemo_compile.passes import masks

    monkeypatch.setattr(masks, "FULL_EVAL_BYTES", 0)
    batch = padded_batch("left", n=256)
    ex = lemo_compile.explain(tiny_model("llama", lora=True), **batch,
                              config=LemoConfig(inner="eager", dense_layers=(0,)), dynamic=True)
    rec = next(r for r in ex.records if r.masks is not None)
    assert list(rec.masks.structured.values()) == ["padding"], rec.masks.skips


@pytest.mark.parametrize("kind", ["left", "right", "empty_row", "packed"])
def test_dynamic_length_padded_and_packed_batches_equal_the_model(monkeypatch, kind):
    """A dynamic-length graph's padded / packed mask read band by band (whole evaluation off) is carried
    as segments and, at keep_ratio 1.0, gives the model's own loss and gradients: left padding (queries
    that see no key), right padding, a fully padded row whose labels are all ignored, packed documents."""
    from lemo_compile.backend import clear_records
    from lemo_compile.passes import masks
    from lemo_compile.testing.models import assert_step_close, step_grads

    monkeypatch.setattr(masks, "FULL_EVAL_BYTES", 0)
    model = tiny_model("llama", lora=True)
    batch = padded_batch(kind)
    torch._dynamo.reset()
    clear_records()
    compiled = torch.compile(model, backend=lemo_compile.backend(LemoConfig(inner="eager", keep_ratio=1.0)),
                             dynamic=True)
    got = step_grads(model, compiled, batch)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1].values())
    rec = next(r for r in lemo_compile.records() if r.masks is not None and r.masks.structured)
    assert list(rec.masks.structured.values()) == ["packed" if kind == "packed" else "padding"]
    assert_step_close(got, step_grads(model, model, batch))
