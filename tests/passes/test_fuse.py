"""passes.fuse: the fused row kernels replace the ends of each kept-row block copy, with the same loss
and gradients as the unfused rewrite, on every architecture, and only where the pattern is exact."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.testing.models import ARCHS, random_batch, tiny_model, trainable_grads

# per graph with one sparse layer (4 layers, default schedule: layer 2), attn=tokens, mlp=tokens:
# (gather_rmsnorm, linear_scatter_add). Gemma3's RMSNorm scales by (1 + weight) in fp32 and its
# sandwich norms sit between the projections and the residual: nothing matches, Inductor keeps them.
EXPECTED = {arch: (2, 2) for arch in ARCHS} | {"gemma3": (0, 0)}


def _loss_grads(model, cfg, batch):
    torch._dynamo.reset()
    out = torch.compile(model, backend=lemo_compile.backend(cfg))(**batch)
    out.loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    rec = [r for r in lemo_compile.records() if r.sparsified][-1]
    return out.loss.detach(), grads, rec


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_equals_unfused(arch, lora):
    model = tiny_model(arch, lora=lora)
    batch = random_batch(256, 2, 150, seed=3, pad_right=[0, 11])
    base = dict(inner="eager", attn_mode="tokens", mlp_mode="tokens", keep_ratio=0.5, predictor="random")
    l0, g0, rec0 = _loss_grads(model, LemoConfig(**base, fused_kernels=False), batch)
    l1, g1, rec1 = _loss_grads(model, LemoConfig(**base), batch)
    assert rec0.fuse is None
    c = rec1.fuse.counters
    assert (c["gather_rmsnorm"], c["linear_scatter_add"]) == EXPECTED[arch], dict(c)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("attn, mlp, expected", [
    ("tokens", "backward", (2, 1)),   # the MLP's kept copy feeds a straight-through, not a scatter-add
    ("backward", "backward", (2, 0)),
    ("keys", "dense", (1, 0)),        # only the attention's k/v run on kept rows
])
def test_fused_modes_match_reference_semantics(attn, mlp, expected):
    from lemo_compile.reference import reference_forward

    model = tiny_model("qwen2", lora=True)
    batch = random_batch(256, 2, 140, seed=5, pad_right=[0, 30])
    cfg = LemoConfig(inner="eager", attn_mode=attn, mlp_mode=mlp, keep_ratio=0.4, predictor="random")
    ref = reference_forward(model, cfg, **batch).output
    ref.loss.backward()
    ref_grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    loss, grads, rec = _loss_grads(model, cfg, batch)
    c = rec.fuse.counters
    assert (c["gather_rmsnorm"], c["linear_scatter_add"]) == expected, dict(c)
    torch.testing.assert_close(loss, ref.loss.detach(), rtol=1e-5, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_fp32_adapters_on_a_bf16_model_are_fused():
    """PEFT's default on a bf16 model keeps the adapters in fp32: the projection plus its LoRA branch is
    an fp32 sum cast back to bf16. The scatter-add kernel does that rounding itself, so the chain is
    fused (o_proj and down_proj) with the unfused graph's loss and gradients."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = get_peft_model(tiny_model("llama").to(torch.bfloat16), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    batch = random_batch(256, 2, 130, seed=4, pad_right=[0, 17])
    base = dict(inner="eager", attn_mode="tokens", mlp_mode="tokens", keep_ratio=0.5, predictor="random")
    l0, g0, _ = _loss_grads(model, LemoConfig(**base, fused_kernels=False), batch)
    l1, g1, rec = _loss_grads(model, LemoConfig(**base), batch)
    c = rec.fuse.counters
    assert (c["gather_rmsnorm"], c["linear_scatter_add"]) == (2, 2), (dict(c), [str(s) for s in rec.fuse.skips])
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for k in g0:
        assert g1[k].dtype == torch.float32
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
