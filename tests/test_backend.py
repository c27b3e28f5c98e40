"""The backend as a whole: rewrites off equals the inner compiler, graphs it cannot use are left
alone with one log line, records and explain, and compile caches keyed by lemo's code and options."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import AotPasses
from lemo_compile.testing.models import ARCHS, random_batch, tiny_model, trainable_grads


def loss_and_grads(model, backend, batch):
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(**batch)
    out.loss.backward()
    return out.loss.detach(), trainable_grads(model)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rewrites_off_equal_inner_compiler(arch, lora):
    model = tiny_model(arch, lora=lora)
    batch = random_batch(256, 2, 150, seed=1, pad_right=[0, 9])
    ref_loss, ref_grads = loss_and_grads(model, "aot_eager", batch)
    for cfg in (LemoConfig(inner="eager", enabled=False),
                LemoConfig(inner="eager", dense_layers=(0, 1, 2, 3), peak_cut=False, causal_mask=False)):  # untouched
        loss, grads = loss_and_grads(model, lemo_compile.backend(cfg), batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    rec = lemo_compile.records()[-1]
    assert rec.left_alone and not rec.rewritten


def test_graph_without_decoder_layers_runs_with_one_log_line(caplog):
    net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    x = torch.randn(3, 8)
    with caplog.at_level(logging.INFO, logger="lemo_compile"):
        out = torch.compile(net, backend=lemo_compile.backend(LemoConfig(inner="eager")))(x)
    torch.testing.assert_close(out, net(x))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lemo_compile")]
    assert len(lines) == 1 and "left graph" in lines[0] and "no_decoder_layers" in lines[0], lines


def test_explain_reports_layers_and_skips():
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 130, seed=2)
    exp = lemo_compile.explain(model, config=LemoConfig(inner="eager", keep_ratio=0.5), **batch)
    text = str(exp)
    assert "4 decoder layers" in text and "16 LoRA branches" in text
    assert text.count("sparse keep=0.5") == 1  # 4 layers: first half and last dense -> layer 2 sparse
    assert "layers.2" in text


def test_explain_leaves_other_compiled_code_alone():
    """explain() drops only the compiled entries it put on the model's forward methods: a function the
    user compiled before keeps its compiled code (a full Dynamo reset used to drop it too), and explaining
    the same model many times piles up no entries towards Dynamo's recompile limit."""
    from lemo_compile import _compat

    def user_fn(x):
        return torch.sin(x) + 1

    compiled_fn = torch.compile(user_fn, backend="eager")
    compiled_fn(torch.randn(3))
    assert _compat.compiled_entries(user_fn.__code__) == 1
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 130, seed=2)
    for _ in range(3):
        lemo_compile.explain(model, config=LemoConfig(inner="eager", keep_ratio=0.5), **batch)
        assert _compat.compiled_entries(type(model).forward.__code__) == 0
    assert _compat.compiled_entries(user_fn.__code__) == 1


def test_uuid_covers_options():
    a, b = AotPasses(LemoConfig()), AotPasses(LemoConfig(keep_ratio=0.5))
    assert a.uuid() == AotPasses(LemoConfig()).uuid()
    assert a.uuid() != b.uuid()


_CACHE_PROBE = textwrap.dedent("""
    import json, sys, torch
    import lemo_compile
    from lemo_compile import LemoConfig
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    cfg = LemoConfig(inner="inductor", keep_ratio=float(sys.argv[1]))
    out = torch.compile(net, backend=lemo_compile.backend(cfg))(torch.randn(4, 8, requires_grad=True))
    out.sum().backward()
    print("AOT", json.dumps([g for r in lemo_compile.records() for g in r.aot_graphs]))
""")


def test_compile_cache_never_skips_the_aot_pass(tmp_path):
    """Warm caches in a new process: same options reuse the cached graph (our pass need not run);
    changed options must miss the cache and run the pass again."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))

    def run(keep):
        p = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(keep)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        line = [l for l in p.stdout.splitlines() if l.startswith("AOT ")][-1]
        return json.loads(line[4:])

    first = run(0.5)
    assert "forward" in first  # cold cache: the pass ran
    assert run(0.5) == []  # warm cache, same options: a cache hit
    assert "forward" in run(0.25)  # other options: a miss, the pass runs


_WARM_PROBE = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    import lemo_compile
    from lemo_compile import LemoConfig
    from lemo_compile.testing.models import random_batch, tiny_model
    torch.set_num_threads(1)
    model = tiny_model("llama", lora=True).train()
    regional = sys.argv[2] == "regional"
    if regional:  # shared bodies are checkpointed layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().disable_input_require_grads()
    batch = random_batch(256, 1, 200, seed=0)
    cfg = LemoConfig(inner="inductor", keep_ratio=float(sys.argv[1]), dense_layers=(0,), regional=regional)
    loss = torch.compile(model, backend=lemo_compile.backend(cfg))(**batch).loss
    loss.backward()
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    print("WARM", json.dumps({"aot": dict(counters["aot_autograd"]), "inductor": dict(counters["inductor"]),
                              "loss": float(loss), "sparse": rec.sparsify.counters["sparse_layers"],
                              "passes": rec.aot_graphs,
                              "shared": rec.regions.layers_shared if rec.regions is not None else 0}))
""")


