"""Decoder layers that call a torch.autograd.Function (what Liger's and Unsloth's kernels are: a fused
RMSNorm, SiLU-times-up): Dynamo traces each call as a higher-order op (autograd_function_apply) with its
forward and backward as bodies. Such a layer used to count as one hidden inside a higher-order op (as a
checkpointed layer is), so its own nodes were never classified, the Function's bodies were taken for
layers, and the model trained dense with reasons that named none of this. Now the layer is found, the
op is followed along the sequence axis by probing it, and the sparse layer equals the reference."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from lemo_compile import LemoConfig
from lemo_compile.reference import reference_forward
from lemo_compile.testing.models import assert_step_close, lemo_step_grads, random_batch, step_grads, tiny_model


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, r)
        return x * r * w

    @staticmethod
    def backward(ctx, g):
        x, w, r = ctx.saved_tensors
        xn = x * r
        gxn = g * w
        return r * (gxn - xn * (gxn * xn).mean(-1, keepdim=True)), (g * xn).reshape(-1, x.shape[-1]).sum(0), None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        s = torch.sigmoid(a)
        return g * b * s * (1 + a * (1 - s)), g * F.silu(a)


def _norm_forward(self, x):
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


@pytest.fixture(scope="module")
def model():
    """Tiny Llama with LoRA whose every RMSNorm and MLP activation is an autograd.Function."""
    model = tiny_model("llama", lora=True)
    for mod in model.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = types.MethodType(_norm_forward, mod)
        elif type(mod).__name__ == "LlamaMLP":
            mod.forward = types.MethodType(_mlp_forward, mod)
    return model


def test_the_functions_are_the_model(model):
    """The patched model computes what the plain one does (the Functions' backward included)."""
    batch = random_batch(256, 2, 130, seed=1, pad_right=[0, 17])
    got = step_grads(model, model, batch)
    plain = tiny_model("llama", lora=True)
    assert_step_close(got, step_grads(plain, plain, batch))


@pytest.mark.parametrize("attn_mode,mlp_mode,ckpt", [("backward", "backward", False), ("tokens", "tokens", False),
                                                     ("backward", "backward", True)])
def test_layers_calling_a_function_are_sparse_and_equal_the_reference(model, attn_mode, mlp_mode, ckpt):
    batch = random_batch(256, 2, 200, seed=3, pad_right=[0, 29])
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, predictor="random", attn_mode=attn_mode, mlp_mode=mlp_mode)
    want = step_grads(model, lambda **b: reference_forward(model, cfg, **b).output, batch)
    if ckpt:  # the Functions then run inside checkpoint bodies (the reference runs without: no dropout)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        *got, recs = lemo_step_grads(model, cfg, batch, sparsified_only=True)
    finally:
        if ckpt:
            model.gradient_checkpointing_disable()
            model.eval()
    (rec,) = recs
    assert len(rec.detect.layers) == 4 and not rec.detect.skips, [str(s) for s in rec.detect.skips]
    assert [d["layer"] for d in rec.sparsify.layers] == [2]
    assert_step_close(tuple(got), want)
