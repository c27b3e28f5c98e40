"""passes.mlp_segment, lemo::swiglu_mlp and lemo::swiglu_lora_mlp: the SwiGLU MLP (with or without PEFT
LoRA adapters on its projections) in row segments gives the loss and gradients of the unsegmented graph
(and of the reference semantics), keeps only the MLP's input for backward, and leaves other MLPs alone
with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.kernels import swiglu
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
    assert swiglu.segment_rows(14336, 1 << 27, 2) == 512  # 585 rows fit; whole 128-row tiles
    assert swiglu.segment_rows(128, 40 * 128 * 8 * 4, 4) == 40
    assert swiglu.segment_rows(14336, 10, 2) == 1
    # the default MLP budget at Llama-3-8B: bf16 weights with fp32 adapters (PEFT's default), without
    default = LemoConfig().mlp_segment_bytes
    assert swiglu.segment_rows(14336, default, 2, 4) == 2304
    assert swiglu.segment_rows(14336, default, 2) == 4608


def test_validation():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="gate/up weights"):
        torch.ops.lemo.swiglu_mlp(x, torch.randn(6, 4), torch.randn(6, 5), torch.randn(4, 6), 2)
    with pytest.raises(ValueError, match="rows per segment"):
        torch.ops.lemo.swiglu_mlp(x, torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6), 0)


# --------------------------------------------------------------------------------------------------
# lemo::swiglu_lora_mlp against PEFT's LoRA arithmetic
# --------------------------------------------------------------------------------------------------

ADAPTED = {"all": (0, 1, 2), "gate": (0,), "up_down": (1, 2), "down": (2,)}
SCALES = [2.0, 0.5, 1.5]


def peft_proj(z, w, a, b, scale):
    """peft.tuners.lora.Linear.forward without dropout, written out."""
    if a is None:
        return F.linear(z, w)
    return (F.linear(z, w) + F.linear(F.linear(z.to(a.dtype), a), b) * scale).to(z.dtype)


def peft_mlp(x, wg, wu, wd, *adapters):
    ag, bg, au, bu, ad, bd = adapters
    p = F.silu(peft_proj(x, wg, ag, bg, SCALES[0])) * peft_proj(x, wu, au, bu, SCALES[1])
    return peft_proj(p, wd, ad, bd, SCALES[2])


def _lora_inputs(shape, d, inter, which, dtype, adapter_dtype, seed=0, r=3):
    """x, the three weights and the six adapter tensors (None where `which` has no adapter)."""
    leaves, gy = _inputs(shape, d, inter, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    adapters = []
    for i, (o, k) in enumerate(((inter, d), (inter, d), (d, inter))):
        if i in ADAPTED[which]:
            a = torch.randn(r, k, generator=gen, dtype=torch.float64) / k ** 0.5
            b = torch.randn(o, r, generator=gen, dtype=torch.float64) / r ** 0.5
            adapters += [t.to(adapter_dtype).requires_grad_() for t in (a, b)]
        else:
            adapters += [None, None]
    return leaves, adapters, gy


def _lora_grads(fn, leaves, adapters, gy):
    present = [t for t in adapters if t is not None]
    y = fn(*leaves, *adapters)
    return (y.detach(), *torch.autograd.grad(y, leaves + present, gy))


def _lora_op(rows):
    return lambda x, wg, wu, wd, *ad: torch.ops.lemo.swiglu_lora_mlp(x, wg, wu, wd, *ad, SCALES, rows)


@pytest.mark.parametrize("which", list(ADAPTED))
@pytest.mark.parametrize("rows", [1, 7, 1000], ids=["rows1", "rows7", "one_segment"])
@pytest.mark.parametrize("shape", [(2, 19), (23,)], ids=["batch2", "flat"])
def test_lora_op_matches_peft_fp64(shape, rows, which):
    leaves, adapters, gy = _lora_inputs(shape, 12, 40, which, torch.float64, torch.float64)
    ref = _lora_grads(peft_mlp, leaves, adapters, gy)
    got = _lora_grads(_lora_op(rows), leaves, adapters, gy)
    assert len(got) == 5 + 2 * len(ADAPTED[which])
    for i, (a, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=f"output/gradient {i}")


def test_lora_op_gradcheck():
    leaves, adapters, _ = _lora_inputs((2, 5), 4, 6, "all", torch.float64, torch.float64, seed=1, r=2)
    assert torch.autograd.gradcheck(_lora_op(3), leaves + adapters)


def test_lora_op_bf16_model_fp32_adapters_within_twice():
    """PEFT's default on a bf16 model: fp32 adapters, casts in and out. The op's error against fp64 is
    at most 2x that of PEFT's own bf16/fp32 arithmetic, for the output and every gradient."""
    leaves, adapters, gy = _lora_inputs((3, 50), 32, 88, "all", torch.bfloat16, torch.float32, seed=2, r=4)
    low = _lora_grads(peft_mlp, leaves, adapters, gy)
    got = _lora_grads(_lora_op(16), leaves, adapters, gy)
    hi = [t.detach().double().requires_grad_() for t in leaves]
    hi_ad = [t.detach().double().requires_grad_() for t in adapters]
    ref = _lora_grads(peft_mlp, hi, hi_ad, gy.double())
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[5:])
    for i, (a, lo, r) in enumerate(zip(got, low, ref)):
        check_within_twice(f"output/gradient {i}", a, lo, r, 1e-3 * r.abs().max().item())


