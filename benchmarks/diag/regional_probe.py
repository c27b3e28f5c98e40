"""Regional compilation vs whole-model on a tiny checkpointed Llama, CPU Inductor. Each mode in a fresh
process (own compile cache). Reports the first step's seconds, the bytes saved for backward, the largest
gradient difference relative to each gradient's scale (0 would be exact), the matrix products the second
step's backward runs (a profiler count: a shared body the backward recomputes whole runs more), and
whether a step wrote any parameter (it must not) and the second step's loss equals the first's, and the
record's static peak-memory estimate (passes.memory; under regional compilation it walks the shared
bodies). `--chain-recompute` leaves the layer boundaries unsaved (passes.regions._save_boundaries off),
the state before that fix, for comparison.

    python benchmarks/diag/regional_probe.py --layers 16 --out benchmarks/results/regional_probe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.common import save_json  # noqa: E402


def worker(layers: int, regional: bool, path: str, chain: bool) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
    import torch

    import lemo_compile
    from lemo_compile.passes import regions
    from lemo_compile.testing.models import tiny_model, trainable_grads

    if chain:
        regions._save_boundaries = lambda gm: 0

    model = tiny_model("llama", lora=True, layers=layers).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().disable_input_require_grads()
    cfg = lemo_compile.LemoConfig(logits="drop", regional=regional)
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    ids = torch.randint(3, 200, (1, 512), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    first = time.perf_counter() - t0
    rec = next(r for r in lemo_compile.records() if r.sparsified)
    grads = trainable_grads(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    again = compiled(input_ids=ids, labels=ids)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        again.loss.backward()
    matmuls = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    torch.save({"loss": out.loss.detach(), "grads": grads, "first_step_s": first,
                "second_loss": again.loss.detach(), "backward_matmuls": matmuls, "params_written": changed,
                "saved_bytes": sum(s.nbytes for s in rec.saved), "estimated_peak_bytes": rec.memory.peak_hint,
                "regions": rec.regions.regions if rec.regions else None}, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--chain-recompute", action="store_true", help="regional without saved layer boundaries")
    ap.add_argument("--worker", nargs=2, default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.layers, args.worker[0] == "1", args.worker[1], args.chain_recompute)
        return
    import torch

    res = {}
    for regional in (False, True):
        path = tempfile.mktemp(suffix=".pt")
        chain = ["--chain-recompute"] if args.chain_recompute else []
        subprocess.run([sys.executable, __file__, "--layers", str(args.layers), *chain,
                        "--worker", str(int(regional)), path], check=True)
        res[regional] = torch.load(path)
    whole, shared = res[False], res[True]
    worst = max(((whole["grads"][k] - shared["grads"][k]).abs().max() / whole["grads"][k].abs().max()).item()
                for k in whole["grads"])
    doc = {"command": "python " + " ".join(sys.argv), "layers": args.layers, "torch": torch.__version__,
           "regional_boundaries_saved": not args.chain_recompute,
           "estimated_peak_bytes": {"whole": whole["estimated_peak_bytes"], "regional": shared["estimated_peak_bytes"]},
           "first_step_s": {"whole": round(whole["first_step_s"], 1), "regional": round(shared["first_step_s"], 1)},
           "saved_bytes": {"whole": whole["saved_bytes"], "regional": shared["saved_bytes"]},
           "regions": shared["regions"], "loss": {"whole": whole["loss"].item(), "regional": shared["loss"].item()},
           "max_grad_diff_relative": worst,
           "second_step_loss_equal": {"whole": bool(whole["second_loss"] == whole["loss"]),
                                      "regional": bool(shared["second_loss"] == shared["loss"])},
           "backward_matmuls": {"whole": whole["backward_matmuls"], "regional": shared["backward_matmuls"]},
           "params_written_by_a_step": {"whole": whole["params_written"], "regional": shared["params_written"]}}
    print(json.dumps(doc, indent=1))
    if args.out:
        save_json(args.out, doc)


if __name__ == "__main__":
    main()
