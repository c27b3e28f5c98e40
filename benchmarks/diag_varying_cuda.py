"""Diagnose per-length recompiles of the varying-length loop on CUDA (issue 28): a tiny Llama under the
default lemo config, three lengths, TORCH_LOGS=dynamic,recompiles in the environment. Prints, per step,
the graph count and lemo's recompile reason; the log shows which guard specialized the length.

    TORCH_LOGS=recompiles,dynamic python benchmarks/diag_varying_cuda.py --device cuda
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--lengths", default="256,384,512,640")
    args = ap.parse_args()
    from torch._dynamo.utils import counters
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    run_node = FakeTensorProp.run_node

    def traced_run_node(self, n):  # name each node whose fake run adds a shape guard
        env = getattr(getattr(self, "_mode", None), "shape_env", None)
        before = len(env.guards) if env is not None else 0
        out = run_node(self, n)
        if env is not None and len(env.guards) > before:
            print(f"GUARD by {n.format_node()} -> {[str(g.expr) for g in env.guards[before:]]}", flush=True)
        return out

    FakeTensorProp.run_node = traced_run_node

    import lemo_compile
    from lemo_compile.testing.models import tiny_model

    model = tiny_model("llama", lora=True).to(args.device)
    step = torch.compile(model, backend=lemo_compile.backend(lemo_compile.LemoConfig(logits="drop", inner=args.inner)))
    for n in map(int, args.lengths.split(",")):
        ids = torch.randint(3, 256, (1, n), device=args.device)
        step(input_ids=ids, labels=ids).loss.backward()
        recs = lemo_compile.records()
        print(f"STEP length {n}: graphs {counters['stats'].get('unique_graphs', 0)}, lemo records {len(recs)}, "
              f"reason {recs[-1].recompile_reason if recs else None}, metadata skipped {recs[-1].metadata_skipped if recs else None}", flush=True)


if __name__ == "__main__":
    main()
