"""Regional compilation (passes.regions, LemoConfig.regional): checkpointed layers of one kind call one
shared body, and the step gives the loss and gradients of whole-model compilation."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads

LAYERS = 6  # default schedule: layers 0-2 and 5 dense, 3-4 sparse


def _step(cfg: LemoConfig, batch: dict):
    """One compiled step (loss, LoRA gradients, record), then a second one on the same batch: the record
    gets `second_loss` and `params_changed` (parameters the first backward wrote into)."""
    model = tiny_model("llama", lora=True, layers=LAYERS).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    clear_records()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    out = compiled(**batch)
    out.loss.backward()
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    loss, grads = out.loss.detach(), trainable_grads(model)
    rec.params_changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    model.zero_grad(set_to_none=True)
    rec.second_loss = compiled(**batch).loss.detach()
    return loss, grads, rec


@pytest.fixture(scope="module")
def whole_and_regional():
    batch = random_batch(256, 2, 200, seed=3, pad_right=[0, 23])
    cfg = LemoConfig(keep_ratio=0.5)
    # the records' memory estimates come from lemo's AOT pass, which a compile-cache hit skips
    with torch._inductor.config.patch(force_disable_caches=True):
        return _step(cfg, batch), _step(cfg.replace(regional=True), batch)


def test_regional_equals_whole_model(whole_and_regional):
    (loss_w, grads_w, rec_w), (loss_r, grads_r, rec_r) = whole_and_regional
    assert rec_w.regions is None
    torch.testing.assert_close(loss_r, loss_w, rtol=1e-5, atol=1e-6)
    assert grads_r.keys() == grads_w.keys()
    for name in grads_w:
        scale = grads_w[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads_r[name], grads_w[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_one_body_per_layer_kind(whole_and_regional):
    (_, _, rec_w), (_, _, rec) = whole_and_regional
    res = rec.regions
    assert res.counters["checkpointed_regions"] == LAYERS
    # dense layers 0, 1, 2, 5 (PEFT makes the embedding output require grad under checkpointing, so
    # layer 0's input is like the others') and sparse layers 3, 4
    assert sorted(n for _, n in res.regions) == [2, 4]
    assert res.layers_shared == 6
    # the sparse kind is cut into stages: its backward does not run the dense forward copy again
    assert res.counters["staged_bodies"] == 1 and not res.skips
    # each layer boundary a checkpointed layer reads passes through lemo::saved, so the backward
    # recomputes each layer from its saved input (not consecutive layers as one chain, all live at once)
    assert res.counters["boundaries_saved"] == LAYERS - 1
    # the estimate walks the shared bodies as if inline: close to whole-model compilation's (before the
    # boundaries were saved it was 47% above on this model: three dense layers' recomputes live at once)
    est_w, est_r = rec_w.memory.peak_hint, rec.memory.peak_hint
    assert abs(est_r - est_w) <= 0.1 * est_w, (est_r, est_w)
    assert "regional: 6 of 6 checkpointed layers call 2 shared bodies" in lemo_compile.inspect.format_record(rec)


def test_a_step_leaves_parameters_alone(whole_and_regional):
    """The step writes no parameter and the next step computes the same loss. (A first attempt to cut
    shared bodies into stages passed the gradient test above but made Inductor place sparse layers'
    LoRA gradients in the storage of the last dense layer's LoRA weights; this catches that class.)"""
    for _, _, rec in whole_and_regional:
        assert rec.params_changed == [], rec.params_changed
    (loss_w, _, rec_w), (loss_r, _, rec_r) = whole_and_regional
    torch.testing.assert_close(rec_w.second_loss, loss_w, rtol=0, atol=0)
    torch.testing.assert_close(rec_r.second_loss, loss_r, rtol=1e-6, atol=1e-6)


def test_not_with_eager_inner_or_offload(caplog):
    batch = random_batch(256, 1, 130, seed=4)
    for cfg in (LemoConfig(regional=True, inner="eager"), LemoConfig(regional=True, offload=True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="lemo_compile.backend"):
            _, _, rec = _step(cfg, batch)
        assert rec.regions is None
        assert any("regional=True has no effect" in r.getMessage() for r in caplog.records)


def test_without_checkpointing_says_nothing_was_shared(caplog, monkeypatch):
    """Regional compilation shares checkpointed layers' bodies only: without gradient checkpointing the
    graph compiles whole-model, and the log says why (not a silent no-op). (Inductor's code generation,
    which comes after, is skipped here: the graph runs as traced.)"""
    from lemo_compile import _compat

    monkeypatch.setattr(_compat, "compile_fx", lambda gm, example_inputs, config_patches: gm.forward)
    model = tiny_model("llama", lora=True, layers=LAYERS).train()
    clear_records()
    with caplog.at_level("WARNING", logger="lemo_compile.backend"):
        torch.compile(model, backend=lemo_compile.backend(LemoConfig(keep_ratio=0.5, regional=True)))(
            **random_batch(256, 1, 130, seed=4))
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    assert rec.regions is not None and not rec.regions.regions
    assert "regional: nothing shared" in lemo_compile.inspect.format_record(rec)
    assert any("shared no layer" in r.getMessage() and "enable gradient checkpointing" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_regional_equals_whole_model_other_architectures(arch):
    """Gemma3 (sliding-window and global layers: two dense kinds) and Qwen2 (q/k/v biases), keep 0.5,
    no attention_mask: the dense layers' causal SDPA calls in shared bodies become lemo::attention_lse."""
    batch = random_batch(256, 1, 200, seed=5)
    del batch["attention_mask"]  # the clean loop: full-attention layers call SDPA with is_causal
    cfg = LemoConfig(keep_ratio=0.5)
    runs = []
    for regional in (False, True):
        model = tiny_model(arch, lora=True, layers=LAYERS).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch._dynamo.reset()
        clear_records()
        out = torch.compile(model, backend=lemo_compile.backend(cfg.replace(regional=regional)))(**batch)
        out.loss.backward()
        shared = [(r.regions.layers_shared, r.masks.counters["causal_attention"])
                  for r in lemo_compile.records() if r.regions is not None]
        runs.append((out.loss.detach(), trainable_grads(model), shared))
    (loss_w, grads_w, _), (loss_r, grads_r, shared) = runs
    assert max(n for n, _ in shared) >= 4
    # no mask: the checkpointed layers' causal SDPA calls run lemo::attention_lse (no seeded random op)
    assert max(swapped for _, swapped in shared) >= 1
    torch.testing.assert_close(loss_r, loss_w, rtol=1e-5, atol=1e-6)
    for name in grads_w:
        scale = grads_w[name].abs().max().item()
        torch.testing.assert_close(grads_r[name], grads_w[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("p, device, want", [(0.1, "cuda", "dropout"), (0.0, "cuda", None), (0.1, "cpu", None)])
def test_bodies_with_random_ops_on_cuda_are_not_shared(p, device, want):
    """A body with dropout (p > 0) on CUDA stays inline (AOT autograd threads a generator state per random op
    into a shared body and fails on torch 2.11); on CPU, or with p = 0, it may be shared."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lemo_compile.passes.regions import _random_ops

    g = fx.Graph()
    x = g.placeholder("x")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x.meta["example_value"] = torch.empty(2, 3, device=device)
    g.output(g.call_function(torch.nn.functional.dropout, (x, p, True, False)))
    assert _random_ops(fx.GraphModule(torch.nn.Module(), g)) == want


def test_joint_pass_drops_checkpoint_tags_in_shared_bodies_only():
    """torch 2.11 copies the calling checkpoint's PREFER_RECOMPUTE tags onto a shared body's joint graph
    (its backward then ran the body's forward a second time); lemo's joint pass drops them there, keeps
    them in the graph that calls the bodies, and keeps MUST_SAVE everywhere. (torch 2.13 leaves the
    bodies untagged, so a compile on this CPU cannot show it: the graphs here are built by hand.)"""
    import torch.fx as fx
    from torch.utils.checkpoint import CheckpointPolicy

    from lemo_compile.backend import CompileRecord, JointPasses
    from lemo_compile.passes.regions import RegionsResult

    def graph(with_call: bool) -> fx.Graph:
        g = fx.Graph()
        x = g.placeholder("primals_0")
        y = g.call_function(torch.relu, (x,))
        y.meta.update(recompute=CheckpointPolicy.PREFER_RECOMPUTE, ac_graph_id=0)
        z = g.call_function(torch.neg, (y,))
        z.meta.update(recompute=CheckpointPolicy.MUST_SAVE, ac_graph_id=0)
        if with_call:
            g.call_function(torch.ops.higher_order.invoke_subgraph, (None, "fw_lemo_layer_0", z))
        g.output(z)
        return g

    rec = CompileRecord(graph_id=0, config=LemoConfig())
    rec.regions = RegionsResult("regions", regions=[("lemo_layer_0", 2)])
    body, root = graph(False), graph(True)
    JointPasses(LemoConfig(), rec)(body)
    JointPasses(LemoConfig(), rec)(root)
    relu = [n for g in (body, root) for n in g.nodes if n.target is torch.relu]
    neg = [n for g in (body, root) for n in g.nodes if n.target is torch.neg]
    assert "recompute" not in relu[0].meta and "ac_graph_id" not in relu[0].meta
    assert relu[1].meta["recompute"] is CheckpointPolicy.PREFER_RECOMPUTE
    assert all(n.meta["recompute"] is CheckpointPolicy.MUST_SAVE for n in neg)
    plain = graph(False)  # a compile without shared bodies keeps every tag
    JointPasses(LemoConfig(), CompileRecord(graph_id=1, config=LemoConfig()))(plain)
    assert next(n for n in plain.nodes if n.target is torch.relu).meta["recompute"] is CheckpointPolicy.PREFER_RECOMPUTE
