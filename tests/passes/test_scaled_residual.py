"""Residual adds that take the stream times a gain (issue 31): Beam's depth-scaled adds
(out * 1/sqrt(i) + h * sqrt((i-1)/i)) and MiniMax's (alpha * norm(x) + beta * attn, the stream being the input
norm's output), detected from the graph (passes.common.stream_base) and rewritten in every mode, equal to
lemo_compile.reference, which keeps each gain on the stream of the rows a block does not update."""

from __future__ import annotations

import functools

import pytest
import torch

from lemo_compile import LemoConfig, _compat
from lemo_compile.reference import reference_forward
from lemo_compile.testing import sweep
from lemo_compile.testing.models import assert_step_close, lemo_step_grads, random_batch, step_grads

_step, _close = step_grads, assert_step_close
_compiled = functools.partial(lemo_step_grads, sparsified_only=True)

N = 200
MODELS = {"beam": "BeamForCausalLM", "minimax": "MiniMaxForCausalLM"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    """The sweep's tiny random model (4 layers, hidden 64, SDPA, fp32); MiniMax's gains, 1 in its default
    config, set apart from 1 so that a rewrite that dropped one would show."""
    import transformers

    if not hasattr(transformers, MODELS[request.param]):
        pytest.skip(f"transformers {transformers.__version__} has no {MODELS[request.param]}")
    cfg = sweep.tiny_config(request.param, MODELS[request.param])
    if request.param == "minimax":
        for name, value in (("full_attn_alpha_factor", 0.7), ("full_attn_beta_factor", 1.3),
                            ("linear_attn_alpha_factor", 0.9), ("linear_attn_beta_factor", 1.1),
                            ("mlp_alpha_factor", 0.8), ("mlp_beta_factor", 1.2)):
            setattr(cfg, name, value)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = getattr(transformers, MODELS[request.param])(cfg).to(torch.float32).eval()
    if _compat.untraceable_moe_backward() and any(type(m).__name__.endswith("Experts") for m in model.modules()):
        pytest.skip("the installed transformers' fp32 experts backward cannot be traced: Dynamo breaks the graph "
                    "at every MoE layer (tests/passes/test_sparsify.py covers that stack)")
    return model








@pytest.mark.parametrize("attn_mode,mlp_mode", [("backward", "backward"), ("tokens", "tokens"),
                                                ("keys", "dense"), ("tokens", "backward")])
def test_scaled_residual_layer_is_sparse_and_equals_the_reference(model, attn_mode, mlp_mode):
    batch = random_batch(model.config.vocab_size, 2, N, seed=2, pad_right=[0, 29])
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, attn_mode=attn_mode, mlp_mode=mlp_mode, predictor="random")
    *got, recs = _compiled(model, cfg, batch)
    (rec,) = recs
    assert [d["layer"] for d in rec.sparsify.layers] == [2]
    layer = next(layer for layer in rec.detect.layers if layer.index == 2)
    assert layer.attn.stream is not None and layer.mlp.stream is not None  # both adds take a gain x stream
    want = _step(model, lambda **b: reference_forward(model, cfg, **b).output, batch)
    _close(tuple(got), want)
    if attn_mode == "tokens":  # eliminated rows change the forward: the test can tell a dropped gain
        assert not torch.allclose(got[0], _step(model, model, batch)[0])


def test_scaled_residual_layer_keeps_its_full_input_under_checkpointing(model):
    batch = random_batch(model.config.vocab_size, 1, N, seed=3)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, predictor="random")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        *got, recs = _compiled(model, cfg, batch)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    (d,) = [d for r in recs for d in r.sparsify.layers]
    want = "full input (the MLP runs whole)" if d["mlp_whole"] else "full input (a residual add takes the stream times"
    assert d["checkpoint_saves"].startswith(want), d  # Beam's MLP is a mixture of experts: it runs whole
    _close(tuple(got), _step(model, lambda **b: reference_forward(model, cfg, **b).output, batch))
