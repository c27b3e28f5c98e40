"""Shared pieces of every pass: skip reasons, the result record, small FX predicates."""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
import re
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class SkipReason:
    """Why a pass left something alone. `kind` is a short stable tag tests can count."""

    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.where}: {self.detail}"


class CantRewrite(Exception):
    """Raised by deep helpers; caught at the pass boundary and turned into a SkipReason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclasses.dataclass
class PassResult:
    name: str
    counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skips: list[SkipReason] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def skip(self, kind: str, where: str, detail: str) -> None:
        self.skips.append(SkipReason(kind, where, detail))
        self.counters[f"skip_{kind}"] += 1


# Targets every pass matches (Dynamo graphs call the functional forms).
SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
LINEAR_TARGETS = (F.linear, torch._C._nn.linear)


# -- module paths: which decoder layer a node belongs to ----------------------------------------------

_LAYER_TAIL = re.compile(r"(?:^|\.)layers\.(\d+)$")
_LIST_ENTRY = re.compile(r"\.(\d+)$")  # an entry of a ModuleList: transformer.h.3, bert.encoder.layer.3
_LAYER_CLASSES = ("DecoderLayer", "Layer", "Block")  # GPT2Block, BloomBlock, BertLayer, GPTNeoXLayer


def normalize_path(path: str) -> str:
    """Dynamo module paths -> dotted form: L['self'].__dict__['_modules']['model'].layers[0] -> self.model.layers.0"""
    p = path.replace(".__dict__", "").replace("['_modules']", "")
    p = re.sub(r"\['([^']*)'\]", r".\1", p)
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    p = p.replace("L.", "", 1) if p.startswith("L.") else p
    return p.strip(".")


def _cls_name(cls: Any) -> str:
    return cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    st = node.meta.get("nn_module_stack") or {}
    return [(normalize_path(v[0]), _cls_name(v[1])) for v in st.values()]


def _is_layer_entry(path: str, cls: str) -> bool:
    """A decoder layer: class *DecoderLayer, path layers.N, or an entry of a module list whose class is
    named like a layer or block (the outermost such module of a node wins)."""
    return cls.endswith("DecoderLayer") or bool(_LAYER_TAIL.search(path)) or \
        cls.endswith(_LAYER_CLASSES) and bool(_LIST_ENTRY.search(path))


def layer_index(path: str) -> int | None:
    """N of a decoder layer's path (layers.N, h.N, ...), None for a path without one."""
    m = _LAYER_TAIL.search(path) or _LIST_ENTRY.search(path)
    return int(m.group(1)) if m else None


def rel_path(node: fx.Node, prefix: str) -> str | None:
    """Path of the node's innermost module relative to the module at `prefix` ("" for that module
    itself or for a node with no module), None for a node outside it."""
    stack = module_stack(node)
    if not stack:
        return ""
    inner = stack[-1][0]
    if inner == prefix:
        return ""
    if inner.startswith(prefix + "."):
        return inner[len(prefix) + 1:]
    return None


def layer_of(node: fx.Node) -> tuple[str, str, str] | None:
    """(layer path, layer class, path of the node's innermost module relative to the layer)."""
    stack = module_stack(node)
    for i, (path, cls) in enumerate(stack):
        if _is_layer_entry(path, cls):
            inner = stack[-1][0]
            rel = inner[len(path):].lstrip(".") if inner.startswith(path) else ""
            return path, cls, rel
    return None


EAGER_REFUSAL = "lemo_eager_attention_refused"  # node meta: why passes.eager_attention left a softmax

ADD_TARGETS = (operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "add_")


# Calls that only move data (views, reshapes, splits, indexing; `contiguous` may copy): the pooled
# predictor's probe runs them on feature indices, detect follows in-place writes into a block through them.
MOVES = ("view", "reshape", "_unsafe_view", torch.reshape, "transpose", torch.transpose, "permute", torch.permute,
         "contiguous", "chunk", torch.chunk, "split", torch.split, "unbind", "unflatten", "flatten", "narrow",
         "select", "slice", "expand", "squeeze", "unsqueeze", torch.unsqueeze, "__getitem__", operator.getitem)


def graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The root graph and the bodies of higher-order ops (activation checkpointing) under it."""
    return [gm] + [m for _, m in gm.named_modules() if isinstance(m, fx.GraphModule) and m is not gm]


def subgraph_modules(gm: fx.GraphModule) -> list[tuple[str, fx.GraphModule, fx.Node]]:
    """Body graphs of higher-order ops (activation checkpoint, ...) referenced by get_attr nodes."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sub = getattr(gm, node.target, None)
            if isinstance(sub, fx.GraphModule):
                out.append((node.target, sub, node))
    return out


