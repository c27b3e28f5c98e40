"""Where the first step of a lemo-compiled model spends its compile time (issue 28), on CPU.

A tiny Llama with N layers (LoRA, HF checkpointing, default config with logits="drop", Inductor, a fresh
Inductor cache) runs one step under cProfile; the cumulative seconds of a few functions split it into
Dynamo tracing, lemo's graph passes, AOT autograd + the forward's Inductor compile, and the backward's
Inductor compile (lazily, at the first backward). Profiling slows everything; the shares are the point.

    python benchmarks/diag/compile_profile.py --layers 16 --out benchmarks/results/compile_profile_cpu.json
    python benchmarks/diag/compile_profile.py --layers 16 --regional --out benchmarks/results/compile_profile_regional_cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.common import save_json  # noqa: E402

# (label, file suffix, function name): cumulative seconds of the first match
PHASES = (
    ("dynamo_frame", "_dynamo/convert_frame.py", "_compile_inner"),
    ("lemo_backend", "lemo_compile/backend.py", "compile_graph"),
    ("inner_compile", "lemo_compile/backend.py", "_inner"),
    ("aot_autograd", "_functorch/aot_autograd.py", "aot_module_simplified"),
    ("inductor_forward", "_inductor/compile_fx.py", "compile_fx_forward"),
    ("inductor_backward", "_inductor/compile_fx.py", "compile_fx_backward"),
    ("partition", "_inductor/compile_fx.py", "partition_fn"),
)


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float | None:
    for (path, _, func), row in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and path.replace(os.sep, "/").endswith(suffix):
            return round(row[3], 2)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--regional", action="store_true", help="LemoConfig(regional=True): shared layer bodies")
    ap.add_argument("--top", type=int, default=25, help="functions listed by their own time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()

    import torch

    import lemo_compile
    from benchmarks.common import environment
    from lemo_compile.testing.models import tiny_model

    model = tiny_model("llama", lora=True, layers=args.layers).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().disable_input_require_grads()
    compiled = torch.compile(model, backend=lemo_compile.backend(lemo_compile.LemoConfig(logits="drop", regional=args.regional)))
    ids = torch.randint(3, 200, (1, args.seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        compiled(input_ids=ids, labels=ids).loss.backward()

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(step)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    second = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    phases = {label: _cumulative(stats, suffix, name) for label, suffix, name in PHASES}
    if None not in (phases["dynamo_frame"], phases["lemo_backend"]):
        phases["dynamo_tracing"] = round(phases["dynamo_frame"] - phases["lemo_backend"], 2)
    if None not in (phases["lemo_backend"], phases["inner_compile"]):
        phases["lemo_passes"] = round(phases["lemo_backend"] - phases["inner_compile"], 2)
    own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]  # type: ignore[attr-defined]
    top = [{"function": f"{os.path.relpath(path) if os.path.isabs(path) else path}:{line}:{func}",
            "own_s": round(row[2], 2), "cumulative_s": round(row[3], 2), "calls": row[1]}
           for (path, line, func), row in own]
    doc = {"benchmark": "compile_profile", "command": "python " + " ".join(sys.argv), "env": environment(),
           "config": vars(args), "first_step_s_profiled": round(first, 1), "second_step_s": round(second, 3),
           "phases_cumulative_s": phases, "top_own_time": top}
    print(json.dumps(doc["phases_cumulative_s"], indent=1), f"first step {first:.1f} s (profiled)")
    if args.out:
        save_json(args.out, doc)


if __name__ == "__main__":
    main()