@pytest.mark.parametrize("mode", ["whole", "regional"])
def test_rewritten_graph_warm_start_reuses_aot_and_inductor_caches(tmp_path, mode):
    """A fresh process with a warm cache reuses a rewritten (sparse) graph whole: AOT autograd's cache
    hits (lemo's inserted functions and fake values make the graph cacheable), so neither AOT tracing
    nor Inductor runs again; the same loss comes out; other options miss. Also with regional compilation
    (checkpointed layers calling shared bodies)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))

    def run(keep):
        p = subprocess.run([sys.executable, "-c", _WARM_PROBE, str(keep), mode], env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads([l for l in p.stdout.splitlines() if l.startswith("WARM ")][-1][5:])

    cold = run(0.5)
    assert cold["aot"].get("autograd_cache_saved") == 1 and "forward" in cold["passes"], cold
    warm = run(0.5)
    assert warm["aot"].get("autograd_cache_hit") == 1 and warm["passes"] == [], warm
    assert warm["loss"] == cold["loss"] and warm["sparse"] == cold["sparse"] == 3
    assert cold["shared"] == (3 if mode == "regional" else 0)  # layers 1-3 (sparse) share one body
    other = run(0.25)
    assert other["aot"].get("autograd_cache_hit", 0) == 0 and "forward" in other["passes"], other


@pytest.fixture
def fresh_dense_warnings():
    from lemo_compile.backend import _warned_dense

    _warned_dense.clear()
    yield
    _warned_dense.clear()


def _lemo_warnings(model, cfg, batch) -> list[str]:
    import warnings

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend=lemo_compile.backend(cfg))(**batch).loss.backward()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "lemo:" in str(w.message)]


def test_dense_by_skip_warns_once_dense_by_schedule_never(fresh_dense_warnings):
    import transformers

    from lemo_compile.testing.models import tiny_config

    config = tiny_config("llama")
    config._attn_implementation = "eager"  # matmul + softmax attention, left as written: detect skips every layer
    eager_attn = transformers.LlamaForCausalLM(config).eval()
    batch = random_batch(256, 1, 130, seed=0)
    as_written = LemoConfig(inner="eager", keep_ratio=0.5, eager_attention=False)
    first = _lemo_warnings(eager_attn, as_written, batch)
    assert len(first) == 1 and "trains dense" in first[0] and "[unknown_attention] layers.2" in first[0], first
    assert _lemo_warnings(eager_attn, as_written, batch) == []  # once
    sdpa = tiny_model("llama")
    for cfg in (LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0, 1, 2, 3)),  # the config's own choice
                LemoConfig(inner="eager", keep_ratio=1.0),  # no sparsity asked for
                LemoConfig(inner="eager", keep_ratio=0.5)):  # sparse: nothing to warn about
        assert _lemo_warnings(sdpa, cfg, batch) == [], cfg


class _BareAttention(nn.Module):
    """Attention outside anything named like a decoder layer (and no residual stream)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def test_attention_without_decoder_layers_warns(fresh_dense_warnings):
    import warnings

    x = torch.randn(1, 10, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(_BareAttention(), backend=lemo_compile.backend(LemoConfig(inner="eager", keep_ratio=0.5)))(x)
        torch.compile(nn.Linear(16, 4), backend=lemo_compile.backend(LemoConfig(inner="eager")))(x)  # no attention
    got = [str(w.message) for w in caught if "lemo:" in str(w.message)]
    assert len(got) == 1 and "1 scaled_dot_product_attention calls, but no node belongs" in got[0], got


def test_record_prints_a_summary_not_the_graphs():
    """print(lemo_compile.records()) used to dump every graph's text (megabytes on a real model)."""
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, 130, seed=0)
    torch._dynamo.reset()
    from lemo_compile.backend import clear_records
    clear_records()  # records of earlier tests in this process
    cfg = LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,))
    torch.compile(model, backend=lemo_compile.backend(cfg))(**batch).loss.backward()
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    text = repr(rec)
    assert len(text) < 600 and len(rec.before) > 2000, (len(text), len(rec.before))
    assert "3 sparse layers (1, 2, 3; keep 0.5, backward/backward)" in text and "loss: segmented" in text, text