def is_call(node: Any, *targets: Any) -> bool:
    """True for call_function/call_method nodes whose target is one of `targets` (functions or method names)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    return any(node.target is t or node.target == t for t in targets)


def is_add(node: Any) -> bool:
    return is_call(node, *ADD_TARGETS)


def stream_base(node: Any) -> Any:
    """x for node = x * g or g * x with g a gain that does not depend on the position (a number, a scalar or
    a per-channel vector: MiniMax's alpha * h, Doge's learned per-channel residual gain); node otherwise."""
    if not (is_call(node, operator.mul, torch.mul, "mul") and len(node.args) == 2):
        return node
    for x, g in (node.args, node.args[::-1]):
        xv, gv = value_of(x), value_of(g)
        if not isinstance(x, fx.Node) or not isinstance(xv, torch.Tensor) or xv.dim() != 3:
            continue
        if isinstance(g, (int, float)) and not isinstance(g, bool):
            return x
        if (isinstance(gv, torch.Tensor) and gv.dim() <= 1
                and (gv.numel() == 1 or same_size(gv.shape[-1], xv.shape[-1]))):
            return x
    return node


def value_of(node: Any) -> Any:
    """The fake value of a node (Dynamo: example_value; AOT: val)."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def fake_apply(fn: Any, *args: Any) -> Any:
    """fn applied to the fake values of args (nodes or constants) under their fake mode: the example value
    of a node a pass inserts."""
    vals = [value_of(a) for a in args]
    mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"))
    with mode:
        return fn(*vals)


def size_hint(d: Any) -> int | None:
    """A size as an int: itself, or the value a symbolic size had when traced; None when it has none."""
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return None if hint is None else int(hint)


def attention_dropout(sdpa: fx.Node) -> Any:
    """The dropout probability of a scaled_dot_product_attention node (positional or keyword). Under
    torch.compile(dynamic=True) a module's float arrives as a graph input; its value is read under a
    Dynamo guard, so the graph is reused only while the input keeps that value (None: unknown)."""
    from lemo_compile import _compat

    dropout = sdpa.args[4] if len(sdpa.args) > 4 else sdpa.kwargs.get("dropout_p", 0.0)
    if isinstance(dropout, fx.Node):
        return _compat.specialize_float(value_of(dropout))
    return dropout


def shape_of(node: Any) -> tuple | None:
    v = value_of(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def hop_graphs(gm: fx.GraphModule):
    """(graph module, map from its node to the root graph node it stands for): the root, and HOP
    bodies (activation checkpoint) whose placeholders are the HOP call's operands."""
    yield gm, lambda n: n
    for _, sub, get_attr in subgraph_modules(gm):
        calls = [u for u in get_attr.users if u.op == "call_function" and u.args and u.args[0] is get_attr]
        if len(calls) != 1:
            continue
        operands = calls[0].args[1:]
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]

        def outer(n, placeholders=placeholders, operands=operands):
            if n.op == "placeholder" and n in placeholders:
                i = placeholders.index(n)
                return operands[i] if i < len(operands) else n
            return n

        yield sub, outer


def static_nbytes(node: fx.Node) -> int:
    """Bytes of a node's value from its fake tensor; 0 for symbolic sizes (reading those as ints would
    add a guard, i.e. specialize a dynamic length)."""
    val = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(val, torch.Tensor) or not all(type(d) is int for d in val.shape):
        return 0
    return math.prod(val.shape) * val.element_size()


def sdpa_mask(node: fx.Node):
    """The attn_mask node of an SDPA call, or None."""
    m = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return m if isinstance(m, fx.Node) else None


def softmax_scale(sdpa: fx.Node) -> float:
    """SDPA's softmax scale as a Python float, for the attn_mode="backward" ops. HF passes the module's
    `scaling` attribute; with dynamic shapes, torch >= 2.12 lifts such float attributes into the graph
    (a tensor input read by .item()), and then the value it had at compile time is used: a model
    constant that HF never changes."""
    scale = sdpa.kwargs.get("scale")
    if scale is None:
        return shape_of(sdpa.args[0])[-1] ** -0.5
    if isinstance(scale, (int, float)):
        return float(scale)
    v = value_of(scale)
    hint = getattr(getattr(v, "node", None), "hint", None) if isinstance(v, torch.SymFloat) else None
    if hint is None:
        raise CantRewrite("attention_scale", f"the softmax scale of {sdpa.name} is {scale} with no value at "
                                             f"compile time; attn_mode='backward' needs it as a number")
    return float(hint)


