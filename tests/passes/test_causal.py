"""passes.causal: a mask that is provably causal becomes SDPA's is_causal=True (same loss and
gradients, dense and sparse layers, static and dynamic lengths); masks that read inputs and sliding
windows stay."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
from lemo_compile.passes.common import producers
from lemo_compile.testing.models import ARCHS, random_batch, tiny_model, trainable_grads

# tiny models have 4 layers; Gemma3's sliding-window layers (window 96 < 150 tokens) keep their mask
MADE_CAUSAL = {arch: 4 for arch in ARCHS} | {"gemma3": 2}


def _run(model, cfg, batch, dynamic=None, ckpt=False):
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    torch._dynamo.reset()
    clear_records()
    out = torch.compile(model, backend=lemo_compile.backend(cfg), dynamic=dynamic)(**batch)
    out.loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    rec = next(r for r in lemo_compile.records() if r.detect is not None and r.detect.layers)
    return out.loss.detach(), grads, rec


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_causal_rewrite_exact_dense_and_sparse(arch, dynamic, monkeypatch):
    # dynamic: the graph a loop over varying lengths compiles second builds its mask from the symbolic
    # length; checked at many lengths, it becomes is_causal=True too (Gemma3's sliding layers stay)
    from lemo_compile.passes import causal

    checked = []
    dynamic_check = causal._why_not_causal_dynamic
    monkeypatch.setattr(causal, "_why_not_causal_dynamic", lambda *a: checked.append(1) or dynamic_check(*a))
    model = tiny_model(arch, lora=True)
    batch = random_batch(256, 2, 150, seed=4)
    del batch["attention_mask"]  # no padding: HF builds its mask from positions only
    base = dict(inner="eager", keep_ratio=0.5, predictor="random")
    l0, g0, rec0 = _run(model, LemoConfig(**base, causal_mask=False), batch, dynamic=dynamic)
    l1, g1, rec1 = _run(model, LemoConfig(**base, causal_mask=True), batch, dynamic=dynamic)
    assert bool(checked) == dynamic  # the symbolic-length path ran exactly when the length is dynamic
    assert rec0.causal is None
    assert rec1.causal.counters["sdpa_made_causal"] == MADE_CAUSAL[arch]
    assert rec1.sparsified
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_causal_rewrite_inside_checkpointed_layers():
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 130, seed=5)
    del batch["attention_mask"]
    cfg = dict(inner="eager", keep_ratio=0.5, predictor="random")
    l0, g0, _ = _run(model, LemoConfig(**cfg, causal_mask=False), batch, ckpt=True)
    l1, g1, rec = _run(model, LemoConfig(**cfg, causal_mask=True), batch, ckpt=True)
    assert rec.causal.counters["sdpa_made_causal"] == 4
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_masks_that_read_an_input_stay():
    model = tiny_model("qwen2")
    batch = random_batch(256, 1, 140, seed=6)  # data decides: padding is possible
    _, _, rec = _run(model, LemoConfig(inner="eager", keep_ratio=0.5, predictor="random", causal_mask=True), batch)
    assert rec.causal.counters["sdpa_made_causal"] == 0
    assert rec.causal.counters["skip_mask_not_causal"] == 4
    assert all("depends on the input" in s.detail for s in rec.causal.skips), rec.causal.skips


def test_dynamic_length_sliding_window_longer_than_the_traced_length_stays():
    # traced at 80 tokens, under Gemma3's window (96): the mask is causal there, but not at longer
    # lengths, which the same dynamic graph runs; the check finds it and the sliding layers keep it
    from lemo_compile.testing.models import GEMMA3_SLIDING_WINDOW

    model = tiny_model("gemma3", lora=True)
    cfg = LemoConfig(inner="eager", keep_ratio=1.0)  # every block kept: equal to the model itself
    short = random_batch(256, 1, GEMMA3_SLIDING_WINDOW - 16, seed=8)
    del short["attention_mask"]
    _, _, rec = _run(model, cfg, short, dynamic=True)
    assert rec.causal.counters["sdpa_made_causal"] == 2
    assert all("at length" in s.detail and "not the causal pattern" in s.detail for s in rec.causal.skips)
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg), dynamic=True)
    long = random_batch(256, 1, 2 * GEMMA3_SLIDING_WINDOW + 7, seed=9)
    del long["attention_mask"]
    from lemo_compile.testing.models import assert_step_close, step_grads
    assert_step_close(step_grads(model, compiled, long), step_grads(model, model, long))


def test_dynamic_length_graph_is_guarded_to_the_lengths_checked(monkeypatch):
    # a mask proven causal up to DYNAMIC_MAX_LENGTH: longer sequences compile (and are checked) again
    from lemo_compile.passes import causal
    from torch._dynamo.utils import counters

    monkeypatch.setattr(causal, "DYNAMIC_MAX_LENGTH", 200)
    monkeypatch.setattr(causal, "DYNAMIC_LARGE_LENGTHS", (199,))
    model = tiny_model("llama", lora=True)
    torch._dynamo.reset()
    clear_records()
    counters.clear()
    compiled = torch.compile(model, backend=lemo_compile.backend(LemoConfig(inner="eager", keep_ratio=0.5)))
    graphs = []
    for n in (130, 150, 190, 230):
        batch = random_batch(256, 1, n, seed=n)
        del batch["attention_mask"]
        compiled(**batch).loss.backward()
        graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs == [1, 2, 2, 3]  # static at 130; dynamic for 150 and 190; 230 > 200 compiles again
    recs = lemo_compile.records()
    assert [r.causal.counters["sdpa_made_causal"] for r in recs] == [4, 4, 0]
    assert "200" in recs[2].recompile_reason, recs[2].recompile_reason
    assert all("at most 200" in s.detail for s in recs[2].causal.skips)  # beyond what is checked: mask kept


def _capture_masks(model, batch):
    """Dynamo graph of the model and the distinct SDPA masks in it (HF's mask functions)."""
    from lemo_compile.passes.common import sdpa_mask
    from lemo_compile.passes.common import is_call
    from lemo_compile.passes.common import SDPA_TARGETS

    got = {}

    def backend(gm, example_inputs):
        masks = [sdpa_mask(n) for n in gm.graph.nodes if is_call(n, *SDPA_TARGETS)]
        got["gm"], got["masks"] = gm, list(dict.fromkeys(m for m in masks if m is not None))
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(**batch)
    return got["gm"], got["masks"]


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_rows_evaluated_band_by_band_equal_the_whole_mask(arch):
    # HF's mask functions are row-local in the query arange: evaluating a band of rows at a time
    # (never the n x n mask) gives exactly the rows of the whole mask, sliding windows included
    from lemo_compile.passes import causal
    from lemo_compile.passes.common import shape_of

    batch = random_batch(256, 2, 150, seed=4)
    del batch["attention_mask"]
    gm, masks = _capture_masks(tiny_model(arch), batch)
    assert masks
    for mask in masks:
        nodes = producers(mask)
        n = shape_of(mask)[-1]
        whole = causal._evaluate(gm, nodes, mask)
        bands = causal.row_bands(gm, nodes, mask, n)
        assert bands is not None, mask.name
        rows = torch.cat([bands(r0, min(37, n - r0)) for r0 in range(0, n, 37)], dim=-2)
        assert torch.equal(rows.expand_as(whole), whole), mask.name
        assert (causal._compare_causal(whole, 0) is None) == all(
            causal._compare_causal(bands(r0, min(37, n - r0)), r0) is None for r0 in range(0, n, 37))


_DUNDERS = {"eq": "__eq__", "ne": "__ne__", "le": "__le__", "lt": "__lt__", "ge": "__ge__", "gt": "__gt__",
            "add": "__add__", "sub": "__sub__", "mul": "__mul__", "and_": "__and__", "or_": "__or__"}


def test_band_evaluation_accepts_dunder_method_nodes():
    # Dynamo on CUDA records e.g. HF's packed-sequence `a == b` as call_method __eq__ (operator.eq on
    # CPU); the band path must treat those like the operators, else masks above FULL_EVAL_BYTES stay
    # (seen on an H200: the 128K mask of an 8B model was left alone)
    import operator

    from lemo_compile.passes import causal
    from lemo_compile.passes.common import shape_of

    batch = random_batch(256, 1, 150, seed=4)
    del batch["attention_mask"]
    gm, masks = _capture_masks(tiny_model("llama"), batch)
    nodes = producers(masks[0])
    whole = causal._evaluate(gm, nodes, masks[0])
    renamed = 0
    for node in nodes:
        name = getattr(node.target, "__name__", None)
        if node.op == "call_function" and getattr(operator, name or "", None) is node.target and name in _DUNDERS:
            node.op, node.target = "call_method", _DUNDERS[name]
            renamed += 1
    assert renamed >= 2
    n = shape_of(masks[0])[-1]
    bands = causal.row_bands(gm, nodes, masks[0], n)
    assert bands is not None
    rows = torch.cat([bands(r0, min(64, n - r0)) for r0 in range(0, n, 64)], dim=-2)
    assert torch.equal(rows.expand_as(whole), whole)


def test_long_masks_are_checked_in_bands_only(monkeypatch):
    # a mask too large to evaluate whole is still proven causal band by band (HF models)
    from lemo_compile.passes import causal

    monkeypatch.setattr(causal, "FULL_EVAL_BYTES", 0)
    monkeypatch.setattr(causal, "BAND_ELEMENTS", 16 * 140)
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 140, seed=7)
    del batch["attention_mask"]
    base = dict(inner="eager", keep_ratio=0.5, predictor="random")
    l0, g0, _ = _run(model, LemoConfig(**base, causal_mask=False), batch)
    l1, g1, rec = _run(model, LemoConfig(**base, causal_mask=True), batch)
    assert rec.causal.counters["sdpa_made_causal"] == 4
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