def test_lora_op_frozen_base_weights_get_no_gradient_work():
    """LoRA training: base weights frozen; the backward op returns empty tensors for them."""
    leaves, adapters, gy = _lora_inputs((2, 9), 8, 16, "all", torch.float64, torch.float64, seed=3)
    x, ws = leaves[0], [w.detach() for w in leaves[1:]]
    ref = _lora_grads(lambda x, *ad: peft_mlp(x, *ws, *ad), [x], adapters, gy)
    got = _lora_grads(lambda x, *ad: _lora_op(4)(x, *ws, *ad), [x], adapters, gy)
    for i, (a, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=f"output/gradient {i}")
    out = torch.ops.lemo.swiglu_lora_mlp_backward(gy, x.detach(), *ws, *[t.detach() for t in adapters], SCALES, 4,
                                                  [True, False, False, False] + [True] * 6)
    assert [t.numel() for t in out[1:4]] == [0, 0, 0] and all(t.numel() for t in out[4:])


def test_lora_op_validation():
    x, w, wd = torch.randn(3, 4), torch.randn(6, 4), torch.randn(4, 6)
    a, b = torch.randn(2, 4), torch.randn(6, 2)
    with pytest.raises(ValueError, match="gate adapter needs both A and B"):
        torch.ops.lemo.swiglu_lora_mlp(x, w, w, wd, a, None, None, None, None, None, SCALES, 2)
    with pytest.raises(ValueError, match="up adapter's A"):
        torch.ops.lemo.swiglu_lora_mlp(x, w, w, wd, None, None, a, torch.randn(5, 2), None, None, SCALES, 2)
    with pytest.raises(ValueError, match="down adapter's A"):
        torch.ops.lemo.swiglu_lora_mlp(x, w, w, wd, None, None, None, None, a, b, SCALES, 2)


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
@pytest.mark.parametrize("arch, sparse, lora_mlp", [("llama", False, False), ("qwen3", False, False),
                                                    ("mistral", True, False), ("qwen2", True, False),
                                                    ("llama", False, True), ("qwen2", True, True)])
