"""TRL's SFTTrainer as users run it (issue 26): packing=True on real text, LoRA, gradient checkpointing,
bf16, the trainer's own loss (TRL's fused chunked LM head), timed inside `trainer.train()`.

Variants, each in a fresh subprocess (own allocator and compile caches):
    lemo    the model compiled with lemo's default config before the trainer is built (HF Trainer rejects
            unknown torch_compile_backend names)
    liger   SFTConfig(use_liger_kernel=True): Liger's RoPE / RMSNorm / SwiGLU kernels (TRL keeps its own
            fused LM head, so Liger's fused linear cross entropy is off)
    dense   plain SFTTrainer, no compile

The corpus: the Python standard library's own source files (`os.__file__`'s folder, sorted, every
machine has them), one document per file, tokens = bytes (+3, the ids 0-2 left for pad/eos/unk), files cut
at seq/2 tokens; document lengths are whatever the files are (tens to tens of thousands of tokens). TRL
packs them ("bfd": best-fit decreasing) into rows of `seq` tokens with `position_ids` restarting per
document and no attention_mask (padding-free), the loop TRL recommends for long context.

Per variant: first step (compile included), median of the timed steps (a TrainerCallback around each
optimizer step, synchronized), peak allocated memory over the timed steps, the loss of every step, and
for lemo which attention and loss path its compile record names.

Headline figures (GPU, 8B, 32K): trl_packed_step_ratio_vs_liger_8b_32k, trl_packed_peak_ratio_vs_liger_8b_32k
(lemo / liger in this loop).

GPU (no network there: carry the wheels of trl 1.16, datasets 4.7 and their missing dependencies --
pyarrow, pandas, dill, multiprocess, xxhash, fsspec, python-dateutil, six, tzdata -- and liger-kernel
in .whl/, about 57 MB):

    python3 -m pip install --no-deps --no-build-isolation -e . -q
    python3 -m pip install --no-deps --no-index .whl/*.whl -q
    python3 benchmarks/trl_loop.py --arch llama-8b --seq 32768 --out $OUT/trl_loop_8b_32k.json \\
        --headline $OUT/headline.json

CPU (every code path, tiny Llama, 256 tokens, lemo with inner="eager"; a minute or two):

    python benchmarks/trl_loop.py --tiny --variants lemo,dense --out /tmp/trl_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import LORA_PRESETS, build_model, environment, publish_figures, run_variant_subprocess  # noqa: E402
from benchmarks.peak_cut_bench import _memory_start, _sync  # noqa: E402

GB = 1e9
VARIANTS = ("lemo", "liger", "dense")
FIGURES = {"trl_packed_step_ratio_vs_liger_8b_32k": "median_step_s",
           "trl_packed_peak_ratio_vs_liger_8b_32k": "peak_allocated_gb"}


def corpus(seq: int, tokens: int) -> list[list[int]]:
    """Byte-token documents from the standard library's sources, sorted by path, until `tokens` are
    collected; each cut at seq/2 tokens."""
    root = os.path.dirname(os.__file__)
    docs, total = [], 0
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()[: seq // 2]
            if len(data) < 16:
                continue
            docs.append([b + 3 for b in data])
            total += len(docs[-1])
            if total >= tokens:
                return docs
    return docs


def _tokenizer():
    """A word-level tokenizer over the byte ids (TRL wants a processing class; the data is pre-tokenized)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(259)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                   pad_token="t0", eos_token="t1", unk_token="t2")


