"""passes.peak_cut and lemo::linear_cross_entropy: same loss and gradients as the unsegmented graph,
the pass fires on the HF causal-LM loss of every architecture and leaves other losses alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.kernels import linear_cross_entropy as lce
from lemo_compile.backend import clear_records
from lemo_compile.testing.models import ARCHS, random_batch, tiny_model, trainable_grads

# --------------------------------------------------------------------------------------------------
# the op against F.cross_entropy(F.linear(...))
# --------------------------------------------------------------------------------------------------


def _reference(x, w, b, t, ignore_index, reduction, upcast):
    logits = F.linear(x, w, b)
    if upcast:
        logits = logits.float()
    return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction)


def _inputs(n, d, vocab, dtype, bias, ignored, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.randperm(n, generator=gen)[:ignored]] = -100
    return x, w, b, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [1, 7, 1000], ids=["rows1", "rows7", "one_segment"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_op_matches_cross_entropy_fp64(reduction, rows, bias):
    x, w, b, t = _inputs(53, 24, 37, torch.float64, bias, ignored=11)
    ref = _reference(x, w, b, t, -100, reduction, upcast=False)
    params = [p for p in (x, w, b) if p is not None]
    ref_grads = torch.autograd.grad(ref * 1.7, params)  # upstream gradient != 1
    out = torch.ops.lemo.linear_cross_entropy(x, w, b, t, -100, reduction, False, rows, True, True)[0]
    grads = torch.autograd.grad(out * 1.7, params)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


def test_op_fp32_upcast_bf16_within_reference_rounding():
    """bf16 inputs: error against the fp64 truth no worse than about twice that of the bf16 graph."""
    x, w, _, t = _inputs(90, 32, 61, torch.float64, False, ignored=5, seed=3)
    truth = _reference(x, w, None, t, -100, "mean", upcast=False)
    gt = torch.autograd.grad(truth, (x,))[0]
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16()
    ref = _reference(xb, wb, None, t, -100, "mean", upcast=True)
    g_ref = torch.autograd.grad(ref, (xb,))[0]
    out = torch.ops.lemo.linear_cross_entropy(xb, wb, None, t, -100, "mean", True, 16, True, False)[0]
    g_out = torch.autograd.grad(out, (xb,))[0]
    assert out.dtype == torch.float32
    ref_err = (g_ref.double() - gt).abs().max().item()
    our_err = (g_out.double() - gt).abs().max().item()
    assert our_err <= 2 * ref_err + 1e-6, (our_err, ref_err)
    assert abs(out.double() - truth).item() <= 2 * abs(ref.double() - truth).item() + 1e-6


def test_op_all_targets_ignored_is_nan_like_torch():
    x, w, _, t = _inputs(9, 8, 11, torch.float64, False, ignored=9)
    ref = _reference(x, w, None, t, -100, "mean", upcast=False)
    out = torch.ops.lemo.linear_cross_entropy(x, w, None, t, -100, "mean", False, 4, False, False)[0]
    assert torch.isnan(ref) and torch.isnan(out)


def test_op_rejects_targets_out_of_range():
    x, w, _, t = _inputs(9, 8, 11, torch.float64, False, ignored=0)
    t[3] = 11
    with pytest.raises(ValueError, match="outside"):
        torch.ops.lemo.linear_cross_entropy(x, w, None, t, -100, "mean", False, 4, False, False)


def test_segment_rows_from_budget():
    # bf16 logits + their fp32 copy (the twin): 6 bytes per logit; rounded down to whole 128-row tiles
    assert lce.segment_rows(128256, 1 << 30, True, 2) == 1280  # 1395 rows fit
    assert lce.segment_rows(128256, 1 << 30, True, 2, fused=True) == 4096  # the kernel: logits only
    assert lce.segment_rows(128256, 100 * 128256 * 4, False, 4) == 50  # fp32 kept: logits + a clone
    assert lce.segment_rows(128256, 10, True, 2) == 1  # the finest segmentation is one row


# --------------------------------------------------------------------------------------------------
# the pass on HF models
# --------------------------------------------------------------------------------------------------


def _run(model, backend, batch, fn=None, **kw):
    if fn is None:
        fn = torch.compile(model, backend=backend) if backend is not None else model
    out = fn(**batch, **kw)
    out.loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return out, grads


def _dense_cfg(**kw):
    return LemoConfig(inner="eager", dense_layers=(0, 1, 2, 3), segment_bytes=40 * 256 * 8, **kw)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_pass_exact_on_every_arch(arch, lora):
    model = tiny_model(arch, lora=lora)
    batch = random_batch(256, 2, 150, seed=1, pad_right=[0, 9])
    ref, ref_grads = _run(model, None, batch)
    out, grads = _run(model, lemo_compile.backend(_dense_cfg()), batch)
    rec = lemo_compile.records()[-1]
    assert rec.peak_cut.counters["losses_segmented"] == 1 and not rec.peak_cut.skips
    assert rec.peak_cut.losses[0]["segment_rows"] == 40  # fp32: 8 bytes per logit; 300 rows in 8 segments
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    # padding positions: attention runs per segment (passes.masks), so their logits are those of a row that
    # sees no key, as with HF's flash-attention path; every real position's logits are the model's
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)  # lemo's attention twin rounds differently from SDPA
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_pass_with_sparse_layers_checkpointing_and_num_items():
    """The segmented loss composes with token elimination and HF gradient checkpointing, and with the
    sum-then-divide loss HF uses when num_items_in_batch is given."""
    model = tiny_model("qwen3", lora=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = random_batch(256, 2, 150, seed=4, pad_right=[0, 20])
    kw = {"num_items_in_batch": torch.tensor(250)}
    sparse = dict(inner="eager", keep_ratio=0.5, predictor="random")
    ref, ref_grads = _run(model, lemo_compile.backend(LemoConfig(**sparse, peak_cut=False)), batch, **kw)
    torch._dynamo.reset()
    clear_records()
    out, grads = _run(model, lemo_compile.backend(LemoConfig(**sparse, segment_bytes=8 * 256 * 8)), batch, **kw)
    recs = lemo_compile.records()
    assert sum(r.peak_cut.counters["losses_segmented"] for r in recs if r.peak_cut) == 1
    assert any(r.sparsified for r in recs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_logits_drop_returns_empty_logits_and_same_grads():
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 130, seed=2)
    ref, ref_grads = _run(model, None, batch)
    out, grads = _run(model, lemo_compile.backend(_dense_cfg(logits="drop")), batch)
    assert out.logits.shape == (1, 130, 0)
    assert lemo_compile.records()[-1].peak_cut.losses[0]["logits"] == "dropped"
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_logits_drop_keeps_logits_of_evaluation_graphs():
    """eval() + no_grad() with labels (an evaluation loop computing its loss): the logits are real."""
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 130, seed=2)
    compiled = torch.compile(model, backend=lemo_compile.backend(_dense_cfg(logits="drop")))
    with torch.no_grad():
        want = model(**batch)
        got = compiled(**batch)
    assert got.logits.shape == (1, 130, 256)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-6, atol=0)
    assert lemo_compile.records()[-1].peak_cut.losses[0]["logits"].startswith("kept (no gradient")
    out = compiled(**batch)  # the training graph (grad mode on) still drops them
    assert out.logits.shape == (1, 130, 0)


def test_dynamic_length_one_compile():
    model = tiny_model("mistral", lora=True)
    backend = lemo_compile.backend(_dense_cfg())
    compiled = torch.compile(model, backend=backend, dynamic=True)
    compiles = []
    clear_records()
    for n in (97, 161):
        batch = random_batch(256, 1, n, seed=n)
        ref, ref_grads = _run(model, None, batch)
        out, grads = _run(model, None, batch, fn=compiled)
        torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
        compiles.append(len(lemo_compile.records()))
    assert compiles[0] == compiles[1]  # no recompile for the second length
    assert any(r.peak_cut and r.peak_cut.losses for r in lemo_compile.records())


def test_inference_graph_computes_no_gradients():
    model = tiny_model("llama")
    batch = random_batch(256, 1, 70, seed=5)
    with torch.no_grad():
        ref = model(**batch).loss
        out = torch.compile(model, backend=lemo_compile.backend(_dense_cfg()))(**batch).loss
    d = lemo_compile.records()[-1].peak_cut.losses[0]
    assert not d["grad_hidden"] and not d["grad_weight"]
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)


class _Head(nn.Module):
    def __init__(self, softcap=None, smoothing=0.0, cast=torch.float32):
        super().__init__()
        self.lin = nn.Linear(16, 40, bias=False)
        self.softcap, self.smoothing, self.cast = softcap, smoothing, cast

    def forward(self, h, labels):
        logits = self.lin(h)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits.to(self.cast).view(-1, 40), labels.view(-1), label_smoothing=self.smoothing)


@pytest.mark.parametrize("head,kind", [(dict(softcap=30.0), "loss_chain"), (dict(smoothing=0.1), "loss_form"),
                                       (dict(cast=torch.bfloat16), "loss_chain")],
                         ids=["softcap", "label_smoothing", "downcast"])
def test_pass_leaves_unsupported_losses_alone(head, kind):
    mod = _Head(**head)
    h, labels = torch.randn(2, 30, 16), torch.randint(0, 40, (2, 30))
    out = torch.compile(mod, backend=lemo_compile.backend(LemoConfig(inner="eager")))(h, labels)
    torch.testing.assert_close(out, mod(h, labels))
    rec = lemo_compile.records()[-1]
    assert rec.peak_cut.counters == {f"skip_{kind}": 1}
    assert not rec.rewritten and kind in rec.left_alone


def test_plain_head_is_segmented_without_decoder_layers():
    mod = _Head()
    h, labels = torch.randn(2, 30, 16, requires_grad=True), torch.randint(0, 40, (2, 30))
    labels[0, :5] = -100
    ref = mod(h, labels)
    ref_grads = torch.autograd.grad(ref, (h, mod.lin.weight))
    out = torch.compile(mod, backend=lemo_compile.backend(LemoConfig(inner="eager", segment_bytes=100)))(h, labels)
    grads = torch.autograd.grad(out, (h, mod.lin.weight))
    assert lemo_compile.records()[-1].peak_cut.counters["losses_segmented"] == 1
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


class _ScaledHead(nn.Module):
    """An LM head whose logits are scaled by a constant before the loss (Cohere's logit_scale, Granite's
    logits_scaling); the model returns the scaled logits, like HF's."""

    def __init__(self, form: str, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=bias)
        self.form = form

    def forward(self, ids, labels):
        logits = self.head(torch.tanh(self.body(self.emb(ids))))
        if self.form == "mul":
            logits = logits * 0.0625
        elif self.form == "rmul":
            logits = 2.5 * logits
        else:
            logits = logits / 3.0
        loss = F.cross_entropy(logits.float().view(-1, 50), labels.view(-1), ignore_index=-100)
        return loss, logits


