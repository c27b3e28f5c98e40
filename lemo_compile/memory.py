"""Activation accounting: bytes of tensors saved for backward.

Two views that tests and benchmarks compare:
- measured: `saved_tensor_bytes(fn)` runs fn under `torch.autograd.graph.saved_tensors_hooks` and
  adds up the distinct storages autograd keeps (device-independent; works on CPU in CI);
- attributed: `saved_by_block(record)` reads the AOT partition of a compiled graph (the forward
  values the backward graph takes as inputs) and assigns each to its decoder layer and block
  (attention / MLP / other) through the node's module path.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _compat
from .passes.common import size_hint

_ATTN = ("self_attn", "input_layernorm", "attn", "attention", "ln_1")
_MLP = ("mlp", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
        "feed_forward", "ln_2")


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run fn() (a forward) and return (its result, bytes of distinct storages saved for backward)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[(t.device.type, st.data_ptr())] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            seen[(id(t),)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@dataclasses.dataclass
class SavedValue:
    name: str
    layer: str  # "layers.N", "(compiled module)" or "other"
    block: str  # "attn", "mlp" or "other"
    nbytes: int


def _hint(x: Any) -> int:
    return size_hint(x) or 0  # 0 for a symbolic size without a hint


def exchanged_bytes(graph: fx.Graph) -> int:
    """Bytes a graph hands to all-to-all collectives (sequence parallelism), at its traced sizes."""
    from .passes.common import op_name
    return sum(storage_bytes(n.args[0].meta.get("val")) for n in graph.nodes
               if n.op == "call_function" and op_name(n.target).endswith("::all_to_all_single"))


def storage_bytes(val: Any) -> int:
    """Bytes a saved value holds: its storage's size (an expanded index is a view of a small tensor)."""
    if not isinstance(val, torch.Tensor):
        return 0
    try:
        return _hint(val.untyped_storage().nbytes())
    except Exception:
        numel = 1
        for s in val.shape:
            numel *= _hint(s)
        return numel * val.element_size()


def attribute(node: fx.Node) -> tuple[str, str]:
    from lemo_compile.passes.common import layer_index, layer_of, module_stack
    lo = layer_of(node)
    if lo is None:  # outside decoder layers, or a graph compiled from one layer (children at the top)
        st = module_stack(node)
        rel = st[-1][0].split(".", 1)[1] if st and "." in st[-1][0] else ""
        layer = "(compiled module)"
    else:
        path, _, rel = lo
        i = layer_index(path)
        layer = f"layers.{i}" if i is not None else path
    head = rel.split(".")[0]
    block = "attn" if head in _ATTN else "mlp" if head in _MLP else "other"
    if lo is None and block == "other":
        layer = "other"
    return layer, block


def forward_values(gm: fx.GraphModule) -> dict[str, tuple[str, str, int]]:
    """name -> (layer, block, bytes) for every node of an AOT forward graph."""
    out = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "placeholder"):
            layer, block = attribute(n)
            out[n.name] = (layer, block, storage_bytes(n.meta.get("val")))
    return out


def saved_values(fw: dict[str, tuple[str, str, int]], bw_graph: fx.Graph) -> list[SavedValue]:
    """The backward graph's non-tangent, non-parameter inputs, attributed through the forward graph."""
    res = []
    for n in bw_graph.nodes:
        if n.op != "placeholder" or n.name.startswith(("tangents", "primals")):
            continue
        name = n.name.removeprefix(_compat.OFFLOAD_PREFIX)  # offloaded (LemoConfig.offload): its source
        layer, block, nbytes = fw.get(name, ("other", "other", None))
        if nbytes is None or name != n.name:  # unknown to the forward, or the host copy's own size
            nbytes = storage_bytes(n.meta.get("val"))
        res.append(SavedValue(n.name, layer, block, nbytes))
    return res


def offloaded_values(fw_graph: fx.Graph) -> list[SavedValue]:
    """The forward graph's outputs that AOT autograd's activation offloading moved to host memory
    (passes.memory.offloaded_outputs), attributed to their layer and block through the saved value."""
    from lemo_compile.passes.memory import offloaded_outputs

    return [SavedValue(src.name, *attribute(src), storage_bytes(out.meta.get("val")))
            for out, src in offloaded_outputs(fw_graph)]


def saved_by_block(saved: list[SavedValue]) -> dict[str, dict[str, int]]:
    """{layer: {"attn": bytes, "mlp": bytes, "other": bytes}}."""
    table: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"attn": 0, "mlp": 0, "other": 0})
    for s in saved:
        table[s.layer][s.block] += s.nbytes
    return dict(table)
