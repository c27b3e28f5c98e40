"""The padding matrix (issue 26, docs/design.md §2.1): every padded-batch case, counted.

Runs lemo_compile.testing.padding.run_case over architectures x padding kinds (left, right past
Gemma3's sliding window, a fully padded row between two padded ones, packed documents with a
one-token one) x attention/MLP modes x keep
ratios (0.5 against the reference, 1.0 against the dense model) x inner compilers, on CPU in fp32
(tiny models, batch 3, 200 tokens), and writes every case and two counts:

    padded_nan_cases     cases that gave a non-finite loss or gradient (or raised)   (target 0)
    padded_cases_tried   cases run
    padded_mismatch_cases  finite cases that did not match their oracle (loss 1e-5, gradients 2e-4)

Inductor compiles a tiny model in ~40 s on 2 cores, so by default it runs the default modes only
(--inductor-modes all for every mode). The whole default matrix takes ~60 minutes on 2 cores:

    python benchmarks/padding_matrix.py --out benchmarks/results/padding_matrix_cpu.json \
        --headline benchmarks/results/headline.json
    python benchmarks/padding_matrix.py --tiny      # 4 cases, seconds: what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import save_json  # noqa: E402

from lemo_compile.testing.models import ARCHS  # noqa: E402
from lemo_compile.testing.padding import KINDS, PAD_KINDS, packed_docs, run_case  # noqa: E402

ATTN_MODES = ("backward", "tokens", "keys")
MLP_MODES = ("backward", "tokens", "dense")
DEFAULT = ("backward", "backward")


def cases(args) -> list[tuple]:
    if args.tiny:
        return [("llama", "left", *DEFAULT, "eager", 0.5), ("gemma3", "right", *DEFAULT, "eager", 1.0),
                ("qwen2", "empty_row", "tokens", "backward", "eager", 0.5),
                ("phi3", "left", "keys", "dense", "eager", 0.5)]
    out = []
    for arch, kind, keep in itertools.product(args.archs, KINDS, (0.5, 1.0)):
        for attn, mlp in itertools.product(ATTN_MODES, MLP_MODES):
            out.append((arch, kind, attn, mlp, "eager", keep))
            if "inductor" in args.inner and (args.inductor_modes == "all" or (attn, mlp) == DEFAULT):
                out.append((arch, kind, attn, mlp, "inductor", keep))
    return [c for c in out if c[4] in args.inner]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS), type=lambda s: s.split(","))
    p.add_argument("--inner", default="eager,inductor", type=lambda s: s.split(","))
    p.add_argument("--inductor-modes", choices=("default", "all"), default="default")
    p.add_argument("--tiny", action="store_true", help="4 eager cases (CI)")
    p.add_argument("--out", help="write every case here (JSON)")
    p.add_argument("--headline", help="merge padded_nan_cases into this headline.json (not with --tiny)")
    args = p.parse_args(argv)

    todo = cases(args)
    rows = []
    t0 = time.time()
    for i, c in enumerate(todo, 1):
        t = time.time()
        case = run_case(*c)
        rows.append({**dataclasses.asdict(case), "matches": case.matches, "seconds": round(time.time() - t, 1)})
        flag = "ok" if case.matches else "NON-FINITE" if not case.finite else "MISMATCH"
        print(f"[{i}/{len(todo)}] {flag:10s} {' '.join(map(str, c))}  loss_err {case.loss_err:.1e} "
              f"grad_err {case.grad_err:.1e} {case.error}", flush=True)
    nan_cases = sum(not r["finite"] for r in rows)
    mismatch = sum(r["finite"] and not r["matches"] for r in rows)
    command = "python benchmarks/padding_matrix.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = {"command": command, "when": datetime.date.today().isoformat(), "seconds": round(time.time() - t0),
           "device": "cpu", "dtype": "float32", "batch": "3 x 200 tokens (packed: 2 x 200)", "padding": PAD_KINDS,
           "packed_documents": packed_docs(),
           "padded_nan_cases": nan_cases, "padded_cases_tried": len(rows), "padded_mismatch_cases": mismatch,
           "cases": rows}
    print(f"padded_nan_cases {nan_cases} of {len(rows)} cases tried; {mismatch} finite cases off their oracle")
    if args.out:
        save_json(args.out, doc)
    if args.headline and not args.tiny:
        from benchmarks.common import merge_headline

        when = doc["when"]
        src = args.out or ""
        merge_headline(args.headline, {
            "padded_nan_cases": {"value": nan_cases, "target": "0", "source": src, "command": command, "when": when,
                                 "note": f"of {len(rows)} padded-batch cases tried (CPU, fp32); "
                                         f"{mismatch} finite cases off their oracle"},
            "padded_cases_tried": {"value": len(rows), "source": src, "command": command, "when": when}})
    return 0 if nan_cases == 0 and mismatch == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
