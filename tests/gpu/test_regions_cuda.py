"""Regional compilation on CUDA (LemoConfig.regional): bf16, flash attention in the shared layer bodies.
Whole-model and regional compilation give the same loss and gradients up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _step(regional: bool, batch: dict):
    model = tiny_model("llama", lora=True, layers=6).to("cuda", torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    clear_records()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled = torch.compile(model, backend=lemo_compile.backend(LemoConfig(keep_ratio=0.5, regional=regional)))
    out = compiled(**batch)
    out.loss.backward()
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    grads = {k: g.float() for k, g in trainable_grads(model).items()}
    # no parameter written by the step (Inductor once reused shared bodies' saved parameters as buffers),
    # and the next step on the same batch computes the same loss
    rec.params_changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    model.zero_grad(set_to_none=True)
    rec.second_loss = compiled(**batch).loss.detach().float()
    return out.loss.detach().float(), grads, rec


@pytest.mark.parametrize("pad_right", [None, [0, 51]])
def test_regional_equals_whole_model_bf16(pad_right):
    """No attention_mask: the dense layers' causal SDPA (flash: a seeded random op to AOT autograd, which
    fails in a shared body on torch 2.11) runs as lemo::attention_lse in the shared bodies. Padded:
    lemo's segment attention runs there."""
    batch = random_batch(256, 2, 700, seed=3, **({"pad_right": pad_right} if pad_right else {}))
    if pad_right is None:
        del batch["attention_mask"]
    batch = {k: v.cuda() for k, v in batch.items()}
    loss_w, grads_w, _ = _step(False, batch)
    loss_r, grads_r, rec = _step(True, batch)
    assert rec.regions is not None and rec.regions.layers_shared == 6
    assert rec.regions.counters["staged_bodies"] == 1  # the sparse kind: no dense copy in its backward
    assert rec.params_changed == [], rec.params_changed
    torch.testing.assert_close(rec.second_loss, loss_r, rtol=1e-5, atol=0)
    assert (rec.masks.counters["causal_attention"] >= 1) == (pad_right is None)
    torch.testing.assert_close(loss_r, loss_w, rtol=2e-2, atol=0)
    for name in grads_w:
        scale = grads_w[name].abs().max().item()
        assert scale > 0, name
        err = (grads_r[name] - grads_w[name]).abs().max().item() / scale
        assert err < 5e-2, (name, err)


def test_checkpointed_causal_attention_equals_sdpa_bf16():
    """Checkpointed layers without a mask run causal attention as lemo::attention_lse (flash forward, the
    kept-rows flash backward over every row): at keep 1.0 the step equals the eager model's (SDPA) up to
    bf16 rounding."""
    model = tiny_model("llama", lora=True, layers=4).to("cuda", torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = random_batch(256, 2, 700, seed=4)
    del batch["attention_mask"]
    batch = {k: v.cuda() for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    want = {k: g.float() for k, g in trainable_grads(model).items()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    clear_records()
    out = torch.compile(model, backend=lemo_compile.backend(LemoConfig(keep_ratio=1.0)))(**batch)
    out.loss.backward()
    rec = next(r for r in lemo_compile.records() if r.masks is not None)
    assert rec.masks.counters["causal_attention"] >= 1
    for name, w in want.items():
        err = (trainable_grads(model)[name].float() - w).abs().max().item() / w.abs().max().item()
        assert err < 5e-2, (name, err)
