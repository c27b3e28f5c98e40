"""A loop whose sequence lengths vary, padded or packed, compiles twice: the first (static) graph and
one dynamic graph that serves every later length (issue 28). The second compile record says why Dynamo
compiled again."""

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.backend import clear_records
from lemo_compile.integrations import compile_for_training
from lemo_compile.testing.models import tiny_model

# At least three 64-token blocks: Dynamo specializes a block count of 1 or 2 (its size-0/1 and
# broadcasting guards), so a batch of <= 128 tokens costs one more compile, whose record says why.
LENGTHS = (200, 320, 260, 600, 421, 193)


def _batch(kind: str, n: int, gen: torch.Generator) -> dict:
    if kind == "padded":  # two rows, the second right-padded by a third
        ids = torch.randint(3, 256, (2, n), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, n - n // 3:] = 0
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    from transformers import DataCollatorWithFlattening

    docs, left = [], n
    while left > 0:
        k = min(left, int(torch.randint(8, max(9, n // 3), (1,), generator=gen)))
        docs.append(torch.randint(3, 256, (k,), generator=gen).tolist())
        left -= k
    return dict(DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs]))


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_varying_lengths_compile_once_more(kind):
    torch._dynamo.reset()
    clear_records()
    model = tiny_model("llama", lora=True).train()
    compile_for_training(model, LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,)))
    gen = torch.Generator().manual_seed(0)
    for n in LENGTHS:
        loss = model(**_batch(kind, n, gen)).loss
        assert torch.isfinite(loss)
        loss.backward()
    recs = [r for r in lemo_compile.records() if r.detect and r.detect.layers]
    assert len(recs) == 2, [r.recompile_reason for r in recs]
    assert recs[0].recompile_reason is None
    assert "size mismatch" in recs[1].recompile_reason, recs[1].recompile_reason
    assert "recompiled: " in lemo_compile.inspect.format_record(recs[1])
    assert all(r.sparsify.counters["sparse_layers"] == 3 for r in recs)


def test_dynamic_from_the_first_call_is_sparse_exact_and_guards_dropout():
    """torch.compile(dynamic=True) passes each layer's attention dropout as a graph input; lemo reads it
    as 0 under a guard, so the graph is sparse (exact at keep 1.0), and a model whose dropout changes
    recompiles and trains dense instead of reusing a graph that ignores the dropout."""
    from lemo_compile.testing.models import random_batch, trainable_grads

    torch._dynamo.reset()
    clear_records()
    batch = random_batch(256, 2, 230, seed=7, pad_right=[0, 40])
    dense = tiny_model("llama", lora=True).train()
    out = dense(**batch)
    out.loss.backward()
    model = tiny_model("llama", lora=True).train()
    compiled = torch.compile(model, backend=lemo_compile.backend(LemoConfig(inner="eager", keep_ratio=1.0)),
                             dynamic=True)
    loss = compiled(**batch).loss
    loss.backward()
    assert any(r.sparsified for r in lemo_compile.records())
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    want, got = trainable_grads(dense), trainable_grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    seen = len(lemo_compile.records())
    for layer in model.base_model.model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    compiled(**batch).loss.backward()
    new = lemo_compile.records()[seen:]
    assert new and "attention_dropout" in (new[0].recompile_reason or "")
    assert not any(r.sparsified for r in new)
    assert any("attention dropout > 0" in str(s) for r in new for s in (r.detect.skips if r.detect else []))


def test_packed_document_count_changes_do_not_recompile():
    """Packing collators pass cu_seq_lens_q/k, one entry per document + 1. Under gradient checkpointing
    with PEFT's input-require-grads hook the forward graph-breaks, and the resumed graph takes them as
    inputs: without compile_for_training marking them dynamic, the first change of the document count
    compiles that graph again (minutes at 8B). Same row length, 2, 4, 1 and 26 documents: no compile
    after the first step, and the steps stay sparse."""
    from torch._dynamo.utils import counters
    from transformers import DataCollatorWithFlattening

    torch._dynamo.reset()
    clear_records()
    counters.clear()
    model = tiny_model("llama", lora=True).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    compile_for_training(model, LemoConfig(inner="eager", keep_ratio=0.5, dense_layers=(0,)))
    collate = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    compiled = []
    for cuts in ([100, 156], [50, 50, 50, 106], [256], [10] * 25 + [6]):
        batch = dict(collate([{"input_ids": torch.randint(3, 256, (k,), generator=gen).tolist()} for k in cuts]))
        assert batch["cu_seq_lens_q"].shape == (len(cuts) + 1,)
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        compiled.append(counters["frames"]["ok"])
    assert compiled[0] > 0 and compiled[1:] == [compiled[0]] * 3, compiled
    recs = [r for r in lemo_compile.records() if r.detect and r.detect.layers]
    assert recs and all(r.sparsify.counters["sparse_layers"] == 3 for r in recs)


def test_block_functions_keep_a_symbolic_length_symbolic():
    """lemo's block functions run outside Dynamo too (fake propagation of the rewritten graph's metadata,
    inner="inductor"): on a symbolic length they must neither fail (F.pad did on CPU) nor specialize it (it
    did on CUDA: the varying-length loop compiled a new graph at every length on an H100)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from lemo_compile.predictors import block_mean
    from lemo_compile.selection import block_validity, document_blocks

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    dyn = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(2, 200, 8), symbolic_context=dyn)
    n = x.shape[1]
    with mode:
        valid = x[..., 0] > -1.0
        outs = [block_mean(x, valid, 64), block_validity(valid, 64), *document_blocks(valid.to(torch.int32), 64)]
    (sym,) = n.node.expr.free_symbols
    assert sym not in env.replacements, env.replacements
    for out in outs:
        assert isinstance(out.shape[1], torch.SymInt) and out.shape[1].node.expr.free_symbols == {sym}
