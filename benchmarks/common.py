"""Helpers shared by the GPU benchmarks: model builders, environment capture, subprocess variants."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from typing import Any, Callable

ARCHS = {
    # Llama-3.2-1B architecture (BENCHMARKS.md workloads)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=64, rope_theta=500000.0,
                     tie_word_embeddings=True),
    # Llama-3-8B architecture
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=128, rope_theta=500000.0,
                     tie_word_embeddings=False),
    # Qwen2-7B architecture (the second model family of BENCHMARKS.md; q/k/v projections carry a bias)
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                     tie_word_embeddings=False),
    # tiny sizes for CPU runs of the benchmark scripts (--tiny): every code path, no real numbers; 4 layers so
    # that lemo's default schedule (first half and last layer dense) leaves one sparse layer
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=500000.0,
                       tie_word_embeddings=False),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, rope_theta=1000000.0,
                       tie_word_embeddings=False),
}

# LoRA settings of BENCHMARKS.md: name -> (rank, target modules); alpha is twice the rank.
LORA_PRESETS = {
    "r8-qkvo": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),  # the paper's setting
    "r16-all": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),  # users'
}


def model_type(arch: str) -> str:
    """Hugging Face model type of an ARCHS entry ("llama" unless the entry says otherwise)."""
    return ARCHS[arch].get("model_type", "llama")


def build_model(arch: str, seq: int, lora_r: int, lora_targets: tuple[str, ...], dtype: str = "bfloat16",
                device: str = "cuda"):
    import torch
    from peft import LoraConfig, get_peft_model

    sizes = dict(ARCHS[arch])
    kind = sizes.pop("model_type", "llama")
    if kind == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    elif kind == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model
    else:
        raise ValueError(f"build_model: unsupported model_type {kind!r} for arch {arch!r}")
    cfg = Config(**sizes, max_position_embeddings=max(seq, 8192), attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(cfg).to(getattr(torch, dtype))
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                             target_modules=list(lora_targets)))
    model.train()
    return model


def apply_liger_fused_linear_ce(arch: str) -> str | None:
    """Patch the Hugging Face causal-LM forward of `arch`'s family with Liger's fused linear cross entropy
    only (no RoPE, RMSNorm, SwiGLU or plain CE kernels); call before build_model. Returns Liger's version.
    Raises ImportError when liger_kernel is not installed."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    liger = importlib.import_module("liger_kernel.transformers")
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type(arch)}")
    apply(rope=False, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=True)
    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    import torch
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        env["commit"] = out.stdout.strip() if out.returncode == 0 else None
    except OSError:
        env["commit"] = None
    return env


def run_variant_subprocess(script: str, variant: str, extra: list[str], timeout: int,
                           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one variant in a fresh interpreter (own allocator and compile caches); parse its RESULT line.
    `env`: variables added to this process's environment (e.g. CUDA_VISIBLE_DEVICES)."""
    cmd = [sys.executable, script, "--worker", variant, *extra]
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", **(env or {}))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        return {"variant": variant, "error": f"timeout after {timeout}s", "log_tail": (out[0] + out[1])[-3000:]}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stdout + p.stderr)[-3000:]
    return {"variant": variant, "error": f"exit {p.returncode}", "log_tail": tail}


def on_gpus(jobs: list, run: Callable[[Any, dict[str, str]], dict[str, Any]], gpus: str | None):
    """Yield run(job, env) for every job as it finishes: one after another (env {}), or with `gpus`
    ("0,1") one job per GPU of this host at a time (env {"CUDA_VISIBLE_DEVICES": g}; the result gets
    "gpu": g). `run` starts the job's subprocess itself, so each job still has its GPU to itself."""
    if not gpus:
        for job in jobs:
            yield run(job, {})
        return
    import concurrent.futures
    import queue

    free: queue.Queue = queue.Queue()
    for g in gpus.split(","):
        free.put(g.strip())

    def on_free_gpu(job) -> dict[str, Any]:
        g = free.get()
        try:
            return {**run(job, {"CUDA_VISIBLE_DEVICES": g}), "gpu": g}
        except Exception as e:  # one job's failure must not lose the others' results
            return {"variant": str(job[0] if isinstance(job, tuple) else job), "error": repr(e), "gpu": g}
        finally:
            free.put(g)

    with concurrent.futures.ThreadPoolExecutor(max_workers=free.qsize()) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(on_free_gpu, job) for job in jobs]):
            yield fut.result()


def merge_headline(path: str, figures: dict[str, dict[str, Any]]) -> None:
    data = {"figures": {}}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault("figures", {}).update(figures)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def save_json(path: str, doc: dict[str, Any]) -> None:
    """Write a result document as the benchmarks commit them (indent 1, a final newline)."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def publish_figures(doc: dict[str, Any], figs: dict[str, dict[str, Any]], missing: list[str], out: str | None,
                    headline: str | None, tiny: bool) -> None:
    """Store a run's headline figures in its result document (rewritten at `out`), print them, and
    merge them into `headline` -- except a --tiny run aimed at the project's own headline.json."""
    doc["figures"], doc["figures_missing"] = figs, missing
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
    if missing:
        print("figures not (all) written: " + "; ".join(missing), flush=True)
    if figs:
        print("headline figures: " + json.dumps({k: round(v["value"], 4) for k, v in figs.items()}), flush=True)
    project = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "headline.json")
    if headline and tiny and os.path.abspath(headline) == project:
        print("--tiny: figures not merged into the project's headline.json", flush=True)
    elif headline and figs:
        merge_headline(headline, figs)
        print(f"merged {len(figs)} figure(s) into {headline}", flush=True)


def plot_losses(curves: dict[str, list[float]], path: str, title: str, ylabel: str) -> bool:
    """One line per variant of its loss per step, as a PNG. False (and a message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), style in zip(curves.items(), ("-", "--", ":", "-.") * 4):
        ax.plot(range(1, len(losses) + 1), losses, style, label=name, linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
