"""Architecture sweep (issue 31): every causal LM the installed transformers registers, through lemo.

Builds each model_type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES tiny and random (lemo_compile.testing.sweep),
runs it eagerly and compiled by lemo (keep_ratio 1.0: must equal dense; 0.5: what lemo rewrites) on CPU,
and writes one row per model and five figures:

    arch_sweep_total            model types tried
    arch_sweep_sparse_fraction  share with >= 1 sparse layer at keep_ratio 0.5 (default dense_layers)
    arch_sweep_silent_wrong     compiled != dense at keep 1.0 with no skip reason on record   (target 0)
    arch_sweep_inexact_keep1    compiled != dense at keep 1.0, skip reason or not             (target 0)
    arch_sweep_crashes          crashes with lemo's rewrites on only                           (target 0)

About 7 s per model on 2 cores (196 types, transformers 5.24: 1415 s):

    python benchmarks/arch_sweep.py --out /tmp/arch_sweep.json --table /tmp/arch_sweep.md \\
        --headline /tmp/headline.json
    python benchmarks/arch_sweep.py --only llama,gpt2 --table /dev/stdout
    python benchmarks/arch_sweep.py --update old.json --only cohere,phi --out new.json   # re-run some rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import save_json  # noqa: E402

from lemo_compile.testing import sweep  # noqa: E402


def _progress(row: dict) -> None:
    flag = "ERROR" if row["error"] else f"{row['layers_sparse']}/{row['layers_found']} sparse"
    print(f"{row['model_type']:28s} {flag:12s} exact@1={row['exact_at_keep1']}  {sweep.reason(row)[:110]}",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write every row and the figures here (JSON)")
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--headline", help="merge the figures into this headline.json")
    p.add_argument("--limit", type=int, help="only the first N model types (alphabetical)")
    p.add_argument("--only", type=lambda s: s.split(","), help="comma-separated model types")
    p.add_argument("--timeout", type=float, default=sweep.TIMEOUT_S, help="seconds per model")
    p.add_argument("--update", metavar="JSON", help="an earlier --out of this script: re-run only the --only "
                   "model types and replace their rows (the result records both commands)")
    args = p.parse_args(argv)
    if args.update and not args.only:
        p.error("--update re-runs the model types given by --only")

    types = args.only or sorted(sweep.causal_lm_classes())
    types = types[:args.limit] if args.limit else types
    t0 = time.time()
    rows = sweep.sweep(types, timeout=args.timeout, log=_progress)
    command = "python benchmarks/arch_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    seconds = round(time.time() - t0)
    if args.update:
        with open(args.update) as f:
            before = json.load(f)
        fresh = {r["model_type"]: r for r in rows}
        rows = [fresh.pop(r["model_type"], r) for r in before["rows"]] + list(fresh.values())
        command = f"{before['command']}; then {command}"
        seconds += before["seconds"]
    figs = sweep.figures(rows, command=command, source=args.out or "")
    doc = {"command": command, "seconds": seconds, "environment": _environment(), "figures": figs,
           "rows": rows}
    if args.update:
        doc["updated_rows"] = types
    print(json.dumps({k: v["value"] for k, v in figs.items()}))
    if args.out:
        save_json(args.out, doc)
    if args.table:
        with open(args.table, "w") as f:
            f.write(sweep.markdown_table(rows))
    if args.headline:
        from benchmarks.common import merge_headline

        merge_headline(args.headline, figs)
    return 0 if figs["arch_sweep_silent_wrong"]["value"] == 0 and figs["arch_sweep_crashes"]["value"] == 0 else 1


def _environment() -> dict:
    from benchmarks.common import environment

    return environment()


if __name__ == "__main__":
    sys.exit(main())
