"""The examples run as users run them (tiny model, CPU, a couple of steps)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_trainer_lora_example_trains_and_reloads_as_plain_peft(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "trainer_lora.py"), "--tiny", "--steps", "2",
                           "--seq", "192", "--eval-chunks", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["model"] == "tiny random Llama" and doc["steps"] == 2
    assert len(doc["train_losses"]) == 2 and all(math.isfinite(x) for x in doc["train_losses"])
    assert doc["sparse_layers"], "lemo did not rewrite the Trainer's graph"
    # the adapter, reloaded onto a fresh base with plain PEFT, changed the held-out loss
    assert math.isfinite(doc["held_out_loss_finetuned_plain_peft"])
    assert doc["held_out_loss_finetuned_plain_peft"] != doc["held_out_loss_base"]
    assert "held-out loss (plain PEFT, dense)" in proc.stdout
