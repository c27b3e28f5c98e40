"""passes.causal: a mask that is provably causal becomes SDPA's is_causal=True (same loss and
gradients, dense and sparse layers); masks that read inputs, sliding windows and dynamic lengths stay."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
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


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_rewrite_exact_dense_and_sparse(arch):
    model = tiny_model(arch, lora=True)
    batch = random_batch(256, 2, 150, seed=4)
    del batch["attention_mask"]  # no padding: HF builds its mask from positions only
    base = dict(inner="eager", keep_ratio=0.5, predictor="random")
    l0, g0, rec0 = _run(model, LemoConfig(**base, causal_mask=False), batch)
    l1, g1, rec1 = _run(model, LemoConfig(**base, causal_mask=True), batch)
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


@pytest.mark.parametrize("case, why", [
    ("attention_mask", "depends on the input"),       # data decides: padding is possible
    ("dynamic", "static"),                            # the value at one length proves nothing for others
])
def test_masks_that_cannot_be_proven_causal_stay(case, why):
    model = tiny_model("qwen2")
    batch = random_batch(256, 1, 140, seed=6)
    if case == "dynamic":
        del batch["attention_mask"]
    _, _, rec = _run(model, LemoConfig(inner="eager", keep_ratio=0.5, predictor="random", causal_mask=True), batch,
                     dynamic=(case == "dynamic"))
    assert rec.causal.counters["sdpa_made_causal"] == 0
    assert rec.causal.counters["skip_mask_not_causal"] == 4
    assert all(why in s.detail for s in rec.causal.skips), rec.causal.skips