@pytest.mark.parametrize("form", ["mul", "rmul", "div"])
@pytest.mark.parametrize("logits", ["keep", "drop"])
def test_scaled_logits_are_segmented_exactly(form, logits):
    ids = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    model = _ScaledHead(form)
    want_loss, want_logits = model(ids, labels)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    clear_records()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lemo_compile.backend(LemoConfig(inner="eager", logits=logits)))
    loss, out_logits = compiled(ids, labels)
    got = torch.autograd.grad(loss, list(model.parameters()))
    rec = lemo_compile.records()[-1]
    assert rec.peak_cut.counters["losses_segmented"] == 1, rec.peak_cut.skips
    assert rec.peak_cut.losses[0]["logits"] == ("dropped" if logits == "drop" else "kept")
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    if logits == "keep":
        torch.testing.assert_close(out_logits, want_logits)
    else:
        assert out_logits.numel() == 0


def test_scaled_logits_of_a_head_with_bias_are_left_alone():
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(2))
    model = _ScaledHead("mul", bias=True)
    want = model(ids, ids)[0]
    clear_records()
    torch._dynamo.reset()
    loss = torch.compile(model, backend=lemo_compile.backend(LemoConfig(inner="eager")))(ids, ids)[0]
    rec = lemo_compile.records()[-1]
    assert rec.peak_cut.counters["losses_segmented"] == 0
    assert "bias" in rec.peak_cut.skips[0].detail
    torch.testing.assert_close(loss, want)
