"""Activation offload on CUDA (LemoConfig.offload): the side-stream copies, sunk waits and prefetched
reloads of AOT autograd's offloading under Inductor. Two optimizer steps with offload equal two without
(losses, gradients, parameters) in fp32, padded and unpadded; values did go to the host."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _two_steps(offload: bool, batch: dict, attn_mode: str):
    torch.manual_seed(0)
    model = tiny_model("llama", lora=True, layers=4).to("cuda").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    clear_records()
    cfg = LemoConfig(keep_ratio=0.5, dense_layers=(0,), attn_mode=attn_mode, mlp_mode=attn_mode,
                     offload=offload, offload_min_bytes=1024)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):  # a cache hit leaves the record empty
        compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
        compiled(**batch)  # compiles inside the patch (the first call)
    # SGD: parameters linear in the gradients (AdamW turns float noise in the zero gradients of LoRA A
    # at B = 0 into full-size steps of either sign)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], None
    for _ in range(2):
        loss = compiled(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads = grads or trainable_grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    params = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads, params, rec


@pytest.mark.parametrize("attn_mode", ["backward", "tokens"])
@pytest.mark.parametrize("pad_right", [None, [0, 37]])
def test_offload_equals_no_offload_on_cuda(attn_mode, pad_right):
    batch = random_batch(256, 2, 700, seed=5, **({"pad_right": pad_right} if pad_right else {}))
    batch = {k: v.cuda() for k, v in batch.items()}
    loss_0, grads_0, params_0, ref = _two_steps(False, batch, attn_mode)
    loss_1, grads_1, params_1, rec = _two_steps(True, batch, attn_mode)
    assert not ref.offloaded and rec.offloaded and rec.host_bytes > 0
    torch.testing.assert_close(loss_1, loss_0, rtol=1e-5, atol=1e-6)
    for k in grads_0:
        torch.testing.assert_close(grads_1[k], grads_0[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in params_0:
        torch.testing.assert_close(params_1[k], params_0[k], rtol=1e-4, atol=1e-6, msg=k)
