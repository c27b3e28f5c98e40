"""Padded batches never give NaN, and match their oracle (docs/design.md §2.1; issue 26).

Every case: a tiny model, a batch of 3 sequences of 200 tokens padded differently (left padding of
0, 1 and 70 tokens; right padding of 0, 37 and 150, past the tiny Gemma3's 96-token sliding window;
a fully padded row between two padded ones), one forward and backward compiled by lemo. The loss and
every trainable gradient are finite and equal lemo_compile.reference (keep 0.5) or the dense model
(keep 1.0). Before the fix the default mode gave NaN on left padding (every architecture) and on
right padding past a sliding window (Gemma3). The full matrix, with every mode under Inductor too,
is benchmarks/padding_matrix.py."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

import lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.testing.models import ARCHS, random_batch, tiny_model, trainable_grads
from lemo_compile.testing.padding import PAD_KINDS, padded_batch, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(case):
    assert case.finite and not case.error, case
    assert case.matches, case


@pytest.mark.parametrize("keep", [0.5, 1.0])
@pytest.mark.parametrize("kind", sorted(PAD_KINDS))
@pytest.mark.parametrize("arch", ARCHS)
def test_default_modes_every_architecture(arch, kind, keep):
    check(run_case(arch, kind, "backward", "backward", keep=keep))


@pytest.mark.parametrize("attn_mode,mlp_mode",
                         list(itertools.product(["backward", "tokens", "keys"], ["backward", "tokens", "dense"])))
@pytest.mark.parametrize("arch,kind", [("llama", "left"), ("gemma3", "right"), ("qwen3", "empty_row")])
def test_every_mode(arch, kind, attn_mode, mlp_mode):
    check(run_case(arch, kind, attn_mode, mlp_mode, keep=0.5))


@pytest.mark.parametrize("arch,kind", [("llama", "left"), ("gemma3", "right")])
def test_inductor(arch, kind):
    check(run_case(arch, kind, "backward", "backward", inner="inductor", keep=0.5))


def test_padded_batch_shapes_the_rows_it_says():
    b = padded_batch("empty_row")
    assert b["attention_mask"].sum(1).tolist() == [195, 0, 100]
    assert (b["labels"][b["attention_mask"] == 0] == -100).all() and (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    assert (padded_batch("left")["attention_mask"][:, :1].tolist()) == [[1], [0], [0]]


@pytest.mark.parametrize("num_items", [None, 0], ids=["mean", "num_items_0"])
@pytest.mark.parametrize("attn_mode", ["backward", "tokens"])
def test_all_labels_ignored_gives_what_hf_gives(attn_mode, num_items):
    """HF: NaN loss (0 / 0), zero gradients. The segmented loss must not turn 0 x inf into NaN gradients."""
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 2, 150, seed=1, pad_right=[0, 20])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    if num_items is not None:
        batch["num_items_in_batch"] = torch.tensor(num_items)
    model.zero_grad(set_to_none=True)
    dense = model(**batch).loss
    dense.backward()
    dense_grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend=lemo_compile.backend(LemoConfig(inner="eager", attn_mode=attn_mode,
                                                                       dense_layers=(0,))))(**batch)
    out.loss.backward()
    rec = [r for r in lemo_compile.records() if r.peak_cut is not None][-1]
    assert rec.peak_cut.counters["losses_segmented"] == 1  # the segmented loss ran
    assert torch.isnan(dense) and torch.isnan(out.loss)
    for k, g in trainable_grads(model).items():
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(dense_grads[k], torch.zeros_like(g)), k


def test_padding_matrix_tiny():
    """benchmarks/padding_matrix.py --tiny: runs, counts, and exits 0 only with no NaN case."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "padding_matrix.py"), "--tiny"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "padded_nan_cases 0 of 4 cases tried" in p.stdout
