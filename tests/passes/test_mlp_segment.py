"""passes.mlp_segment and lemo::swiglu_mlp: the SwiGLU MLP in row segments gives the loss and
gradients of the unsegmented graph (and of the reference semantics), keeps only the MLP's input for
backward, and leaves other MLPs alone with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lemo_compile
from lemo_compile import LemoConfig, mlp
from lemo_compile.backend import clear_records
from lemo_compile.memory import saved_by_block
from lemo_compile.reference import reference_forward
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads
from lemo_compile.testing.tolerance import check_within_twice

# --------------------------------------------------------------------------------------------------
# the op against the plain MLP
# --------------------------------------------------------------------------------------------------


def plain_mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _inputs(shape, d, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    ws = [torch.randn(o, i, generator=gen, dtype=torch.float64) / i ** 0.5 for o, i in ((inter, d), (inter, d), (d, inter))]
    gy = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (x, *ws)], gy.to(dtype)


def _grads(fn, leaves, gy):
    y = fn(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, gy))


@pytest.mark.parametrize("rows", [1, 7, 1000], ids=["rows1", "rows7", "one_segment"])
@pytest.mark.parametrize("shape", [(2, 19), (23,)], ids=["batch2", "flat"])
def test_op_matches_plain_mlp_fp64(shape, rows):
    leaves, gy = _inputs(shape, 12, 40, torch.float64)
    ref = _grads(plain_mlp, leaves, gy)
    got = _grads(lambda *a: torch.ops.lemo.swiglu_mlp(*a, rows), leaves, gy)
    for name, a, r in zip(("y", "dx", "dgate", "dup", "ddown"), got, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)


def test_op_gradcheck():
    leaves, _ = _inputs((2, 5), 4, 6, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.lemo.swiglu_mlp(*a, 3), leaves)


def test_op_bf16_within_twice_the_plain_rounding():
    """bf16 on the CPU: the segmented op's error against the fp64 MLP is at most 2x that of the plain
    bf16 MLP (plus a small floor), for the output and every gradient."""
    leaves, gy = _inputs((3, 50), 32, 88, torch.bfloat16, seed=2)
    low = _grads(plain_mlp, leaves, gy)
    got = _grads(lambda *a: torch.ops.lemo.swiglu_mlp(*a, 16), leaves, gy)
    hi_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _grads(plain_mlp, hi_leaves, gy.double())
    for name, a, lo, r in zip(("y", "dx", "dgate", "dup", "ddown"), got, low, ref):
        check_within_twice(name, a, lo, r, 1e-3 * r.abs().max().item())


def test_frozen_weights_get_no_gradient_work():
    leaves, gy = _inputs((2, 9), 8, 16, torch.float64, seed=3)
    x, ws = leaves[0], [w.detach() for w in leaves[1:]]
    y = torch.ops.lemo.swiglu_mlp(x, *ws, 4)
    (dx,) = torch.autograd.grad(y, [x], gy)
    torch.testing.assert_close(dx, torch.autograd.grad(plain_mlp(x, *ws), [x], gy)[0], rtol=1e-12, atol=1e-12)
    dxw = torch.ops.lemo.swiglu_mlp_backward(gy, x.detach(), *ws, 4, True, False)
    assert [t.numel() for t in dxw[1:]] == [0, 0, 0]


def test_segment_rows_from_budget():
    assert mlp.segment_rows(14336, 1 << 27, 2) == 512  # 585 rows fit; whole 128-row tiles
    assert mlp.segment_rows(128, 40 * 128 * 8 * 4, 4) == 40
    assert mlp.segment_rows(14336, 10, 2) == 1


def test_validation():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="gate/up weights"):
        torch.ops.lemo.swiglu_mlp(x, torch.randn(6, 4), torch.randn(6, 5), torch.randn(4, 6), 2)
    with pytest.raises(ValueError, match="rows per segment"):
        torch.ops.lemo.swiglu_mlp(x, torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6), 0)


# --------------------------------------------------------------------------------------------------
# the pass on HF models
# --------------------------------------------------------------------------------------------------

SEGMENT = 40 * 128 * 8 * 4  # tiny models: intermediate 128, fp32 -> 40 rows per segment


def _loss_grads(model, cfg, batch, fn=None):
    torch._dynamo.reset()
    clear_records()
    out = (fn or torch.compile(model, backend=lemo_compile.backend(cfg)))(**batch)
    out.loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, lemo_compile.records()


def _mlp_saved(recs) -> int:
    return sum(d["mlp"] for r in recs for d in saved_by_block(r.saved).values())


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("arch, sparse", [("llama", False), ("qwen3", False), ("mistral", True), ("qwen2", True)])
def test_pass_exact_and_keeps_only_the_input(arch, sparse, ckpt):
    model = tiny_model(arch, lora=True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = random_batch(256, 2, 150, seed=6)
    batch.pop("attention_mask")
    layers = dict(keep_ratio=0.5, predictor="random") if sparse else dict(dense_layers=(0, 1, 2, 3))
    base = dict(inner="eager", segment_bytes=SEGMENT, **layers)
    l0, g0, recs0 = _loss_grads(model, LemoConfig(**base), batch)
    l1, g1, recs1 = _loss_grads(model, LemoConfig(segment_mlp=True, **base), batch)
    done = [d for r in recs1 if r.mlp_segment for d in r.mlp_segment.mlps]
    assert len(done) >= 4 and all(d["segment_rows"] == 40 for d in done)
    assert not any(r.mlp_segment.skips for r in recs1 if r.mlp_segment)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
    if not ckpt:  # 4 dense MLPs on 2 x 150 rows of 64 fp32: the input of each, 76.8 KB; before, ~5x that
        assert _mlp_saved(recs1) < _mlp_saved(recs0) / 2, (_mlp_saved(recs1), _mlp_saved(recs0))


def test_pass_matches_reference_semantics_with_sparse_layers():
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 2, 140, seed=7, pad_right=[0, 25])
    cfg = LemoConfig(inner="eager", keep_ratio=0.4, predictor="random", mlp_mode="tokens", segment_mlp=True,
                     segment_bytes=SEGMENT)
    ref = reference_forward(model, cfg, **batch).output
    ref.loss.backward()
    ref_grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    loss, grads, recs = _loss_grads(model, cfg, batch)
    assert sum(len(r.mlp_segment.mlps) for r in recs if r.mlp_segment) == 4
    torch.testing.assert_close(loss, ref.loss.detach(), rtol=1e-5, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("arch, kind", [("gemma3", "activation gelu"), ("phi3", "gate and up are not")])
def test_other_mlps_left_alone_with_a_reason(arch, kind):
    model = tiny_model(arch, lora=True)
    batch = random_batch(256, 1, 100, seed=8)
    cfg = dict(inner="eager", dense_layers=(0, 1, 2, 3))
    l0, g0, _ = _loss_grads(model, LemoConfig(**cfg), batch)
    l1, g1, recs = _loss_grads(model, LemoConfig(segment_mlp=True, **cfg), batch)
    res = [r.mlp_segment for r in recs if r.mlp_segment]
    assert not any(r.mlps for r in res)
    assert any(kind in s.detail for r in res for s in r.skips), [str(s) for r in res for s in r.skips]
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)


def test_lora_on_the_mlp_is_left_alone():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"]))
    batch = random_batch(256, 1, 90, seed=9)
    _, _, recs = _loss_grads(model, LemoConfig(inner="eager", dense_layers=(0, 1, 2, 3), segment_mlp=True), batch)
    res = [r.mlp_segment for r in recs if r.mlp_segment]
    assert not any(r.mlps for r in res) and any("adapter" in s.detail for r in res for s in r.skips)


def test_autocast_graph_left_alone():
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 80, seed=11)
    cfg = LemoConfig(inner="eager", dense_layers=(0, 1, 2, 3), segment_mlp=True)
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    torch._dynamo.reset()
    clear_records()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    res = [r.mlp_segment for r in lemo_compile.records() if r.mlp_segment]
    assert res and not any(r.mlps for r in res) and any(s.kind == "autocast" for r in res for s in r.skips)


def test_dynamic_length_one_compile():
    model = tiny_model("llama", lora=True)
    cfg = LemoConfig(inner="eager", dense_layers=(0, 1, 2, 3), segment_mlp=True, segment_bytes=SEGMENT)
    torch._dynamo.reset()
    clear_records()
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg), dynamic=True)
    counts = []
    for n in (97, 161):
        batch = random_batch(256, 1, n, seed=n)
        ref = model(**batch)
        ref.loss.backward()
        ref_grads = trainable_grads(model)
        model.zero_grad(set_to_none=True)
        out = compiled(**batch)
        out.loss.backward()
        grads = trainable_grads(model)
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=0)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
        counts.append(len(lemo_compile.records()))
    assert counts[0] == counts[1]
    assert any(r.mlp_segment and r.mlp_segment.mlps for r in lemo_compile.records())


def test_explain_names_the_segmented_mlps():
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 64, seed=10)
    text = str(lemo_compile.explain(model, config=LemoConfig(inner="eager", segment_mlp=True), **batch))
    assert "MLPs segmented: " in text
