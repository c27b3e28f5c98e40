"""Sparse activation checkpointing: a checkpointed sparse layer keeps only its kept rows (and the keep
set) for backward, and gives exactly the loss and gradients of the same configuration without
checkpointing."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
from lemo_compile.memory import saved_by_block
from lemo_compile.testing.models import random_batch, tiny_model, trainable_grads

N, D = 256, 64  # tiny model: hidden 64, fp32


def _run(model, cfg, batch, ckpt):
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    torch._dynamo.reset()
    clear_records()
    out = torch.compile(model, backend=lemo_compile.backend(cfg))(**batch)
    out.loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    return out.loss.detach(), grads, rec


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("attn_mode,mlp_mode", [("tokens", "backward"), ("tokens", "tokens"),
                                                ("backward", "backward"), ("backward", "tokens")])
def test_checkpointed_equals_not_checkpointed_and_saves_kept_rows(attn_mode, mlp_mode, b):
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, b, N, seed=b, pad_right=[0, 17][:b])
    cfg = LemoConfig(inner="eager", keep_ratio=0.25, attn_mode=attn_mode, mlp_mode=mlp_mode, predictor="random",
                     dense_layers=(0, 3))
    ref_loss, ref_grads, _ = _run(model, cfg, batch, ckpt=False)
    loss, grads, rec = _run(model, cfg, batch, ckpt=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    # layers 1 and 2 are sparse: keep set and kept rows marked saved (attn_mode="backward": also the
    # dense attention's output and log-sum-exp at the kept queries), and nothing else of them kept
    assert rec.saved_for_recompute == 2 * (3 if attn_mode == "tokens" else 5)
    assert [d["checkpoint_saves"] for d in rec.sparsify.layers] == ["kept rows"] * 2
    m = N // 4  # keep 0.25 of 4 blocks of 64
    heads = model.config.num_attention_heads
    kept_rows = b * m * D * 4 if attn_mode == "tokens" else b * m * (2 * D + heads) * 4
    full_input = b * N * D * 4
    per_layer = {k: sum(v.values()) for k, v in saved_by_block(rec.saved).items()}
    assert kept_rows <= per_layer["layers.1"] <= kept_rows + 4 * 1024, per_layer
    # layer 2's output is the input of dense layer 3, which ordinary checkpointing keeps in full
    assert kept_rows + full_input <= per_layer["layers.2"] <= kept_rows + full_input + 4 * 1024, per_layer


def test_modes_that_need_every_row_fall_back_and_say_so():
    model = tiny_model("qwen3", lora=True)
    batch = random_batch(256, 1, 200, seed=7)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, attn_mode="keys", predictor="random")
    ref_loss, ref_grads, _ = _run(model, cfg, batch, ckpt=False)
    loss, grads, rec = _run(model, cfg, batch, ckpt=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    assert rec.saved_for_recompute == 0
    assert rec.sparsify.layers[0]["checkpoint_saves"].startswith("full input (attn_mode=keys")
    text = lemo_compile.inspect.format_record(rec)
    assert "checkpointed: saves full input" in text
