"""Post-norm decoder layers (issue 31): BART's causal LM (x1 = norm(h + attn(h)); out = norm(x1 + mlp(x1)),
no MLP module: fc1 and fc2 sit on the layer) and BERT's (the residual adds sit inside attention.output
and output, each followed by its LayerNorm). Detected from the graph, rewritten in every mode, and equal
to lemo_compile.reference, whose post-norm semantics are tested here to be more than the dense model."""

from __future__ import annotations

import functools

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.reference import reference_forward
from lemo_compile.testing import sweep
from lemo_compile.testing.models import assert_step_close, lemo_step_grads, random_batch, step_grads

_step, _assert_close = step_grads, assert_step_close
_compiled = functools.partial(lemo_step_grads, sparsified_only=True)

N = 200  # three full 64-token blocks and a partial one
MODELS = {"bart": "BartForCausalLM", "bert": "BertLMHeadModel"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    """The sweep's tiny random model (4 layers, hidden 64, SDPA, fp32) with every dropout 0, so that the
    checkpointed run, which HF does only in training mode, is deterministic too."""
    import transformers

    cfg = sweep.tiny_config(request.param, MODELS[request.param])
    for key, value in cfg.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(cfg, key, 0.0)
    cfg.init_std = 0.1  # BART's name for initializer_range (0.02: near-uniform tiny attention)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, MODELS[request.param])(cfg).to(torch.float32).eval()


def _batch(model, b=2):
    return random_batch(model.config.vocab_size, b, N, seed=b, pad_right=[0, 29][:b])








@pytest.mark.parametrize("attn_mode,mlp_mode", [("backward", "backward"), ("tokens", "tokens"),
                                                ("keys", "dense"), ("tokens", "backward")])
def test_post_norm_layer_is_sparse_and_equals_the_reference(model, attn_mode, mlp_mode):
    batch = _batch(model)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, attn_mode=attn_mode, mlp_mode=mlp_mode, predictor="random")
    *got, recs = _compiled(model, cfg, batch)
    (rec,) = recs
    assert [d["layer"] for d in rec.sparsify.layers] == [2]  # the default schedule's sparse layer of 4
    assert all(layer.post_norm for layer in rec.detect.layers), [layer.name for layer in rec.detect.layers]
    want = _step(model, lambda **b: reference_forward(model, cfg, **b).output, batch)
    _assert_close(tuple(got), want)
    # the semantics are not the dense model's: tokens and keys modes change the loss, backward mode the
    # gradients below the sparse layer
    dense = _step(model, model, batch)
    if attn_mode != "backward":
        assert abs(want[0].item() - dense[0].item()) > 1e-5  # fp32 rounding of the loss: ~1e-6
    else:
        assert torch.equal(want[0], dense[0]) or abs(want[0].item() - dense[0].item()) < 1e-6
        assert max((want[1][k] - dense[1][k]).abs().max().item() for k in dense[1]) > 1e-4


def test_reference_scores_the_layer_input_and_cuts_the_block_outputs_not_the_norms(model):
    """Post-norm: the keep set is chosen from the layer's input (there is no input norm), and tokens mode
    leaves an eliminated row at norm2(norm1(h)): the blocks add nothing there, the norms still run."""
    batch = _batch(model, b=1)
    seen = {}
    layer = lemo_compile.reference.decoder_layers(model)[2]
    handle = layer.register_forward_hook(lambda mod, args, kwargs, out: seen.update(
        h=(args[0] if args else kwargs["hidden_states"]).detach(),
        out=(out[0] if isinstance(out, tuple) else out).detach()), with_kwargs=True)
    scored = []
    try:
        res = reference_forward(model, LemoConfig(keep_ratio=0.5, attn_mode="tokens", mlp_mode="tokens"),
                                scorer=lambda i, x, tv: scored.append(x) or torch.rand(x.shape[0], 4), **batch)
    finally:
        handle.remove()
    assert len(scored) == 1 and torch.equal(scored[0], seen["h"])
    kept = lemo_compile.reference.kept_rows(*res.keep_sets[2], N)[0]
    norms = [m for m in layer.modules() if isinstance(m, torch.nn.LayerNorm)]
    x = seen["h"][0, ~kept]
    for norm in norms:  # attention's norm, then the MLP's
        x = norm(x)
    torch.testing.assert_close(seen["out"][0, ~kept], x.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen["out"][0, kept], seen["h"][0, kept])


def test_checkpointed_post_norm_layer_saves_its_full_input_and_stays_exact(model):
    """Sparse checkpointing forms the MLP's kept rows from the attention's; a post-norm MLP reads a norm of
    the whole sum, so the layer keeps its full input, says so, and equals the run without checkpointing."""
    if not model.supports_gradient_checkpointing:
        pytest.skip(f"{type(model).__name__} does not support gradient checkpointing")
    if type(model).__name__ == "BartForCausalLM":
        import inspect

        from transformers.models.bart.modeling_bart import BartDecoder
        if "self.layerdrop > 0" not in inspect.getsource(BartDecoder.forward):
            pytest.skip("this transformers' BART draws LayerDrop in every training step (torch.rand, a "
                        "data-dependent branch): Dynamo breaks the graph around each layer")
    batch = _batch(model)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, predictor="random")
    want = _compiled(model, cfg, batch)[:2]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout is 0 in the sweep's configs; HF checkpoints only in training
    try:
        *got, recs = _compiled(model, cfg, batch)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    _assert_close(tuple(got), want)
    saves = [d["checkpoint_saves"] for r in recs for d in r.sparsify.layers]
    assert saves == ["full input (post-norm layer: the MLP reads a norm of the attention's residual sum)"], saves


def test_left_padding_and_all_ignored_labels(model):
    """Row 1 left-padded by 37 tokens, row 2 with every label ignored: finite, equal to the dense model at
    keep 1.0 and to the reference at keep 0.5 (default modes)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.config.vocab_size, (3, N), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[2] = -100
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    dense = _step(model, model, batch)
    got = _compiled(model, LemoConfig(inner="eager", keep_ratio=1.0, predictor="random"), batch)[:2]
    assert torch.isfinite(got[0]) and all(torch.isfinite(v).all() for v in got[1].values())
    _assert_close(got, dense, rtol=1e-4)
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, predictor="random")
    *got, recs = _compiled(model, cfg, batch)
    assert [d["layer"] for r in recs for d in r.sparsify.layers] == [2]
    _assert_close(tuple(got), _step(model, lambda **b: reference_forward(model, cfg, **b).output, batch))
