"""Activation accounting: what the backward keeps, measured and attributed per layer and block."""

import torch

import lemo_compile
from lemo_compile import LemoConfig, memory
from lemo_compile.testing.models import random_batch, tiny_model


def run(model, batch, cfg):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    out, measured = memory.saved_tensor_bytes(lambda: compiled(**batch))
    out.loss.backward()
    rec = [r for r in lemo_compile.records() if r.saved][-1]
    return measured, memory.saved_by_block(rec.saved)


def test_sparse_layers_save_about_keep_ratio_of_dense():
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 1024, seed=0)
    dense_total, dense = run(model, batch, LemoConfig(inner="eager", enabled=False))
    keep = 0.25
    for attn_mode in ("tokens", "backward"):
        # causal_mask=False: the dense layer's attention stays HF's masked SDPA, as in the baseline (with it,
        # the mask becomes segments and layer 0 saves less, which is not what this test measures)
        total, sparse = run(model, batch, LemoConfig(inner="eager", keep_ratio=keep, dense_layers=(0,),
                                                     attn_mode=attn_mode, mlp_mode="backward", causal_mask=False))
        assert total < 0.6 * dense_total
        # the dense layer keeps what it kept; sparse layers keep at most ~keep of dense (+ index overhead)
        assert abs(sparse["layers.0"]["attn"] - dense["layers.0"]["attn"]) <= 0.02 * dense["layers.0"]["attn"]
        for layer in ("layers.1", "layers.2", "layers.3"):
            assert sparse[layer]["attn"] <= (keep + 0.1) * dense[layer]["attn"], (attn_mode, layer)
            assert sparse[layer]["mlp"] <= (keep + 0.15) * dense[layer]["mlp"], (attn_mode, layer)


def test_measured_bytes_count_distinct_storages():
    x = torch.randn(64, 64, requires_grad=True)

    def f():
        y = x * 2  # saves nothing for x (scalar mul)
        return (y.exp() * y.exp()).sum()  # exp saves its output; the mul saves both operands

    _, nbytes = memory.saved_tensor_bytes(f)
    assert nbytes == 2 * 64 * 64 * 4
