"""Architecture sweep: every causal LM the installed transformers registers, tiny and random, through lemo.

For each `model_type` of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES it builds a 4-layer fp32 model (hidden 64,
4 query heads, 2 KV heads of dim 16, MLP 128, vocab 256, SDPA, no cache) and runs one forward and backward
on a random batch (1 x 200 tokens, labels = ids): eagerly; compiled by lemo at keep_ratio=1.0, which must
give the dense loss and gradients; at keep_ratio=0.5, whose compile records say what lemo found and
rewrote; and, where a layer became sparse, at keep_ratio=0.5 with the random predictor against
lemo_compile.reference with the same keep sets. One row per model says so, or why not; nothing is assumed about any architecture.

Models run in a worker subprocess (`python -m lemo_compile.testing.sweep --worker a,b,...`) that prints one
JSON row per model; a model that hangs past its timeout or kills the worker is recorded as such, and a
fresh worker takes the remaining models.

    rows = sweep(["llama", "gpt2"])
    print(markdown_table(rows)); print(figures(rows))
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable

SEQ = 200  # tokens of the batch: four 64-token blocks, the last one partial
LAYERS = 4  # lemo's default schedule (first half and last layer dense) leaves layer 2 sparse
KEEP1_LOSS_RTOL = 1e-5  # keep_ratio=1.0 keeps every token: the loss must be the dense one ...
KEEP1_GRAD_RTOL = 1e-4  # ... and every gradient, relative to its own largest entry
GRAD_FLOOR = 1e-3  # ... or to this fraction of the model's largest gradient, when that is more
TIMEOUT_S = 240  # per model, build and three runs
MAX_PARAMS = 20_000_000  # a tiny model has ~0.1-2M; more means a size the sweep could not shrink
ROW_PREFIX = "SWEEP_ROW "

# Tiny sizes under every name configs use for them; a config gets only the names it has.
# The comments give Llama-3.1-8B's sizes.
TINY_SIZES: dict[str, Any] = dict(
    num_hidden_layers=LAYERS,  # 32
    hidden_size=64,  # 4096
    intermediate_size=128,  # 14336
    num_attention_heads=4,  # 32
    num_key_value_heads=2,  # 8
    head_dim=16,  # 128
    rotary_dim=8,  # (GPT-J, CodeGen: rotary on part of each head)
    vocab_size=256,  # 128256
    max_position_embeddings=1024,  # 131072
    # encoder-decoder families registered as causal LMs (BART, Marian, ...) size their decoder apart
    decoder_layers=LAYERS, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=LAYERS,
    encoder_attention_heads=4, encoder_ffn_dim=128,
    # mixture-of-experts and multi-head-latent-attention models: few, small experts and ranks
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
    # per-layer input embeddings (Gemma 3n / Gemma 4): a second, per-layer vocabulary table
    vocab_size_per_layer_input=256, hidden_size_per_layer_input=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    is_decoder=True,  # encoder families (BERT, RoBERTa) registered as causal LMs: causal attention
    use_cache=False,
    initializer_range=0.1,  # 0.02: larger so that tiny attention is not uniform
)


# Defaults some configs ship that cannot build a model at all (a field left None that the modelling code
# multiplies or indexes, a layer pattern fixed at the full depth); a real checkpoint's config sets them.
# A dict value for a sub-config name is merged into that sub-config.
CONFIG_FIXES: dict[str, dict[str, Any]] = {
    "dots1": dict(n_shared_experts=1),
    "lfm2_moe": dict(layer_types=["conv", "conv", "full_attention", "conv"]),
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]]),
    # DBRX names its sizes d_model / n_heads / n_layers, its experts' in ffn_config, its KV heads in
    # attn_config (whose rope_theta the modelling reads; clip_qkv=None fails in its clamp, DBRX ships 8)
    "dbrx": dict(d_model=64, n_heads=4, n_layers=LAYERS, max_seq_len=1024,
                 attn_config=dict(rope_theta=10000.0, kv_n_heads=2, clip_qkv=8.0),
                 ffn_config=dict(hidden_size=64, ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
}


class Unsupported(Exception):
    """The sweep cannot build or run this model without lemo (its own limits, not lemo's)."""


# -------------------------------------------------------------------------------------------------
# building
# -------------------------------------------------------------------------------------------------


def causal_lm_classes() -> dict[str, str]:
    """model_type -> class name of every causal LM the installed transformers registers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {k: v if isinstance(v, str) else v[0] for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}


SPARSE_SLOT = 2  # the layer the default schedule makes sparse in a LAYERS-layer model


def _softmax_attention(layer_type: Any) -> bool:
    return isinstance(layer_type, str) and "attention" in layer_type and not layer_type.startswith("linear")


def _sized(default: Any, **extra: Any) -> Any:
    """A config of default's class with the tiny sizes it has names for (derived fields, e.g. layer_types,
    recomputed by its own __init__), layer_types cut to the layer count when the default fixes them.

    Hybrid models (linear attention or state-space layers between softmax-attention ones, Qwen3.5: every
    fourth layer) keep their layer kinds, but a softmax-attention layer is moved into SPARSE_SLOT when the
    first LAYERS layers have one elsewhere: in the full-depth model such layers fall inside the default
    schedule's sparse range, in the tiny one the pattern would put them only in dense slots."""
    kwargs = {**{k: v for k, v in TINY_SIZES.items() if _settable(default, k)}, **extra}
    if hasattr(default, "qk_rope_head_dim"):  # multi-head latent attention: rotary over qk_rope_head_dim,
        kwargs.update({k: kwargs[v] for k, v in (("head_dim", "qk_rope_head_dim"),  # no grouped KV heads
                                                 ("num_key_value_heads", "num_attention_heads")) if k in kwargs})
    cfg = type(default)(**kwargs)
    types = getattr(cfg, "layer_types", None)
    if not isinstance(types, (list, tuple)):
        return cfg
    want = list(types)[:LAYERS]
    attention = [i for i, t in enumerate(want) if _softmax_attention(t)]
    if len(want) > SPARSE_SLOT and attention and SPARSE_SLOT not in attention:
        j = attention[0]
        want[SPARSE_SLOT], want[j] = want[j], want[SPARSE_SLOT]
    if want != list(types):
        cfg = type(default)(**kwargs, layer_types=want)
    return cfg