def test_pass_exact_and_keeps_only_the_input(arch, sparse, lora_mlp, ckpt):
    """Dense and sparse layers, with and without checkpointing, LoRA on attention only (plain MLP op) or
    on every linear (the LoRA MLP op): loss and gradients of the unsegmented graph, MLP inputs saved only."""
    model = lora_all_model(arch) if lora_mlp else tiny_model(arch, lora=True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = random_batch(256, 2, 150, seed=6)
    batch.pop("attention_mask")
    layers = dict(keep_ratio=0.5, predictor="random") if sparse else dict(dense_layers=(0, 1, 2, 3))
    base = dict(inner="eager", mlp_segment_bytes=SEGMENT, **layers)
    l0, g0, recs0 = _loss_grads(model, LemoConfig(**base), batch)
    l1, g1, recs1 = _loss_grads(model, LemoConfig(segment_mlp=True, **base), batch)
    done = [d for r in recs1 if r.mlp_segment for d in r.mlp_segment.mlps]
    assert len(done) >= 4
    if lora_mlp:  # fp32 adapters on an fp32 model: 8 + 4 (rows x inter) fp32 tensors per row -> 26 rows
        assert all(d["adapters"] == ["gate", "up", "down"] for d in done), done
        assert all(d["segment_rows"] == swiglu.segment_rows(128, SEGMENT, 4, 4) for d in done)
        assert any("mlp" in k and "lora" in k for k in g0)
    else:
        assert all(d["segment_rows"] == 40 and "adapters" not in d for d in done)
    assert not any(r.mlp_segment.skips for r in recs1 if r.mlp_segment)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
    if not ckpt:  # 4 dense MLPs on 2 x 150 rows of 64 fp32: the input of each, 76.8 KB; before, ~5x that
        assert _mlp_saved(recs1) < _mlp_saved(recs0) / 2, (_mlp_saved(recs1), _mlp_saved(recs0))


@pytest.mark.parametrize("lora_mlp", [False, True], ids=["lora_qv", "lora_all"])
def test_pass_matches_reference_semantics_with_sparse_layers(lora_mlp):
    """Sparse layers (tokens mode: the MLP on kept rows), padding: the reference semantics, with LoRA on
    attention only (plain MLP op) and on every linear (Mistral; the LoRA MLP op)."""
    model = lora_all_model("mistral") if lora_mlp else tiny_model("llama", lora=True)
    batch = random_batch(256, 2, 140, seed=13 if lora_mlp else 7, pad_right=[0, 31 if lora_mlp else 25])
    cfg = LemoConfig(inner="eager", keep_ratio=0.4, predictor="random", mlp_mode="tokens", segment_mlp=True,
                     mlp_segment_bytes=SEGMENT)
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


LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_all_model(arch="llama", dtype=torch.float32, **lora):
    """A tiny model with LoRA on every linear (the r16-all recipe), lora_B random so every adapter counts."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = get_peft_model(tiny_model(arch).to(dtype), LoraConfig(
            r=4, lora_alpha=8, target_modules=LORA_ALL, **{"lora_dropout": 0.0, **lora}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
    return model


def test_pass_lora_mlps_bf16_model_fp32_adapters():
    """PEFT's casts (bf16 activations into fp32 adapters and back) are matched: segmented, with the
    loss and gradients of the unsegmented graph up to bf16 rounding."""
    model = lora_all_model("llama", dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    batch = random_batch(256, 1, 120, seed=14)
    base = dict(inner="eager", dense_layers=(0, 1, 2, 3), mlp_segment_bytes=SEGMENT)
    l0, g0, _ = _loss_grads(model, LemoConfig(**base), batch)
    l1, g1, recs = _loss_grads(model, LemoConfig(segment_mlp=True, **base), batch)
    done = [d for r in recs if r.mlp_segment for d in r.mlp_segment.mlps]
    assert len(done) == 4 and all(d["adapters"] == ["gate", "up", "down"] for d in done)
    torch.testing.assert_close(l1, l0, rtol=1e-2, atol=0)
    for k in g0:
        err = (g1[k] - g0[k]).norm() / g0[k].norm()
        assert err < 3e-2, (k, err.item())


def test_lora_dropout_on_the_mlp_is_left_alone():
    """An adapter lemo does not know (here LoRA with dropout, trained) leaves the MLP to the inner
    compiler with a reason; the result is the unsegmented one."""
    model = lora_all_model("llama", lora_dropout=0.1)
    model.train()
    batch = random_batch(256, 1, 90, seed=9)
    cfg = dict(inner="eager", dense_layers=(0, 1, 2, 3))
    torch.manual_seed(0)
    l0, _, _ = _loss_grads(model, LemoConfig(**cfg), batch)
    torch.manual_seed(0)
    l1, _, recs = _loss_grads(model, LemoConfig(segment_mlp=True, **cfg), batch)
    res = [r.mlp_segment for r in recs if r.mlp_segment]
    assert not any(r.mlps for r in res)
    assert any("adapter lemo does not know" in s.detail for r in res for s in r.skips), \
        [str(s) for r in res for s in r.skips]
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)


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
    cfg = LemoConfig(inner="eager", dense_layers=(0, 1, 2, 3), segment_mlp=True, mlp_segment_bytes=SEGMENT)
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
