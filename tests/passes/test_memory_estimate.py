"""passes.memory: the static peak-memory estimate over real AOT forward/backward graphs.

Graphs are captured the way the backend sees them: torch.compile -> AOT autograd -> our fw/bw
compilers (`_compat.aot_eager`), so names, views and the saved-tensor partition are torch's own."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from lemo_compile import _compat
from lemo_compile.passes import memory
from lemo_compile.passes.memory import GRANULE, estimate
from lemo_compile.testing.models import random_batch, tiny_model

F32 = 4


def rounded(nbytes: int) -> int:
    return -(-nbytes // GRANULE) * GRANULE


def capture(fn, *args, dynamic=None, **kwargs):
    """(forward graph, backward graph or None) of fn(*args) through AOT autograd; runs backward
    from the output (the last one of a tuple, `.loss` of a model output) when it needs a gradient."""
    torch._dynamo.reset()
    gms = []
    out = torch.compile(fn, backend=_compat.aot_eager(gms.append, gms.append), dynamic=dynamic)(*args, **kwargs)
    loss = out[-1] if isinstance(out, tuple) else getattr(out, "loss", out)
    if loss.requires_grad:
        loss.backward()
    return gms[0].graph, (gms[1].graph if len(gms) > 1 else None)


def mlp_loss(x, w1, w2):
    return (torch.relu(x @ w1) @ w2).sum()


def mlp_inputs(n: int, b: int = 4, d: int = 32, h: int = 128, o: int = 16):
    return (torch.randn(b, n, d), torch.randn(d, h, requires_grad=True), torch.randn(h, o, requires_grad=True))


def test_matmul_chain_exact_bytes():
    # x (4, 64, 32), w1 (32, 128), w2 (128, 16), fp32; x needs no grad. Rows = 4 * 64 = 256.
    #   inputs   x 32768 + w1 16384 + w2 8192                        = 57344
    # forward:  mm = x@w1 (256,128) 131072; relu 131072 (mm dies after relu; relu is saved);
    #           mm_1 (256,16) 16384; sum -> 4 B, rounded to 512 (the loss, held by the caller)
    # backward: tangent 512; grad_w2 = relu^T @ g (128,16) 8192; g @ w2^T (256,128) 131072 (the
    #           tangent dies); threshold_backward (256,128) 131072   <- peak:
    #   57344 + relu 131072 + loss 512 + grad_w2 8192 + 131072 + 131072 = 459264
    # afterwards relu and g @ w2^T die; grad_w1 (32,128) 16384 comes last.
    fw, bw = capture(mlp_loss, *mlp_inputs(64))
    est = estimate(fw, bw, fusion_aware=False)
    assert est.inputs_bytes == 57344
    assert est.saved_bytes == 131072  # relu only: saved twice (detach, view), views of x are x's
    assert est.peak_bytes == 459264
    assert (est.peak_graph, est.peak_node) == ("backward", "threshold_backward")
    assert sorted(b for _, b, _ in est.live_at_peak) == [512, 8192, 131072, 131072, 131072]
    assert max(b for _, _, b in est.timeline) == est.peak_bytes
    assert est.timeline[0] == ("forward", "(inputs)", 57344)
    assert est.timeline[-1][2] == 57344 + 512 + 8192 + 131072 + 16384  # loss + three outputs live at the end
    # no pointwise value here is consumed only by pointwise ops: fusion changes nothing
    assert estimate(fw, bw).peak_bytes == est.peak_bytes
    assert "threshold_backward" in est.format()


def swiglu_loss(x, w1, w2, w3):
    h = torch.nn.functional.silu(x @ w1) * (x @ w3)
    return (h @ w2).float().pow(2).mean()


def test_saved_tensors_cross_the_boundary():
    x, w1, w2 = torch.randn(2, 48, 32), torch.randn(32, 96, requires_grad=True), torch.randn(96, 32, requires_grad=True)
    w3 = torch.randn(32, 96, requires_grad=True)
    fw, bw = capture(swiglu_loss, x, w1, w2, w3)
    est = estimate(fw, bw, fusion_aware=False)

    # independent count: the forward values the backward takes, one per storage, inputs excluded
    fw_nodes = {n.name: n for n in fw.nodes}
    inputs = {StorageWeakRef(n.meta["val"].untyped_storage()) for n in fw.nodes if n.op == "placeholder"
              and isinstance(n.meta.get("val"), torch.Tensor)}
    storages = {}
    for p in bw.nodes:
        if p.op == "placeholder" and not p.name.startswith("tangents"):
            val = fw_nodes[p.name].meta["val"]
            if isinstance(val, torch.Tensor):
                ref = StorageWeakRef(val.untyped_storage())
                if ref not in inputs:
                    storages[ref] = rounded(val.untyped_storage().nbytes())
    assert len(storages) >= 3
    assert est.saved_bytes == sum(storages.values())
    # when the backward starts: inputs, saved activations, the loss (held) and its tangent
    start = next(b for g, name, b in est.timeline if (g, name) == ("backward", "(tangents)"))
    assert start == est.inputs_bytes + est.saved_bytes + 2 * GRANULE
    # forward only: every output lives to the end, nothing is "saved"
    fw_only = estimate(fw, None, fusion_aware=False)
    assert fw_only.saved_bytes == 0
    assert fw_only.timeline[-1][2] >= fw_only.inputs_bytes + est.saved_bytes


@pytest.mark.parametrize("fusion_aware", [False, True])
def test_dynamic_length_formula_matches_static_compiles(fusion_aware):
    # Lengths keep every per-token size a multiple of 512 B (symbolic sizes are not rounded).
    n0, n1 = 64, 96
    static = {}
    for n in (n0, n1):
        static[n] = estimate(*capture(mlp_loss, *mlp_inputs(n), dynamic=False), fusion_aware=fusion_aware)

    args = mlp_inputs(n0)
    torch._dynamo.mark_dynamic(args[0], 1)
    est = estimate(*capture(mlp_loss, *args), fusion_aware=fusion_aware)
    (sym,) = est.symbols
    assert est.hints[sym] == n0
    assert str(sym) in str(est.peak_bytes)
    assert est.peak_hint == est.at() == static[n0].peak_bytes
    assert est.at(**{sym: n1}) == static[n1].peak_bytes
    assert est.timeline[-1][2] == static[n0].timeline[-1][2]

    budget = static[n1].peak_bytes - 1
    length = est.max_length(budget, sym)
    assert n0 <= length < n1
    assert est.at(**{sym: length}) <= budget < est.at(**{sym: length + 1})
    assert est.max_length(est.at(**{sym: 1000}), sym) == 1000
    assert est.max_length(1, sym) == 0
    with pytest.raises(ValueError):
        est.max_length(budget, "s_unknown")
    with pytest.raises(ValueError):
        est.at(s_unknown=3)
    assert "peak bytes =" in est.format()


def pointwise_tail(x, w):
    return ((x @ w * 2).exp() + 1).sin().sum()


def matmul_chain(x, w1, w2, w3):
    return (x @ w1 @ w2 @ w3).sum()


def test_fusion_aware_drops_pointwise_chains_not_matmuls():
    x, w = torch.randn(256, 64), torch.randn(64, 128)
    fw, bw = capture(pointwise_tail, x, w)  # no grad: one inference graph
    assert bw is None
    plain, fused = estimate(fw, None, fusion_aware=False), estimate(fw, None)
    mm_bytes = 256 * 128 * F32
    # eager: two (256, 128) values at once (mm and x*2, then x*2 and its exp, ...); fused: the mm
    # output alone, the chain runs inside the sum's kernel
    assert plain.peak_bytes == plain.inputs_bytes + 2 * mm_bytes
    assert fused.peak_bytes == fused.inputs_bytes + mm_bytes + GRANULE  # + the sum's output
    assert {b for _, b, _ in fused.live_at_peak} == {mm_bytes, GRANULE}

    x, ws = torch.randn(256, 64), [torch.randn(64, 64) for _ in range(3)]
    fw, _ = capture(matmul_chain, x, *ws)
    assert estimate(fw, None).peak_bytes == estimate(fw, None, fusion_aware=False).peak_bytes


def test_outputs_held_false_frees_user_outputs_at_the_boundary():
    fw, bw = capture(lambda x, w: (x @ w, (x @ w).sum()), torch.randn(64, 64), torch.randn(64, 64, requires_grad=True))
    held, freed = estimate(fw, bw), estimate(fw, bw, outputs_held=False)
    assert held.timeline[-1][2] - freed.timeline[-1][2] >= 64 * 64 * F32


def test_tiny_llama_training_step_is_sane():
    model = tiny_model("llama", layers=2)  # vocab 256, hidden 64
    b, n, vocab = 1, 64, model.config.vocab_size
    fw, bw = capture(model, **random_batch(vocab, b=b, n=n, seed=0))
    est = estimate(fw, bw)
    params = sum(rounded(p.numel() * F32) for p in model.parameters())
    assert est.inputs_bytes >= params
    assert est.peak_bytes > est.inputs_bytes + est.saved_bytes > est.inputs_bytes
    assert max(t for _, _, t in est.timeline) == est.peak_bytes
    assert not est.unsized
    # the LM head's (b*n, vocab) fp32 logits are among the largest live buffers at the peak
    logits = b * n * vocab * F32
    assert logits in [nbytes for _, nbytes, _ in est.live_at_peak[:5]]
    assert est.live_at_peak == sorted(est.live_at_peak, key=lambda t: -t[1])
    assert "GiB" in est.format()


def test_plot_timeline_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    fw, bw = capture(mlp_loss, *mlp_inputs(64))
    path = tmp_path / "timeline.png"
    memory.plot_timeline({"eager": estimate(fw, bw, fusion_aware=False), "fused": estimate(fw, bw)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
