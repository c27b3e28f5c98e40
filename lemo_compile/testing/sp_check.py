"""Sequence parallelism against one process: P gloo ranks on the CPU, each with its slice of the sequence.

    python -m lemo_compile.testing.sp_check --ranks 2 --variants eager,lemo:1.0,lemo:0.4:tokens --out r.json

For every variant the ranks run one forward and backward of a tiny Llama (LoRA, fp32) on their slices
(`sequence_parallel.shard_batch`, Ulysses attention), sum the loss shares and the LoRA gradients over the
ranks, and rank 0 compares them with one process running the whole sequence densely (the same weights):
`loss_error` (absolute) and `grad_error` (max over parameters of |diff| / max |reference|). Variants:
`eager`; `lemo:KEEP[:ATTN_MODE]` compiles with backend="lemo" at that keep ratio (layers 1.. sparse) and
records, per rank, the sparse layers and skip reasons of its graphs; `lemo:first[:ATTN_MODE]` keeps only
the first block of every rank's slice (a forced block; the keep ratio asks for fewer), and its reference is
`lemo_compile.reference` in one process with the first block of every slice forced: the same keep sets, so
the sparse layers must agree exactly. Writes one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N_TOKENS = 320  # divides by 2 and 4 ranks; 80 per rank at 4 (not 64 = the tiny hidden size: see the README)
BATCH = 2
LAYERS = 4  # tiny_model's default
BLOCK = 16  # slices of 160 (2 ranks) and 80 (4 ranks) rows: whole blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(arch: str, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    from .models import tiny_model, trainable_grads

    torch.manual_seed(0)
    model = tiny_model(arch, lora=True).train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), trainable_grads(model)


def _config(variant: str, ranks: int | None = None):
    """The LemoConfig of a lemo variant: on the ranks (ranks=None) or for the one-process reference."""
    import lemo_compile

    _, keep, *mode = variant.split(":")  # lemo:KEEP[:ATTN_MODE[:BLOCK]]; BLOCK 0: every layer dense
    block = int(mode[1]) if len(mode) > 1 and mode[1] != "0" else BLOCK
    dense = tuple(range(LAYERS)) if len(mode) > 1 and mode[1] == "0" else (0,)
    opts = dict(dense_layers=dense, inner="eager", block_size=block, **({"attn_mode": mode[0]} if mode else {}))
    if keep == "first":
        per_rank = N_TOKENS // (ranks or 1) // block
        forced = (0,) if ranks is None else tuple(range(0, N_TOKENS // block, per_rank))
        return lemo_compile.LemoConfig(keep_ratio=0.01, forced_blocks=forced, **opts)
    return lemo_compile.LemoConfig(keep_ratio=float(keep), **opts)


def _sparse_reference(arch: str, ids: torch.Tensor, variant: str, ranks: int) -> tuple[float, dict]:
    from lemo_compile.reference import reference_forward

    from .models import tiny_model, trainable_grads

    torch.manual_seed(0)
    model = tiny_model(arch, lora=True).train()
    loss = reference_forward(model, _config(variant, ranks), input_ids=ids, labels=ids).output.loss
    loss.backward()
    return loss.item(), trainable_grads(model)


def _variant(arch: str, ids: torch.Tensor, variant: str, group: Any) -> dict:
    import lemo_compile
    from lemo_compile import sequence_parallel as sp
    from lemo_compile.backend import clear_records

    from .models import tiny_model, trainable_grads

    torch.manual_seed(0)
    model = tiny_model(arch, lora=True).train()
    model.set_attn_implementation(sp.register(group))
    step = model
    if variant.startswith("lemo"):
        cfg = _config(variant)
        clear_records()
        torch._dynamo.reset()
        step = torch.compile(model, backend=lemo_compile.backend(cfg))
    loss = step(**sp.shard_batch(ids, ids, group=group)).loss
    loss.backward()
    sp.all_reduce_grads(model, group)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    out = {"variant": variant, "loss": total.item(), "grads": trainable_grads(model)}
    if variant.startswith("lemo"):
        recs = lemo_compile.records()
        out["sparse_layers"] = sorted({d["layer"] for r in recs if r.sparsify for d in r.sparsify.layers})
        # what this rank hands to the all-to-alls per step, forward + backward (the compiled graphs' sizes)
        out["exchanged_bytes"] = sum(sum(r.exchanged.values()) for r in recs)
        out["skips"] = sorted({str(s) for r in recs for s in r.skips})
    return out


def _rank(rank: int, ranks: int, port: int, arch: str, variants: list[str], out: str, command: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.set_num_threads(1)
    ids = torch.randint(3, 256, (BATCH, N_TOKENS), generator=torch.Generator().manual_seed(1))
    results = []
    ref_loss, ref_grads = _reference(arch, ids) if rank == 0 else (None, None)
    for v in variants:
        r = _variant(arch, ids, v, dist.group.WORLD)
        if rank == 0:
            grads = r.pop("grads")
            want_loss, want = ((ref_loss, ref_grads) if ":first" not in v
                               else _sparse_reference(arch, ids, v, ranks))
            r["reference"] = "dense, one process" if ":first" not in v else "lemo_compile.reference, one process"
            r["loss_error"] = abs(r["loss"] - want_loss)
            r["grad_error"] = max(((grads[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)
            r["differs_from_dense"] = abs(r["loss"] - ref_loss)
            results.append(r)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"command": command, "torch": torch.__version__, "ranks": ranks, "arch": arch, "tokens": N_TOKENS, "batch": BATCH, "reference_loss": ref_loss,
                       "results": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--variants", default="eager,lemo:1.0")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    command = "python -m lemo_compile.testing.sp_check " + " ".join(argv if argv is not None else sys.argv[1:])
    mp.spawn(_rank, args=(a.ranks, free_port(), a.arch, a.variants.split(","), a.out, command), nprocs=a.ranks)


if __name__ == "__main__":
    main(sys.argv[1:])