def closure_back(start: fx.Node, allowed: set[fx.Node], stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """All nodes in `allowed` reachable backwards from `start` (inclusive) without passing `stop`."""
    stop = set(stop)
    seen: set[fx.Node] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen or n in stop or n not in allowed:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def same_size(a: Any, b: Any) -> bool:
    """Equality of two sizes (ints or SymInts) without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - defensive across versions
        return str(a) == str(b)


_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "transpose",
                           "permute", "t", "narrow", "select", "diagonal", "unflatten", "flatten", "as_strided",
                           "__getitem__", "unfold", "split", "chunk", "unbind",
                           # may return the tensor itself (same dtype, already contiguous): count as aliases
                           "detach", "to", "type", "type_as", "bool", "float", "int", "long", "half", "bfloat16",
                           "double", "contiguous", "reshape_as"})


def _mutates(node: fx.Node) -> bool:
    """An in-place op (x.scatter_(...), torch.relu_, x[i] = v, a mutable aten overload)."""
    tgt = node.target
    if node.op == "call_method":
        return (isinstance(tgt, str) and tgt.endswith("_") and not tgt.startswith("_")) or tgt == "__setitem__"
    if node.op != "call_function":
        return False
    if isinstance(tgt, torch._ops.OpOverload):
        return tgt._schema.is_mutable
    name = getattr(tgt, "__name__", "")
    return tgt is operator.setitem or (name.endswith("_") and not name.startswith("_")) or "out" in node.kwargs


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and (node.target is operator.getitem or
                                           getattr(node.target, "__name__", "") in _VIEW_METHODS)


def _aliases(node: fx.Node) -> set[fx.Node]:
    """`node`'s root tensor and every view of it reached through view ops (the storage a mutation of
    `node` writes)."""
    root = node
    while _is_view(root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    seen, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if user not in seen and _is_view(user) and user.args and user.args[0] in seen:
                seen.add(user)
                todo.append(user)
    return seen


def producers(out: fx.Node) -> list[fx.Node] | str:
    """What out's value depends on, in graph order: its producers and, transitively, the in-place ops
    (x[i] = v, x.masked_fill_(...)) that write their storage before out is computed, with their own
    producers; or why not (a write to out's own storage after it, which out's readers see). Evaluating
    the producers alone misses such writes."""
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    own = _aliases(out)
    seen: set[fx.Node] = set()
    todo = [out]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
        for a in _aliases(n):
            for u in a.users:
                if u in seen or not (_mutates(u) and u.args and u.args[0] is a):
                    continue
                if order[u] < order[out]:
                    todo.append(u)
                elif a in own:
                    return f"is written in place by {u.name} after it is computed"
    return sorted(seen, key=order.__getitem__)


def _functorch_state(node: fx.Node) -> bool:
    """A call that changes functorch's interpreter stack (vmap's _vmap_increment_nesting and
    _vmap_decrement_nesting, with no users, in Mamba's selective scan under torch.vmap): FX does not
    count it as impure, and dropping one leaves a batched tensor escaping its vmap."""
    return node.op == "call_function" and str(getattr(node.target, "__module__", "")).startswith(
        ("torch._functorch", "torch._C._functorch"))


def op_name(target: Any) -> str:
    """"namespace::name" of a torch op target (packet or overload; Dynamo and AOT graphs), "" for others."""
    return getattr(target, "_qualified_op_name", None) or getattr(getattr(target, "_schema", None), "name", "") or ""


def _dead_wait(node: fx.Node) -> bool:
    """A functional collective's wait whose result nothing reads (the full-length exchanges of a block that
    a sparse rewrite replaced): it goes, and then the collective. Every rank rewrites its graph alike."""
    return node.op == "call_function" and op_name(node.target).endswith("c10d_functional::wait_tensor")


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Dead-code elimination that keeps in-place ops whose result is unused but whose mutated tensor is
    read afterwards (an MoE router's mask.scatter_(...), say): FX's own treats them as dead. An in-place
    op on a tensor nothing else reads goes with it (the n x n mask HF fills before a replaced attention)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users or _functorch_state(node):
                continue
            if node.is_impure() and not _dead_wait(node):
                continue
            if _mutates(node) and node.args and isinstance(node.args[0], fx.Node):
                alias = _aliases(node.args[0])
                if any(u is not node and u not in alias for a in alias for u in a.users):
                    continue
            graph.erase_node(node)
            changed = True


def finish(gm: fx.GraphModule, changed: Iterable[fx.GraphModule], dead_code: bool = True) -> None:
    """The end of a pass that rewrote some of gm's graphs (the root or checkpoint bodies): drop what the
    rewrite left unused, check and recompile each, then the root, whose code calls the bodies."""
    changed = list({id(m): m for m in changed}.values())
    for mod in changed:
        if dead_code:
            eliminate_dead_code(mod.graph)
        mod.graph.lint()
        mod.recompile()
    if changed:
        gm.recompile()