def _settable(config: Any, name: str) -> bool:
    """Whether the config has `name` as a plain field: not a read-only property (Falcon's head_dim), and
    not a per-layer attribute that refuses a global read (Gemma 4's head_dim)."""
    prop = getattr(type(config), name, None)
    if isinstance(prop, property) and prop.fset is None:
        return False
    try:
        return hasattr(config, name)
    except Exception:
        return False


def tiny_config(model_type: str, class_name: str) -> Any:
    """The tiny config `class_name` is built from: the text config of a multimodal family whose causal LM
    takes one, else the model type's own with every sub-config (text, vision and audio towers) given the
    tiny sizes too; the model then runs on text alone. Unsupported (in build_model) where the towers stay
    large under names the sweep does not set."""
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise Unsupported(f"transformers exports no class {class_name}")
    default = transformers.AutoConfig.for_model(model_type)
    want = getattr(cls, "config_class", None) or type(default)
    text = default.get_text_config() if hasattr(default, "get_text_config") else default
    if text is not default and isinstance(text, want):
        return _sized(text)
    # a model type whose own config feeds another family's class (EXAONE, InternLM3: the Llama code) is
    # built as transformers builds it, from its own config
    subs = {k: getattr(default, k, None) for k in (getattr(default, "sub_configs", None) or {})}
    sized = {k: _sized(sub).to_dict() for k, sub in subs.items() if sub is not None and hasattr(sub, "to_dict")}
    if text is not default and "text_config" not in sized:
        sized["text_config"] = _sized(text).to_dict()
    for k, v in CONFIG_FIXES.get(model_type, {}).items():
        sized[k] = {**sized[k], **v} if isinstance(v, dict) and k in sized else v
    return _sized(default, **sized)


def build_model(model_type: str, class_name: str, seed: int = 0) -> Any:
    """The tiny random model in fp32, eval mode (no dropout), SDPA attention."""
    import torch
    import transformers

    cfg = tiny_config(model_type, class_name)
    cfg._attn_implementation = "sdpa"
    params = _meta_params(getattr(transformers, class_name), cfg)
    if params > MAX_PARAMS:
        raise Unsupported(f"the tiny config still makes {params / 1e6:.0f}M parameters (sizes under names "
                          f"the sweep does not set)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = getattr(transformers, class_name)(cfg)
        except ValueError as e:
            if "sdpa" not in str(e).lower() and "attn_implementation" not in str(e):
                raise
            cfg._attn_implementation = "eager"  # no SDPA in this architecture: lemo must say so
            model = getattr(transformers, class_name)(cfg)
    return model.to(torch.float32).eval()


def _meta_params(cls: type, cfg: Any) -> int:
    """Parameters of cls(cfg), counted on the meta device (nothing allocated); 0 when that fails."""
    import torch

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in cls(cfg).parameters())
    except Exception:  # building for real says why
        return 0


