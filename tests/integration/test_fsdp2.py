"""FSDP2 (fully_shard, 2 gloo ranks on the CPU) with per-layer lemo compilation: benchmarks/fsdp2.py --tiny."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fsdp2_two_ranks_keep1_parity_and_sparse_layers(tmp_path):
    out = tmp_path / "fsdp2.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fsdp2.py"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    res = {r["variant"]: r for r in doc["results"]}
    assert all("error" not in r for r in res.values()), doc["summary"]
    dense, keep1, lemo = res["dense"]["losses"], res["lemo_keep1"]["losses"], res["lemo"]["losses"]
    assert len(dense) == 4 and all(5.0 < x < 7.5 for x in dense)  # bytes under a random tiny model: ~ln(512)
    # keep 1.0: the sparse layer is rewritten but keeps every block -> the same numbers (fp32) as dense
    assert max(abs(a - b) for a, b in zip(dense, keep1)) < 1e-5
    # default keep: a real approximation
    assert max(abs(a - b) for a, b in zip(dense, lemo)) > 1e-4
    for name in ("lemo_keep1", "lemo"):
        graphs = res[name]["lemo_graphs"]
        assert any(g.get("sparse_layers") == 1 and g["layer"] == 2 for g in graphs), graphs
        assert all(g.get("dense_layers") == 1 for g in graphs if g["layer"] != 2), graphs
    assert os.path.exists(tmp_path / "fsdp2.png")
