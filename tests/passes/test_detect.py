"""passes.detect: exact block counts per architecture and variant, and where nothing may match."""

import logging

import pytest
import torch
from torch import nn

from lemo_compile.passes.common import normalize_path
from lemo_compile.passes.detect import detect
from lemo_compile.testing.models import ARCHS, LORA_TARGETS, random_batch, tiny_model

LAYERS = 4


class Recorder:
    """A backend that runs detect on every Dynamo graph and compiles nothing."""

    def __init__(self):
        self.results = []

    def __call__(self, gm, example_inputs, **kwargs):
        self.results.append(detect(gm))
        return gm.forward

    def main(self):
        """The result for the graph holding the decoder layers (PEFT adds small graphs of its own)."""
        with_layers = [r for r in self.results if r.layers or any(s.kind != "no_decoder_layers" for s in r.skips)]
        assert len(with_layers) == 1, [r.summary() for r in self.results]
        return with_layers[0]


def run(model, backend, n=130, **kw):
    batch = random_batch(256, 2, n, seed=0)
    batch.update(kw)
    out = torch.compile(model, backend=backend)(**batch)
    out.loss.backward()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_counts_per_architecture(arch, lora):
    rec = Recorder()
    run(tiny_model(arch, lora=lora), rec)
    res = rec.main()
    lora_per_layer = len(LORA_TARGETS[arch]) if lora else 0
    assert res.summary() == {"layers": LAYERS, "attn": LAYERS, "mlp": LAYERS, "lora": LAYERS * lora_per_layer,
                             "skips": 0}
    assert [l.index for l in res.layers] == list(range(LAYERS))
    layer = res.layers[0]
    roles = {r for r in layer.attn.linears if ".lora_" not in r}
    assert roles == ({"qkv_proj", "o_proj"} if arch == "phi3" else {"q_proj", "k_proj", "v_proj", "o_proj"})
    mlp_roles = {r for r in layer.mlp.linears if ".lora_" not in r}
    assert mlp_roles == ({"gate_up_proj", "down_proj"} if arch == "phi3" else {"gate_proj", "up_proj", "down_proj"})
    assert layer.attn.sdpa is not None
    assert layer.attn.mask is not None  # transformers materialises a 4-D mask under compile (torch < 2.14)


def test_gradient_checkpointing_layers_inside_subgraphs():
    model = tiny_model("llama", lora=True)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rec = Recorder()
    run(model, rec)
    res = rec.main()
    assert res.summary() == {"layers": 4, "attn": 4, "mlp": 4, "lora": 16, "skips": 0}
    assert all(l.gm is not None and l.gm.__class__.__name__ == "GraphModule" for l in res.layers)
    assert all(any(n.op == "placeholder" for n in l.gm.graph.nodes) for l in res.layers)


def test_use_cache_true():
    model = tiny_model("qwen2")
    model.config.use_cache = True
    rec = Recorder()
    run(model, rec, use_cache=True)
    assert rec.main().summary() == {"layers": 4, "attn": 4, "mlp": 4, "lora": 0, "skips": 0}


def test_dynamic_sequence_length():
    rec = Recorder()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=rec, dynamic=True)
    for n in (100, 150):
        compiled(**random_batch(256, 1, n, seed=n)).loss.backward()
    assert len(rec.results) == 1
    assert rec.results[0].summary()["layers"] == 4


def test_single_decoder_layer_graph():
    """What FSDP2 / per-layer compile hands the backend: one decoder layer, no `layers.N` in the path."""
    model = tiny_model("llama")
    layer = model.model.layers[1]
    rec = Recorder()
    b, n, d = 2, 100, model.config.hidden_size
    h = torch.randn(b, n, d, requires_grad=True)
    pos = torch.arange(n).unsqueeze(0)
    cos, sin = model.model.rotary_emb(h, pos)
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(b, 1, n, n)
    out = torch.compile(layer, backend=rec)(h, attention_mask=mask, position_embeddings=(cos, sin))
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    res = rec.results[0]
    assert res.summary() == {"layers": 1, "attn": 1, "mlp": 1, "lora": 0, "skips": 0}
    assert res.layers[0].index is None


def test_plain_mlp_matches_nothing():
    rec = Recorder()
    net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    torch.compile(net, backend=rec)(torch.randn(3, 8)).sum().backward()
    res = rec.results[0]
    assert res.layers == []
    assert [s.kind for s in res.skips] == ["no_decoder_layers"]


def test_eager_attention_is_skipped_with_reason():
    """detect alone finds no attention in eager layers (passes.eager_attention runs before it in lemo)."""
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "eager"
    rec = Recorder()
    run(model, rec)
    res = rec.results[0]
    assert res.layers == []
    assert [s.kind for s in res.skips] == ["unknown_attention"] * 4
    assert "only SDPA attention" in res.skips[0].detail


@pytest.mark.parametrize("raw,expected", [
    ("L['self'].model.layers.0.self_attn.q_proj", "self.model.layers.0.self_attn.q_proj"),
    ("L['args'][0].model.layers.3.mlp", "args.0.model.layers.3.mlp"),
    ("L['self'].__dict__['_modules']['base_model'].__dict__['_modules']['model'].model.layers.0.self_attn",
     "self.base_model.model.model.layers.0.self_attn"),
])
def test_normalize_path(raw, expected):
    assert normalize_path(raw) == expected