def random_batch(vocab: int, n: int = SEQ, seed: int = 0) -> dict[str, Any]:
    import torch

    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


# -------------------------------------------------------------------------------------------------
# running
# -------------------------------------------------------------------------------------------------


def loss_and_grads(model: Any, run: Any, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Loss of run(**batch) and a copy of every parameter gradient of `model` it leaves."""
    model.zero_grad(set_to_none=True)
    loss = run(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def compiled_run(model: Any, batch: dict[str, Any], **options: Any) -> tuple[float, dict[str, Any], list]:
    """loss_and_grads through lemo (eager inner compiler) with `options`, and its compile records."""
    import torch

    import lemo_compile
    from lemo_compile import LemoConfig
    from lemo_compile.backend import clear_records

    torch._dynamo.reset()
    clear_records()
    backend = lemo_compile.backend(LemoConfig(inner="eager", **options))
    loss, grads = loss_and_grads(model, torch.compile(model, backend=backend), batch)
    return loss, grads, lemo_compile.records()


def matches_dense(dense: tuple[float, dict], got: tuple[float, dict]) -> bool:
    """Same loss within KEEP1_LOSS_RTOL and every gradient within KEEP1_GRAD_RTOL of its largest entry,
    or of GRAD_FLOOR times the model's largest gradient when that is more: a gradient that is zero in
    exact arithmetic (a key bias: softmax ignores a shift of every score) holds only rounding noise."""
    (l0, g0), (l1, g1) = dense, got
    if not abs(l1 - l0) <= KEEP1_LOSS_RTOL * max(abs(l0), 1e-12) or g0.keys() != g1.keys():
        return False
    floor = GRAD_FLOOR * max((g.abs().max().item() for g in g0.values()), default=0.0)
    for name, ref in g0.items():
        scale = max(ref.abs().max().item(), floor, 1e-12)
        if not (g1[name] - ref).abs().max().item() <= KEEP1_GRAD_RTOL * scale:
            return False
    return True


def skip_reasons(recs: list) -> list[str]:
    """Every skip and left-alone reason of the records, in order, without repeats."""
    out: list[str] = []
    for r in recs:
        for res in (r.detect, r.sparsify, r.peak_cut):
            out += [str(s) for s in (res.skips if res else [])]
        if r.left_alone:
            out.append(r.left_alone)
    return list(dict.fromkeys(out))


def structure(recs: list) -> dict[str, Any]:
    """What lemo found and did across one compile's records."""
    return {
        "layers_found": sum(len(r.detect.layers) for r in recs if r.detect),
        "layers_sparse": sum(len(r.sparsify.layers) for r in recs if r.sparsify),
        "loss_segmented": any(bool(r.peak_cut and r.peak_cut.losses) for r in recs),
        "graphs": len(recs),
        "reasons": [_short(s) for s in skip_reasons(recs)[:2]],
    }


def describe_error(e: BaseException) -> str:
    """'Type: first line' of the exception Dynamo wrapped (its backend's, when it wraps one)."""
    inner = getattr(e, "inner_exception", None)
    while inner is not None and inner is not e:
        e, inner = inner, getattr(inner, "inner_exception", None)
    lines = [s for s in str(e).splitlines() if s.strip()]
    return _short(f"{type(e).__name__}: {lines[0] if lines else ''}")


def _short(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _empty_row(model_type: str, class_name: str) -> dict[str, Any]:
    return {"model_type": model_type, "class": class_name, "layers_found": 0, "layers_sparse": 0,
            "loss_segmented": False, "reasons": [], "exact_at_keep1": None, "keep1_reasons": [],
            "exact_at_keep05": None, "keep05_note": None, "error": None, "error_kind": None}


def run_model(model_type: str, class_name: str, seed: int = 0) -> dict[str, Any]:
    """One sweep row: build, eager, lemo at keep 1.0 (must be dense) and at keep 0.5 (structure)."""
    row = _empty_row(model_type, class_name)
    try:
        model = build_model(model_type, class_name, seed)
        row["attn_implementation"] = model.config._attn_implementation
        batch = random_batch(model.config.get_text_config().vocab_size, seed=seed)
        dense = loss_and_grads(model, model, batch)
        if dense[0] != dense[0] or abs(dense[0]) == float("inf"):
            raise Unsupported(f"eager loss is {dense[0]}")
        row["eager_deterministic"] = matches_dense(dense, loss_and_grads(model, model, batch))
    except Exception as e:
        return {**row, "error": f"unsupported by this sweep: {describe_error(e)}", "error_kind": "unsupported"}
    try:
        *keep1, recs1 = compiled_run(model, batch, keep_ratio=1.0)
        row["exact_at_keep1"] = matches_dense(dense, tuple(keep1))
        row["keep1_reasons"] = [_short(s) for s in skip_reasons(recs1)[:2]]
        row.update(structure(compiled_run(model, batch, keep_ratio=0.5)[2]))
        if row["layers_sparse"]:
            row.update(_against_reference(model, batch))
    except Exception as e:
        return {**row, **_blame(model, batch, e)}
    return row


def _against_reference(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """lemo at keep_ratio 0.5 (random predictor) against lemo_compile.reference with the same keep sets:
    keep 1.0 cannot catch a rewrite that mixes the kept rows with the dropped ones, this can. None (and a
    note) where the reference cannot express the model or lemo left a sparse layer of the schedule dense."""
    from lemo_compile import LemoConfig
    from lemo_compile.reference import reference_forward

    options = dict(keep_ratio=0.5, predictor="random")
    *got, recs = compiled_run(model, batch, **options)
    cfg = LemoConfig(**options)
    want_layers = [i for i in range(LAYERS) if cfg.keep_fraction(i, LAYERS) is not None]
    got_layers = sorted(d["layer"] for r in recs if r.sparsify for d in r.sparsify.layers)
    if got_layers != want_layers:
        return {"exact_at_keep05": None,
                "keep05_note": f"sparse layers {got_layers}, the schedule's {want_layers}: not compared"}
    try:
        want = loss_and_grads(model, lambda **b: reference_forward(model, cfg, **b).output, batch)
    except Exception as e:  # the reference's hooks need the Llama-like module names
        return {"exact_at_keep05": None, "keep05_note": f"reference cannot run it: {describe_error(e)}"}
    return {"exact_at_keep05": matches_dense(want, tuple(got)), "keep05_note": None}


def _blame(model: Any, batch: dict[str, Any], e: BaseException) -> dict[str, Any]:
    """A compiled run failed: a lemo crash, unless it fails the same with lemo's rewrites turned off
    (then torch.compile or AOT autograd cannot run this model, whatever lemo does)."""
    try:
        compiled_run(model, batch, enabled=False)
    except Exception as control:
        return {"error": f"unsupported by this sweep: torch.compile fails with lemo's rewrites off too: "
                         f"{describe_error(control)}", "error_kind": "unsupported"}
    return {"error": f"lemo crash: {describe_error(e)}", "error_kind": "lemo_crash"}


# -------------------------------------------------------------------------------------------------
# workers
# -------------------------------------------------------------------------------------------------


def _worker(model_types: list[str]) -> None:
    """Subprocess body: one ROW_PREFIX line of JSON per model, flushed as each finishes."""
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    classes = causal_lm_classes()
    for mt in model_types:
        row = run_model(mt, classes[mt])
        print(ROW_PREFIX + json.dumps(row), flush=True)


def _run_chunk(todo: list[str], classes: dict[str, str], timeout: float, rows: list, log: Any) -> list[str]:
    """Run models of `todo` in one worker until it finishes, hangs or dies; the models it did not reach."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "lemo_compile.testing.sweep", "--worker", ",".join(todo)],
                             stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        left, deadline = list(todo), time.monotonic() + timeout
        while left:
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = p.stdout.readline() if ready else None
            if line:
                if line.startswith(ROW_PREFIX):
                    rows.append(json.loads(line[len(ROW_PREFIX):]))
                    left.pop(0)
                    deadline = time.monotonic() + timeout
                    if log:
                        log(rows[-1])
                continue
            p.kill()
            p.wait()
            err.seek(0)
            tail = _short(err.read()[-300:], 120)
            why = f"timeout after {timeout:.0f}s" if line is None else f"worker exited {p.returncode}: {tail}"
            rows.append({**_empty_row(left[0], classes[left[0]]), "error": f"no result: {why}",
                         "error_kind": "no_result"})  # hung or died: in lemo or not, unknown
            if log:
                log(rows[-1])
            return left[1:]
        p.wait()
    return []


def sweep(model_types: Iterable[str] | None = None, timeout: float = TIMEOUT_S, log: Any = None) -> list[dict]:
    """Rows of every registered causal LM (or of `model_types`), run in worker subprocesses."""
    classes = causal_lm_classes()
    todo = list(model_types) if model_types is not None else sorted(classes)
    unknown = [m for m in todo if m not in classes]
    if unknown:
        raise ValueError(f"not causal LM model types of this transformers: {unknown}")
    rows: list[dict] = []
    while todo:
        todo = _run_chunk(todo, classes, timeout, rows, log)
    return rows


# -------------------------------------------------------------------------------------------------
# reporting
# -------------------------------------------------------------------------------------------------


def reason(row: dict[str, Any]) -> str:
    """Why a row has no sparse layer (or its error); '' for a row with one."""
    if row["error"]:
        return row["error"]
    if row["layers_sparse"]:
        return ""
    return "; ".join(row["reasons"])


def silent_wrong(row: dict[str, Any]) -> bool:
    """Compiled at keep 1.0 differs from dense, and the keep-1.0 records give no skip reason (a model
    whose eager runs differ from each other, e.g. random attention blocks, cannot be judged); or compiled
    at keep 0.5 differs from the reference."""
    return inexact(row) and not row["keep1_reasons"] or inexact_sparse(row)


def inexact_sparse(row: dict[str, Any]) -> bool:
    """Compiled at keep 0.5 differs from lemo_compile.reference with the same keep sets."""
    return row.get("exact_at_keep05") is False and row.get("eager_deterministic", True)


def inexact(row: dict[str, Any]) -> bool:
    """Compiled at keep 1.0 differs from dense, whatever the records say (eager itself deterministic):
    lemo skipping a layer explains a dense layer, not different numbers."""
    return row["exact_at_keep1"] is False and row.get("eager_deterministic", True)


def figures(rows: list[dict], command: str = "", source: str = "") -> dict[str, dict[str, Any]]:
    """Headline figures of a sweep, in the format of benchmarks.common.merge_headline."""
    import datetime

    when = datetime.date.today().isoformat()
    n = len(rows)
    values = {
        "arch_sweep_total": (n, None, "causal-LM model types tried (tiny, random, CPU, fp32)"),
        "arch_sweep_sparse_fraction": (sum(r["layers_sparse"] > 0 for r in rows) / n if n else 0.0, None,
                                       "share with >= 1 sparse layer at keep_ratio 0.5, default dense_layers"),
        "arch_sweep_silent_wrong": (sum(silent_wrong(r) for r in rows), "0",
                                    "compiled != dense at keep_ratio 1.0 with no skip reason on record"),
        "arch_sweep_inexact_keep1": (sum(inexact(r) for r in rows), "0",
                                     "compiled != dense at keep_ratio 1.0, skip reason on record or not"),
        "arch_sweep_inexact_keep05": (sum(inexact_sparse(r) for r in rows), "0",
                                      "compiled at keep_ratio 0.5 != lemo_compile.reference with the same keep sets"),
        "arch_sweep_reference_checked": (sum(r.get("exact_at_keep05") is not None for r in rows), None,
                                         "sparse models compared with the reference at keep_ratio 0.5"),
        "arch_sweep_crashes": (sum(r["error_kind"] == "lemo_crash" for r in rows), "0",
                               "models that run eagerly and with lemo's rewrites off, but crash with them on"),
    }
    return {k: {"value": v, "target": t, "source": source, "command": command, "when": when, "note": note}
            for k, (v, t, note) in values.items()}


def markdown_table(rows: list[dict]) -> str:
    """model_type | class | layers found | sparse | loss segmented | exact at keep 1.0 | reason."""
    def cell(v: Any) -> str:
        return {True: "yes", False: "no", None: "-"}.get(v, str(v)) if isinstance(v, (bool, type(None))) \
            else str(v).replace("|", "\\|")

    out = ["| model_type | class | layers found | sparse | loss segmented | exact at keep 1.0 "
           "| = reference at keep 0.5 | reason |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(cell(v) for v in (
            r["model_type"], r["class"], r["layers_found"], r["layers_sparse"], r["loss_segmented"],
            _exact(r), r.get("exact_at_keep05"), reason(r) or r.get("keep05_note") or "")) + " |")
    return "\n".join(out) + "\n"


def _exact(row: dict[str, Any]) -> Any:
    if row["exact_at_keep1"] is False and not row.get("eager_deterministic", True):
        return "no (eager varies too)"
    return row["exact_at_keep1"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2].split(","))
    else:
        sys.exit("usage: python -m lemo_compile.testing.sweep --worker type[,type...] (see benchmarks/arch_sweep.py)")