class _FlippedMaskAttention(torch.nn.Module):
    """Builds its causal mask with flips (not row-local): provable only by evaluating it whole."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu()
        mask = torch.flip(upper, dims=(0, 1))[None, None]  # flip both axes of triu = tril
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv70():
    return [torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _made_causal(module, q, k, v):
    """module(q, k, v) compiled with a backend that runs passes.causal alone: (output, CausalResult)."""
    from lemo_compile.passes import causal

    got = {}

    def backend(gm, example_inputs):
        got["res"] = causal.make_causal(gm)
        return gm

    torch._dynamo.reset()
    return torch.compile(module, backend=backend)(q, k, v), got["res"]


@pytest.mark.parametrize("whole_limit, made", [(1 << 31, 1), (0, 0)])
def test_mask_that_is_not_row_local_needs_whole_evaluation(monkeypatch, whole_limit, made):
    from lemo_compile.passes import causal

    monkeypatch.setattr(causal, "FULL_EVAL_BYTES", whole_limit)
    q, k, v = _qkv70()
    out, res = _made_causal(_FlippedMaskAttention(), q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)
    assert res.counters["sdpa_made_causal"] == made
    if not made:
        assert "not row-local" in res.skips[0].detail
        assert res.largest_mask_left == 70 * 70  # the bool mask left in place
    else:
        assert res.largest_mask_left == 0


class _CausalThenClearedInPlace(torch.nn.Module):
    """A causal mask with one key then cleared in place, directly or through an alias (detach returns the
    same storage): its producers alone say causal, the write does not."""

    def __init__(self, through_alias: bool):
        super().__init__()
        self.through_alias = through_alias

    def forward(self, q, k, v):
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        (mask.detach() if self.through_alias else mask)[:, 5] = False
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])


@pytest.mark.parametrize("through_alias", [False, True])
def test_mask_written_in_place_is_not_proven_causal(through_alias):
    q, k, v = _qkv70()
    out, res = _made_causal(_CausalThenClearedInPlace(through_alias), q, k, v)
    torch.testing.assert_close(out, _CausalThenClearedInPlace(through_alias)(q, k, v))
    assert res.counters["sdpa_made_causal"] == 0 and res.skips, res.skips


def test_large_mask_left_in_place_is_a_warning(monkeypatch, caplog):
    # the user learns from one log line that attention keeps an n x n mask (as in the 128K run)
    import logging

    from lemo_compile.passes import causal

    q, k, v = (torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    monkeypatch.setattr(causal, "FULL_EVAL_BYTES", 0)
    for limit, level in ((1 << 30, logging.INFO), (4096, logging.WARNING)):
        monkeypatch.setattr(causal, "LARGE_MASK_BYTES", limit)
        torch._dynamo.reset()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lemo_compile"):
            torch.compile(_FlippedMaskAttention(), backend=lemo_compile.backend(LemoConfig(inner="eager")))(q, k, v)
        lines = [r for r in caplog.records if "keep an explicit mask tensor" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == level, [r.getMessage() for r in caplog.records]
        assert "0.00 GiB" in lines[0].getMessage() and "not row-local" in lines[0].getMessage()


def test_dynamic_length_peak_has_no_quadratic_term():
    # explain(dynamic=True) of a batch without padding: with the mask made causal the symbolic peak
    # grows linearly in the length (doubling 1M tokens less than doubles it); kept, the n x n mask ~4x
    batch = random_batch(256, 1, 200, seed=11)
    del batch["attention_mask"]

    def growth(cfg):
        ex = lemo_compile.explain(tiny_model("llama", lora=True), **batch, config=cfg, dynamic=True)
        peak = max((r.memory for r in ex.records if r.memory is not None), key=lambda e: e.peak_hint).peak_bytes
        (s,) = peak.free_symbols
        return float(peak.subs(s, 1 << 21) / peak.subs(s, 1 << 20))

    cfg = LemoConfig(inner="eager", dense_layers=(0,))
    assert growth(cfg) < 2.01
    assert growth(cfg.replace(causal_mask=False)) > 3.5