class StepTimer:
    """TrainerCallback timing every optimizer step (synchronized) and resetting the peak after warm-up."""

    def __init__(self, dev: str, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == warmup:
                    timer.base = _memory_start(dev)
                _sync(dev)
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync(dev)
                timer.times.append(time.perf_counter() - timer.t0)
                timer.progress()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        self.callback = _Callback()
        self.last_graph = -1  # the last lemo compile record progress() reported
        self.times: list[float] = []
        self.losses: list[float] = []
        self.base = None
        self.t0 = 0.0

    def progress(self) -> None:
        """One line per step on stderr (it survives a timeout in the log tail): the step's seconds and the
        Dynamo graphs lemo compiled during it, with Dynamo's reason for each recompile."""
        line = f"step {len(self.times)}: {self.times[-1]:.1f} s"
        lemo_compile = sys.modules.get("lemo_compile")  # loaded by the lemo variant only
        if lemo_compile is not None:
            new = [r for r in lemo_compile.records() if r.graph_id > self.last_graph]
            self.last_graph = max([self.last_graph] + [r.graph_id for r in new])
            line += f", {len(new)} graph(s) compiled" + "".join(
                f"; graph {r.graph_id}: {'sparse' if r.sparsified else 'dense'}"
                + (f", recompiled: {r.recompile_reason[:160]}" if r.recompile_reason else "") for r in new)
        print(line, file=sys.stderr, flush=True)


def worker(args) -> dict:
    import datasets
    import torch
    import trl

    dev = "cpu" if args.tiny else "cuda"
    variant = args.worker
    res: dict = {"variant": variant, "arch": args.arch, "seq": args.seq, "device": dev, "trl": trl.__version__,
                 "loop": "SFTTrainer packing=True (bfd, padding-free position_ids)"}
    steps = args.warmup + args.steps
    docs = corpus(args.seq, (steps + 2) * args.seq)
    res["documents"] = len(docs)
    res["document_tokens_median"] = statistics.median(len(d) for d in docs)
    r, targets = LORA_PRESETS[args.lora]
    model = build_model(args.arch, args.seq, r, targets, device=dev, dtype="float32" if args.tiny else "bfloat16")
    if variant == "lemo":
        import lemo_compile
        from lemo_compile.integrations import compile_for_training

        cfg = lemo_compile.LemoConfig(inner="eager") if args.tiny else lemo_compile.LemoConfig()
        res["lemo_config"] = json.loads(cfg.to_json())
        compile_for_training(model, cfg)
    kw = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-4,
              packing=True, max_length=args.seq, gradient_checkpointing=True,
              gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, report_to=[],
              save_strategy="no", disable_tqdm=True, dataset_num_proc=1, use_liger_kernel=variant == "liger",
              bf16=not args.tiny, use_cpu=args.tiny, seed=0)
    if args.pad_rows:  # every row exactly --seq tokens: BFD's short last bins would recompile once
        kw["pad_to_multiple_of"] = args.seq
        res["pad_to_multiple_of"] = args.seq
    timer = StepTimer(dev, args.warmup)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**kw), processing_class=_tokenizer(),
                             train_dataset=datasets.Dataset.from_dict({"input_ids": docs}), callbacks=[timer.callback])
    batch = next(iter(trainer.get_train_dataloader()))
    res["batch_keys"] = sorted(batch)
    res["documents_in_first_row"] = int((batch["position_ids"] == 0).sum()) if "position_ids" in batch else None
    t0 = time.perf_counter()
    trainer.train()
    res["train_s"] = time.perf_counter() - t0
    timed = timer.times[args.warmup:]
    res.update(first_step_s=timer.times[0], median_step_s=statistics.median(timed), step_times_s=timed,
               losses=timer.losses)
    res["compile_s"] = res["first_step_s"] - res["median_step_s"]
    if dev == "cuda":
        torch.cuda.synchronize()
        res["baseline_allocated_gb"] = None if timer.base is None else timer.base / GB
        res["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
        res["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
    if variant == "lemo":
        from benchmarks.finetune import lemo_records_summary

        res.update(lemo_records_summary())
    return res


def figures(doc: dict, src: str | None) -> tuple[dict, list[str]]:
    rows = {r["variant"]: r for r in doc["results"]}
    lemo, liger = rows.get("lemo"), rows.get("liger")
    if doc["config"]["tiny"] or doc["config"]["arch"] != "llama-8b" or doc["config"]["seq"] != 32768:
        return {}, [f"{k}: only from llama-8b at 32768 tokens on the GPU" for k in FIGURES]
    figs, missing = {}, []
    for name, key in FIGURES.items():
        if not lemo or not liger or lemo.get(key) is None or liger.get(key) is None:
            missing.append(f"{name}: lemo and liger not both measured")
            continue
        figs[name] = {"value": lemo[key] / liger[key], "source": src, "command": doc["command"],
                      "when": doc["env"]["when"][:10], "variant": "lemo", "baseline": "liger", "measure": key,
                      "arch": "llama-8b", "lora": doc["config"]["lora"], "seq": 32768, "lemo": lemo[key],
                      "baseline_value": liger[key], "loop": lemo["loop"], "attention_path": lemo.get("attention_path"),
                      "loss_path": lemo.get("loss_path")}
    return figs, missing


def table(results: list[dict]) -> str:
    lines = ["| variant | first step s | median step s | peak GB | last loss | note |", "|---|---|---|---|---|---|"]
    for r in results:
        f = lambda k, fmt="{:.3f}": "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        last = r["losses"][-1] if r.get("losses") else None
        note = r.get("error") or r.get("attention_path") or ""
        lines.append(f"| {r['variant']} | {f('first_step_s', '{:.1f}')} | {f('median_step_s')} | "
                     f"{f('peak_allocated_gb', '{:.2f}')} | {'-' if last is None else f'{last:.4f}'} | {note[:80]} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=None, help="llama-8b (default), llama-1b; tiny: tiny-llama")
    ap.add_argument("--lora", default="r8-qkvo", choices=sorted(LORA_PRESETS))
    ap.add_argument("--seq", type=int, default=None, help="row length (default 32768; tiny: 256)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    ap.add_argument("--pad-rows", action="store_true", help="SFTConfig(pad_to_multiple_of=--seq): every packed "
                    "row the same length, so no shorter row triggers a (dynamic) recompile")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: every code path, no real numbers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.arch = args.arch or ("tiny-llama" if args.tiny else "llama-8b")
    args.seq = args.seq or (256 if args.tiny else 32768)
    if args.worker:
        try:
            res = worker(args)
        except Exception as e:  # one failing variant must not lose the others
            import traceback
            res = {"variant": args.worker, "error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": traceback.format_exc()[-3000:]}
        print("RESULT " + json.dumps(res), flush=True)
        return
    extra = ["--arch", args.arch, "--lora", args.lora, "--seq", str(args.seq), "--steps", str(args.steps),
             "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else []) + (["--pad-rows"] if args.pad_rows else [])
    results = []
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; expected some of {VARIANTS}")
        t0 = time.perf_counter()
        results.append(run_variant_subprocess(os.path.abspath(__file__), v, extra, args.timeout))
        results[-1]["wall_s"] = time.perf_counter() - t0
        print(f"{v}: {json.dumps({k: results[-1].get(k) for k in ('median_step_s', 'peak_allocated_gb', 'error')})}",
              flush=True)
    doc = {"benchmark": "trl_loop", "command": "python " + " ".join(sys.argv), "env": environment(),
           "config": {"arch": args.arch, "lora": args.lora, "seq": args.seq, "steps": args.steps,
                      "warmup": args.warmup, "tiny": args.tiny, "pad_rows": args.pad_rows}, "results": results, "table": table(results)}
    figs, missing = figures(doc, args.out and os.path.join("benchmarks/results", os.path.basename(args.out)))
    print(doc["table"], flush=True)
    publish_figures(doc, figs, missing, args.out, args.headline, args.tiny)


if __name__ == "__main__":
    main()
