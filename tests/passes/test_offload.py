"""Activation offload (LemoConfig.offload, issue 27): the values a checkpointed training graph saves
for backward (a sparse layer's kept rows and what its backward mode keeps, dense layers' inputs) move to
host memory in the forward and back in the backward, through AOT autograd's activation offloading
driven by lemo's joint-graph tags. Exact in every mode, with and without PEFT; the record and the
memory estimate say how many bytes went to the host; a host budget too small refuses the graph at
compile time. (On CPU the host copy is a copy on the same device: these tests prove the graph plumbing
and exactness; the side-stream overlap and the device savings are measured on the GPU.)"""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import HostMemoryBudgetError, clear_records
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads

N = 200  # not a multiple of the block size

pytestmark = pytest.mark.skipif(not hasattr(torch._functorch.config, "enable_activation_offloading"),
                                reason="this torch has no AOT activation offloading")


def _run(model, cfg, batch):
    torch._dynamo.reset()
    clear_records()
    loss = torch.compile(model, backend=lemo_compile.backend(cfg))(**batch).loss
    loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    return loss.detach(), grads, rec


def _model(lora: bool):
    model = tiny_model("llama", lora=lora).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("attn_mode,mlp_mode", [("backward", "backward"), ("tokens", "tokens"),
                                                ("keys", "backward"), ("backward", "tokens")])
def test_offload_is_exact_and_moves_kept_rows(attn_mode, mlp_mode, lora):
    model = _model(lora)
    batch = random_batch(256, 2, N, seed=1, pad_right=[0, 23])
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, attn_mode=attn_mode, mlp_mode=mlp_mode, dense_layers=(0,),
                     offload_min_bytes=1024)
    ref_loss, ref_grads, ref = _run(model, cfg, batch)
    loss, grads, rec = _run(model, cfg.replace(offload=True), batch)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0, msg=k)
    assert not ref.offloaded and rec.offloaded
    moved = {v.name for v in rec.offloaded}
    big = {v.name for v in ref.saved if v.nbytes >= 1024}
    assert big and big <= moved | {v.name for v in ref.saved if v.layer == "other"}, (big, moved)
    layers = {v.layer for v in rec.offloaded}
    assert {"layers.1", "layers.2"} <= layers, layers  # the sparse layers' kept rows
    # the estimate books them on the host: what the device holds between forward and backward drops by
    # about as much (the step's peak may sit late in the backward, where offload changes nothing)
    assert rec.memory.host_hint == pytest.approx(rec.host_bytes, rel=0.01)
    at_boundary = [next(live for graph, _, live in r.memory.timeline if graph == "backward") for r in (ref, rec)]
    assert at_boundary[0] - at_boundary[1] == pytest.approx(rec.host_bytes, rel=0.02), at_boundary
    assert rec.memory.peak_hint <= ref.memory.peak_hint


