"""Sequence parallelism (lemo_compile.sequence_parallel, Ulysses layout) on 2 and 4 gloo ranks against one
process: the summed loss shares and LoRA gradients equal the dense single-process run (fp32), eager and
compiled with backend="lemo". The attention's all-to-all mixes positions across ranks, so lemo leaves every
layer dense and says why (per-rank sparse layers under sequence parallelism are not built yet)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5  # fp32, a sum over ranks in another order than one process; observed <= 2e-6


def _check(tmp_path, ranks: int, variants: str) -> dict:
    out = tmp_path / f"sp{ranks}.json"
    p = subprocess.run([sys.executable, "-m", "lemo_compile.testing.sp_check", "--ranks", str(ranks),
                        "--variants", variants, "--out", str(out)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert 5.0 < doc["reference_loss"] < 7.5  # random tokens under a random tiny model: ~ln(256)
    return {r["variant"]: r for r in doc["results"]}


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_equals_one_process(tmp_path, ranks):
    res = _check(tmp_path, ranks, "eager,lemo:1.0,lemo:0.4,lemo:0.4:tokens")
    for name, r in res.items():
        assert r["loss_error"] < TOL and r["grad_error"] < TOL, (name, r)
    for name in ("lemo:1.0", "lemo:0.4", "lemo:0.4:tokens"):
        # not silently dense: every layer lemo would sparsify names the collective it stopped at
        assert res[name]["sparse_layers"] == [], res[name]
        assert len(res[name]["skips"]) == 3 and all("all_to_all_single" in s or "merged or split" in s
                                                    for s in res[name]["skips"]), res[name]["skips"]


def test_contract_errors():
    import torch
    from lemo_compile import sequence_parallel as sp

    with pytest.raises(RuntimeError, match="not initialized"):
        sp.register()
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(NotImplementedError, match="attention masks"):
        sp.ulysses_attention(None, q, q, q, torch.ones(1, 1, 8, 8, dtype=torch.bool), group=None)
