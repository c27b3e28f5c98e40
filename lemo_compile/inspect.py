"""Inspection: what lemo found and did, per compiled graph (`explain()` and `lemo explain`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import _compat


def format_record(rec: Any, graphs: bool = False) -> str:
    lines = [f"graph {rec.graph_id}: inner={rec.config.inner.value} attn_mode={rec.config.attn_mode.value} "
             f"mlp_mode={rec.config.mlp_mode.value} keep_ratio={rec.config.keep_ratio} predictor={rec.config.predictor}"]
    if getattr(rec, "recompile_reason", None):
        lines.append(f"  recompiled: {rec.recompile_reason}")
    if getattr(rec, "metadata_skipped", None):
        lines.append(f"  fake values of inserted nodes not filled (AOT autograd's cache bypassed): {rec.metadata_skipped}")
    det = rec.detect
    if det is not None:
        s = det.summary()
        lines.append(f"  found: {s['layers']} decoder layers, {s['attn']} attention blocks, {s['mlp']} MLP blocks, "
                     f"{s['lora']} LoRA branches, {s['skips']} skipped")
        sparse = {d["name"]: d for d in (rec.sparsify.layers if rec.sparsify else [])}
        for layer in det.layers:
            d = sparse.get(layer.name)
            what = (f"sparse keep={d['keep']:.3g} kept_tokens={d['kept_tokens']} attn={d['attn_mode']} "
                    f"mlp={d['mlp_mode']}") if d else "dense"
            if d and d.get("mlp_whole"):
                what += " (MLP runs whole: its rows cannot be followed)"
            if d and d.get("checkpoint_saves"):
                what += f" checkpointed: saves {d['checkpoint_saves']}"
            lines.append(f"  {layer.name:<12} {what}")
            lines.append(f"      {layer.attn.describe()}")
            lines.append(f"      {layer.mlp.describe()}")
        for s in det.skips + (rec.sparsify.skips if rec.sparsify else []):
            lines.append(f"  skipped {s}")
    if any(getattr(rec, name, None) is not None for name in ("masks", "causal", "eager_attention")):
        lines.append(f"  attention: {rec.attention_path}")
    if det is not None and det.layers:
        lines.append(f"  loss: {rec.loss_path}")
    pc = getattr(rec, "peak_cut", None)
    if pc is not None:
        for d in pc.losses:
            lines.append(f"  loss segmented: {d['rows']} rows x vocab {d['vocab']} in segments of {d['segment_rows']} rows, "
                         f"logits {d['logits']}")
        for s in pc.skips:
            lines.append(f"  loss left alone {s}")
    ms = getattr(rec, "mlp_segment", None)
    if ms is not None:
        if ms.mlps:
            d = ms.mlps[0]
            lines.append(f"  MLPs segmented: {len(ms.mlps)} SwiGLU MLP(s), {d['rows']} rows x intermediate "
                         f"{d['inter']} in segments of {d['segment_rows']} rows (backward keeps the input only)")
        for s in ms.skips:
            lines.append(f"  MLP left alone {s}")
    rg = getattr(rec, "regions", None)
    if rg is not None and rg.regions:
        shared = ", ".join(f"{name} x{n}" for name, n in rg.regions)
        lines.append(f"  regional: {rg.layers_shared} of {rg.counters['checkpointed_regions']} checkpointed layers "
                     f"call {len(rg.regions)} shared bodies ({shared}); {rg.counters['boundaries_saved']} layer "
                     "boundaries saved")
    elif rg is not None:
        lines.append(f"  regional: nothing shared, compiled whole-model: {rg.unshared_reason}")
    if rec.left_alone:
        lines.append(f"  left alone: {rec.left_alone}")
    if rec.saved:
        from .memory import saved_by_block
        lines.append("  saved for backward (MiB):   attention      MLP    other")
        for layer, d in sorted(saved_by_block(rec.saved).items(), key=lambda kv: _layer_key(kv[0])):
            lines.append(f"      {layer:<18} {d['attn'] / 2**20:9.2f} {d['mlp'] / 2**20:8.2f} {d['other'] / 2**20:8.2f}")
    if getattr(rec, "memory", None) is not None:
        lines += ["  " + line for line in rec.memory.format().splitlines()]
    if graphs and rec.before:
        lines += ["  --- graph before ---", rec.before, "  --- graph after ---", rec.after or "(unchanged)"]
    return "\n".join(lines)


def _layer_key(name: str) -> tuple:
    return (0, int(name.split(".")[1]), "") if name.startswith("layers.") else (1, 0, name)


@dataclasses.dataclass
class Explanation:
    records: list
    loss: float | None = None

    def __str__(self) -> str:
        return "\n".join(format_record(r) for r in self.records) or "no graphs were compiled"

    def text(self, graphs: bool = False) -> str:
        return "\n".join(format_record(r, graphs=graphs) for r in self.records)

    def max_context(self, budget_bytes: int, resident: int = 0, host_bytes: int | None = None) -> int:
        """Longest sequence length whose estimated peak (graph with the largest peak, plus `resident`
        bytes held outside the graphs: optimizer state, the allocator's slack) fits `budget_bytes`
        and, with LemoConfig.offload, whose offloaded activations (every graph's) fit `host_bytes`.
        Needs an explanation compiled with `dynamic=True`."""
        ests = [r.memory for r in self.records if getattr(r, "memory", None) is not None]
        if not ests:
            raise ValueError("no memory estimate was recorded (was a graph compiled by Inductor's cache?)")
        est = max(ests, key=lambda e: e.peak_hint)
        if len(est.symbols) != 1:
            raise ValueError(f"max_context needs exactly one size symbol (the sequence length); the estimate has "
                             f"{list(est.symbols) or 'none'}: compile with explain(..., dynamic=True) and batch 1")
        if host_bytes is not None and len(ests) > 1 and any(e.host_hint for e in ests if e is not est):
            raise ValueError("max_context with a host budget needs one graph that offloads; this model compiled "
                             f"to {len(ests)} graphs that do")
        return est.max_length(budget_bytes - resident, est.symbols[0], host_budget_bytes=host_bytes)


def _forget(codes: set, before: dict) -> None:
    """Drop the compiled entries explain() added to the model's forward methods, so repeated calls do not
    pile up entries towards Dynamo's recompile limit; the rest of the process's compiled code stays. (A
    method that gained an entry loses all of its entries: the user's own compile of this model class
    then compiles again at its next call.) Without a way to count entries: a full reset, as before."""
    counts = {c: _compat.compiled_entries(c) for c in codes}
    if any(n is None for n in counts.values()):
        torch._dynamo.reset()
        return
    for c, n in counts.items():
        if n > (before[c] or 0):
            _compat.drop_compiled(c)


def explain(model: torch.nn.Module, *args: Any, config: Any = None, backward: bool = True, dynamic: bool = False,
            **kwargs: Any) -> Explanation:
    """Compile `model` with lemo on these inputs (one forward and, if it returns a loss, one backward)
    and report, per graph, what was found, what was rewritten, what was skipped and why, the bytes
    each layer's attention and MLP keep for backward, and the static peak estimate.

    dynamic=True marks axis 1 (the sequence) of every tensor argument dynamic, so the estimate is a
    formula in the length and `Explanation.max_context(budget)` answers how long a context fits."""
    from . import config as _config
    from .backend import RECORDS, make_backend

    cfg = config if config is not None else _config.get_default()
    start = len(RECORDS)
    # the forward methods this compile may leave compiled entries on (Dynamo keys them by code object)
    codes = {type(m).forward.__code__ for m in model.modules() if hasattr(type(m).forward, "__code__")}
    before = {c: _compat.compiled_entries(c) for c in codes}
    compiled = torch.compile(model, backend=make_backend(cfg))
    if dynamic:
        for t in (*args, *kwargs.values()):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                torch._dynamo.mark_dynamic(t, 1)
    out = compiled(*args, **kwargs)
    loss = getattr(out, "loss", None)
    if backward and loss is not None:
        loss.backward()
    recs = RECORDS[start:]
    _forget(codes, before)
    return Explanation(records=recs, loss=float(loss.detach()) if loss is not None else None)