@pytest.fixture
def no_compile_caches():
    """Compile afresh: a cache hit skips lemo's AOT-level pass, which fills the record."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def test_offload_under_inductor_is_exact(no_compile_caches):
    model = _model(True)
    batch = random_batch(256, 1, N, seed=2)
    cfg = LemoConfig(inner="inductor", keep_ratio=0.5, dense_layers=(0,), offload_min_bytes=1024)
    ref_loss, ref_grads, _ = _run(model, cfg, batch)
    loss, grads, rec = _run(model, cfg.replace(offload=True), batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)
    assert rec.offloaded and rec.host_bytes > 0


def test_min_bytes_leaves_small_values_on_the_device():
    model = _model(True)
    batch = random_batch(256, 1, N, seed=3)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,), offload=True, offload_min_bytes=1 << 30)
    _, _, rec = _run(model, cfg, batch)
    assert rec.offloaded == [] and rec.host_bytes == 0


def test_host_budget_too_small_fails_at_compile_time():
    model = _model(True)
    batch = random_batch(256, 1, N, seed=4)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,), offload=True, offload_min_bytes=1024,
                     host_memory_budget=4096)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    with pytest.raises(Exception, match="host_memory_budget") as info:
        compiled(**batch)
    err = info.value
    while err is not None and not isinstance(err, HostMemoryBudgetError):
        err = err.__cause__ or err.__context__
    assert isinstance(err, HostMemoryBudgetError), info.value
    assert "GiB of activations" in str(err)


@pytest.mark.parametrize("bad", [{"offload": 1}, {"host_memory_budget": -1}, {"host_memory_budget": 1.5},
                                 {"offload_min_bytes": 0}])
def test_bad_offload_options_name_the_option(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"LemoConfig.{name}"):
        LemoConfig(**bad)


def test_max_context_with_a_host_budget():
    """explain(dynamic=True).max_context(device, host_bytes=...): the host budget binds when it is
    the smaller one; without offload the longest context is shorter at the same device budget.
    (Without PEFT or checkpointing: one graph, one length symbol.)"""
    model = tiny_model("llama").train()
    batch = random_batch(256, 1, 256, seed=5)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,), offload_min_bytes=1)
    plain = lemo_compile.explain(model, input_ids=batch["input_ids"], labels=batch["labels"], config=cfg,
                                 dynamic=True)
    off = lemo_compile.explain(model, input_ids=batch["input_ids"], labels=batch["labels"],
                               config=cfg.replace(offload=True), dynamic=True)
    budget = 64 << 20
    n_plain, n_off = plain.max_context(budget), off.max_context(budget)
    assert 0 < n_plain < n_off
    est = max((r.memory for r in off.records if r.memory), key=lambda e: e.peak_hint)
    host_small = est.host_at(**{est.symbols[0]: n_off // 4})
    n_host = off.max_context(budget, host_bytes=host_small)
    assert n_host < n_off and abs(n_host - n_off // 4) <= 64, (n_host, n_off)


def test_host_budget_checked_at_every_length_of_a_dynamic_graph():
    """A graph compiled for a dynamic length is checked at the actual length of each call, before it
    runs: one that fits at 200 tokens and not at 400 refuses the 400-token call."""
    model = tiny_model("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,), offload=True, offload_min_bytes=1024)
    short, long = (random_batch(256, 1, n, seed=6) for n in (200, 400))
    torch.compiler.reset()
    clear_records()
    for t in short.values():
        torch._dynamo.mark_dynamic(t, 1)
    torch.compile(model, backend=lemo_compile.backend(cfg))(**short).loss.backward()
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    at = {n: int(rec.host_formula.subs({s: n for s in rec.host_formula.free_symbols})) for n in (200, 400)}
    assert at[200] == rec.host_bytes and at[400] > at[200]
    budget = (at[200] + at[400]) // 2
    torch.compiler.reset()
    clear_records()
    for t in short.values():
        torch._dynamo.mark_dynamic(t, 1)
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg.replace(host_memory_budget=budget)))
    compiled(**short).loss.backward()  # fits
    with pytest.raises(HostMemoryBudgetError, match="at sizes"):
        compiled(**long)
    assert len([r for r in lemo_compile.records() if r.sparsified]) == 1  # no recompile: the same graph refused


def test_a_host_budget_is_checked_on_a_warm_start_too():
    """The budget is checked from lemo's AOT pass, which a graph loaded from the compile caches would
    skip: with a host budget a graph is compiled afresh, so a second process (here: a reset and the same
    compile) still knows its host bytes and still refuses a call over the budget."""
    model = _model(True)
    batch = random_batch(256, 1, N, seed=7)
    cfg = LemoConfig(inner="inductor", keep_ratio=0.5, dense_layers=(0,), offload=True, offload_min_bytes=1024,
                     host_memory_budget=1 << 30)
    for _ in range(2):
        _, _, rec = _run(model, cfg, batch)
        assert rec.offloaded and rec.host_bytes > 0 and rec.host_formula is not None


def test_a_record_stream_fake_of_the_wrong_signature_is_mended(monkeypatch):
    """torch 2.11 registers streams::record_stream's fake with three parameters (sync_dealloc's), which
    broke Inductor's lowering of the side-stream offload on the GPU; lemo registers a fake that takes the
    op's own arguments, and leaves a right one alone."""
    import inspect

    from torch._subclasses.fake_tensor import FakeTensorMode

    from lemo_compile import _compat
    pytest.importorskip("torch._dynamo.variables.streams")
    from torch._library.custom_ops import OPDEFS
    opdef = OPDEFS.get("streams::record_stream")
    if opdef is None:
        pytest.skip("this torch has no streams::record_stream op")

    def broken(src_stream_index, wait_event_index, to_dealloc):
        return None

    monkeypatch.setattr(opdef, "_abstract_fn", broken)
    with FakeTensorMode(), pytest.raises(TypeError, match="to_dealloc"):
        torch.ops.streams.record_stream(torch.empty(3), 0)
    assert _compat.mend_record_stream_fake()
    inspect.signature(opdef._abstract_fn).bind(torch.empty(3), 0)
    with FakeTensorMode():
        torch.ops.streams.record_stream(torch.empty(3), 0)
    assert not _compat.mend_record_stream_fake()  # a right fake stays as it is
