"""Regional compilation: compile each kind of decoder layer once and call it for every layer of that kind.

Under activation checkpointing every decoder layer reaches the backend as one
`tag_activation_checkpoint(wrap_body_N, *operands)` call with its own body graph. Bodies of layers of one
kind are identical up to node names once lemo's rewrites are done: the weights are operands, not
constants. This pass groups the calls by a structural key of their body (ops, arguments, constants,
operand shapes, dtypes, strides and requires_grad) and, for a group of two or more, replaces each call's body by one that
only runs `invoke_subgraph(shared, "lemo_layer_k", *operands)`, `shared` being the first call's body.
AOT autograd traces and partitions an invoke_subgraph body once per identifier and Inductor generates its
code once, so compile work on the layers grows with the number of layer kinds, not layers. The calls stay
checkpoints: the partitioner recomputes the invoke_subgraph in the backward, as it recomputes an inline
layer. (Wrapping the checkpoint inside the invoke_subgraph instead lost the recompute, saving each
layer's intermediates, and gave wrong gradients under Inductor's buffer reuse on torch 2.13.)

It runs last, on the rewritten Dynamo graph, so every other pass (masks, sparsify, segmented loss and MLP,
fused kernels) sees the whole model as before. Layers that are not checkpointed stay inline (see the
README's status); a body whose key matches no other body stays as it is."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from lemo_compile import traced

from .common import PassResult, is_call, value_of

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint
INVOKE_SUBGRAPH = torch.ops.higher_order.invoke_subgraph
PREFIX = "lemo_layer_"


@dataclasses.dataclass
class RegionsResult(PassResult):
    # per shared body: (identifier, number of layers calling it)
    regions: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    @property
    def layers_shared(self) -> int:
        return sum(n for _, n in self.regions)

    @property
    def unshared_reason(self) -> str:
        """Why nothing was shared: regional compilation shares checkpointed decoder layers only."""
        if self.skips:
            return str(self.skips[0])
        if not self.counters["checkpointed_regions"]:
            return ("no checkpointed layer (regional compilation shares the bodies of checkpointed decoder "
                    "layers: enable gradient checkpointing)")
        return "no two checkpointed layers have the same rewritten body"


def _value_key(v: Any) -> tuple:
    if isinstance(v, torch.Tensor):
        return ("tensor", str(tuple(v.shape)), str(tuple(v.stride())), v.dtype, v.device.type, v.requires_grad)
    return ("value", type(v).__name__, str(v))


def _arg_key(a: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(a, fx.Node):
        return ("node", index[a])
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_arg_key(x, index) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple((k, _arg_key(v, index)) for k, v in a.items()))
    if isinstance(a, slice):
        return ("slice", _arg_key(a.start, index), _arg_key(a.stop, index), _arg_key(a.step, index))
    if isinstance(a, torch.Tensor):
        return ("tensor constant", id(a))  # never shared: two layers' constants may differ
    return ("const", type(a).__name__, repr(a))


def structural_key(gm: fx.GraphModule) -> tuple:
    """A hashable key equal for two graphs that compute the same function of their operands: node
    names and module-stack metadata are ignored; ops, argument structure, constants and the operands'
    shapes, strides, dtypes and requires_grad are not."""
    index: dict[fx.Node, int] = {}
    key = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            target: Any = _value_key(node.meta.get("example_value", node.meta.get("val")))
        elif node.op == "get_attr":
            attr = getattr(gm, node.target)
            target = structural_key(attr) if isinstance(attr, fx.GraphModule) else ("attr", id(attr))
        else:
            target = node.target
        key.append((node.op, target, _arg_key(node.args, index), _arg_key(node.kwargs, index)))
    return tuple(key)


def _outlined_body(shared: fx.GraphModule, name: str, call: fx.Node) -> fx.GraphModule:
    """A checkpoint body for `call` that only calls the shared body: invoke_subgraph(shared, name,
    *operands), its outputs as the flat tuple the checkpoint expects. The call stays a checkpoint, so
    the partitioner recomputes the invoke_subgraph (the shared forward) in the backward instead of
    saving the layer's intermediates."""
    graph = fx.Graph()
    operands = []
    for i, arg in enumerate(call.args[1:]):
        p = graph.placeholder(f"operand_{i}")
        p.meta["example_value"] = p.meta["val"] = value_of(arg)
        operands.append(p)
    body = graph.get_attr("shared")
    inv = graph.call_function(INVOKE_SUBGRAPH, (body, name, *operands), {})
    inv.meta["example_value"] = inv.meta["val"] = tuple(value_of(call))
    outs = []
    for i, value in enumerate(value_of(call)):
        out = graph.call_function(operator.getitem, (inv, i))
        out.meta["example_value"] = out.meta["val"] = value  # invoke_subgraph reads requires_grad from val
        outs.append(out)
    graph.output(tuple(outs))
    root = torch.nn.Module()
    root.shared = shared
    return fx.GraphModule(root, graph, class_name="LemoOutlinedLayer")


# -------------------------------------------------------------------------------------------------
# stages: what the backward recomputes of a shared body
# -------------------------------------------------------------------------------------------------
# The partitioner recomputes an invoke_subgraph call whole. Inline, it recomputes only what the backward
# needs, and in a sparse layer of attn_mode="backward" that is the kept rows' path: the dense, exact
# forward copy (full-length attention and MLP) only gives the layer its value, through the value-only
# argument of straight_through_rows, and its results that the kept path reads pass through lemo::saved.
# Shared whole, such a layer's dense forward ran again in the backward (1.38x the step of whole-model
# compilation at 8B / 8K on an H100, benchmarks/results/compile_time_8b_regional_v2.json). So a body
# with straight_through_rows is cut into stages, each its own shared invoke_subgraph:
#   K  nodes the gradient flows through (from the outputs back, not into a detach or the value-only
#      argument), and what they read short of a lemo::saved value: the kept path, recomputed;
#   D  the rest: the dense forward copy, the predictor and keep set, the saved values; none of its
#      outputs carries a gradient the layer uses, so the backward never recomputes it;
#   T  straight_through_rows and the residual adds, inline between the stages (cheap; their backward
#      reads no forward value but the saved keep set).
# lemo::saved values leaving a D stage are marked again in the layer's body, where the partitioner
# sees them. Python scalars (sizes) are recomputed in every stage that reads them.

_STRAIGHT_THROUGH = (traced.straight_through_rows,)
_SAVED = torch.ops.lemo.saved.default


def _values(node: fx.Node) -> tuple:
    v = value_of(node)
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _carries_grad(node: fx.Node) -> bool:
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in _values(node))


def _is_scalar(node: fx.Node) -> bool:
    return node.op != "placeholder" and not any(isinstance(x, torch.Tensor) for x in _values(node))


def _classify(body: fx.GraphModule) -> dict[fx.Node, str] | None:
    """Stage class (K, D, T, or S for scalars) of every computing node, None when the body is not cut."""
    nodes = [n for n in body.graph.nodes if n.op not in ("placeholder", "output")]
    if not any(is_call(n, *_STRAIGHT_THROUGH) for n in nodes) or any(n.op == "get_attr" for n in nodes):
        return None
    live: set[fx.Node] = set()
    todo = [a for a in body.graph.output_node().all_input_nodes if _carries_grad(a)]
    while todo:
        n = todo.pop()
        if n in live or n.op == "placeholder":
            continue
        live.add(n)
        if is_call(n, "detach", torch.detach, torch.ops.aten.detach.default):
            continue
        ins = [n.args[1]] if is_call(n, *_STRAIGHT_THROUGH) else n.all_input_nodes
        todo.extend(i for i in ins if _carries_grad(i))
    kind: dict[fx.Node, str] = {}
    for n in nodes:
        if _is_scalar(n):
            kind[n] = "S"
        elif is_call(n, *_STRAIGHT_THROUGH) or (n in live and is_call(n, operator.add, torch.add, "add")):
            kind[n] = "T"
    todo = [n for n in live if n not in kind]
    while todo:  # the kept path: what live nodes read, short of saved values, placeholders, value-only args
        n = todo.pop()
        if n in kind or n.op == "placeholder" or is_call(n, _SAVED):
            continue
        kind[n] = "K"
        todo.extend(n.all_input_nodes)
    for n in nodes:
        kind.setdefault(n, "D")
    return kind


def _stages(body: fx.GraphModule, kind: dict[fx.Node, str]) -> list[tuple[str, list[fx.Node]]]:
    """Units in a valid order: ("K"|"D", nodes) stages and ("T", [node]) inline nodes. A node's level is
    the number of class changes on its longest path from the inputs; a stage is one (level, class)."""
    level: dict[fx.Node, int] = {}
    pos = {n: i for i, n in enumerate(body.graph.nodes)}
    for n in body.graph.nodes:
        if n.op in ("placeholder", "output") or kind[n] == "S":
            continue
        deps = _tensor_inputs(n, kind)
        level[n] = max((level[i] + (kind[i] != kind[n]) for i in deps if i in level), default=0)
    units: dict[tuple, list[fx.Node]] = {}
    for n, lv in level.items():
        units.setdefault((lv, kind[n]) if kind[n] != "T" else (lv, "T", pos[n]), []).append(n)
    order = sorted(units.items(), key=lambda kv: (kv[0][0], min(pos[n] for n in kv[1])))
    return [(key[1], sorted(ns, key=pos.get)) for key, ns in order]


def _through_scalars(start: list[fx.Node], kind: dict[fx.Node, str], inputs: bool) -> set[fx.Node]:
    """The non-scalar nodes reached from `start` (its inputs, or its users), through any scalar nodes in
    between (scalars are recomputed in every stage that reads them)."""
    out, todo, seen = set(), list(start), set()
    while todo:
        a = todo.pop()
        if a in seen:
            continue
        seen.add(a)
        if a.op != "placeholder" and kind.get(a) == "S":
            todo.extend(a.all_input_nodes if inputs else a.users)
        else:
            out.add(a)
    return out


def _tensor_inputs(n: fx.Node, kind: dict[fx.Node, str]) -> set[fx.Node]:
    return _through_scalars(n.all_input_nodes, kind, inputs=True)


def _with_scalars(nodes: list[fx.Node], kind: dict[fx.Node, str], pos: dict) -> list[fx.Node]:
    """nodes plus the scalar nodes they read (transitively), in graph order."""
    extra, todo = set(), [a for n in nodes for a in n.all_input_nodes]
    while todo:
        a = todo.pop()
        if a.op != "placeholder" and kind.get(a) == "S" and a not in extra:
            extra.add(a)
            todo.extend(a.all_input_nodes)
    return sorted(set(nodes) | extra, key=pos.get)


def _extract(nodes: list[fx.Node], outputs: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A graph computing `outputs` from the values `nodes` read but do not compute (its operands)."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(inputs):
        env[a] = g.placeholder(f"operand_{i}")
        env[a].meta.update({k: a.meta[k] for k in ("example_value", "val") if k in a.meta})
    for n in nodes:
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(torch.nn.Module(), g, class_name="LemoLayerStage"), inputs


@dataclasses.dataclass
class _Staged:
    units: list[tuple[str, Any]]  # ("T", node) | (class, (stage module, body inputs, body outputs))
    kind: dict[fx.Node, str]
    pos: dict[fx.Node, int]


def _staged(body: fx.GraphModule) -> _Staged | None:
    kind = _classify(body)
    if kind is None:
        return None
    pos = {n: i for i, n in enumerate(body.graph.nodes)}
    stages = _stages(body, kind)
    if sum(c in ("K", "D") for c, _ in stages) < 2:
        return None
    owner = {n: i for i, (c, ns) in enumerate(stages) for n in ns}
    units: list[tuple[str, Any]] = []
    for i, (c, ns) in enumerate(stages):
        if c == "T":
            units.append(("T", ns[0]))
            continue
        used_outside = [n for n in ns if any(owner.get(u, -1) != i for u in _users_through_scalars(n, kind))]
        if any(not isinstance(value_of(n), torch.Tensor) for n in used_outside):
            return None  # a stage would return something other than tensors
        gm, inputs = _extract(_with_scalars(ns, kind, pos), used_outside)
        anchor = None
        if c == "D":
            anchor = next((i for i, a in enumerate(inputs) if _carries_grad(a)), None)
            if anchor is not None:
                _add_anchor(gm, value_of(inputs[anchor]))
        units.append((c, (gm, inputs, used_outside, anchor)))
    return _Staged(units, kind, pos)


def _zero_of(v: torch.Tensor) -> torch.Tensor:
    return v[(0,) * v.dim()] * 0.0


def _add_anchor(gm: fx.GraphModule, source: torch.Tensor) -> None:
    """Give a D stage a backward that costs nothing: one more operand (an input of the layer that carries
    a gradient, of `source`'s shape in every layer of the kind) and one more output, that operand's first
    element times zero, which the layer adds to its output. torch 2.11's partitioner pairs each forward
    invoke_subgraph with a backward one and refuses a graph where a stage has none; the anchor's backward
    is a zero gradient, and it reads nothing the forward computed, so the stage is still never recomputed."""
    g = gm.graph
    first_index = (0,) * source.dim()
    with g.inserting_after(list(g.find_nodes(op="placeholder"))[-1]):
        src = g.placeholder("anchor_source")
    out = g.output_node()
    with g.inserting_before(out):
        first = g.call_function(operator.getitem, (src, first_index))
        zero = g.call_function(operator.mul, (first, 0.0))
    for node, value in ((src, source), (first, source[first_index]), (zero, _zero_of(source))):
        node.meta["example_value"] = node.meta["val"] = value
    out.args = (tuple(out.args[0]) + (zero,),)
    gm.recompile()


def _users_through_scalars(n: fx.Node, kind: dict[fx.Node, str]) -> set[fx.Node]:
    return _through_scalars(list(n.users), kind, inputs=False)


def _staged_body(staged: _Staged, shared: fx.GraphModule, name: str, call: fx.Node) -> fx.GraphModule:
    """The checkpoint body for `call` as stages: one invoke_subgraph per stage (shared by every layer of
    the kind), straight_through_rows and residual adds inline, saved values marked again here."""
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for i, (p, arg) in enumerate(zip(shared.graph.find_nodes(op="placeholder"), call.args[1:])):
        env[p] = graph.placeholder(f"operand_{i}")
        env[p].meta["example_value"] = env[p].meta["val"] = value_of(arg)

    anchors: list[fx.Node] = []

    def copy(n: fx.Node) -> fx.Node:
        for a in _with_scalars([n], staged.kind, staged.pos):
            if a not in env:
                env[a] = graph.node_copy(a, env.__getitem__)
        return env[n]

    for j, (c, unit) in enumerate(staged.units):
        if c == "T":
            copy(unit)
            continue
        gm, inputs, outputs, anchor = unit
        attr = f"stage_{j}"
        setattr(root, attr, gm)
        operands = [copy(a) if a not in env else env[a] for a in inputs]
        values = [value_of(o) for o in outputs]
        if c == "D":  # no gradient leaves a D stage but its anchor's zero (see _add_anchor)
            source = operands[anchor] if anchor is not None else None
            operands = [_detached(graph, x) for x in operands]
            values = [v.detach() for v in values]
            if source is not None:
                operands.append(source)
        inv = graph.call_function(INVOKE_SUBGRAPH, (graph.get_attr(attr), f"{name}_s{j}", *operands), {})
        if c == "D" and anchor is not None:
            zero = graph.call_function(operator.getitem, (inv, len(values)))
            zero.meta["example_value"] = zero.meta["val"] = _zero_of(value_of(source))
            anchors.append(zero)
            inv.meta["example_value"] = inv.meta["val"] = (*values, zero.meta["val"])
        else:
            inv.meta["example_value"] = inv.meta["val"] = tuple(values)
        for k, o in enumerate(outputs):
            out = graph.call_function(operator.getitem, (inv, k))
            out.meta["example_value"] = out.meta["val"] = values[k]
            if c == "D" and is_call(o, _SAVED):
                out = graph.call_function(_SAVED, (out,))
                out.meta["example_value"] = out.meta["val"] = value_of(o)
            env[o] = out
    results = list(fx.map_arg(shared.graph.output_node().args[0], lambda a: copy(a) if a not in env else env[a]))
    if anchors:  # the anchors' zeros join the layer's first output, so their backward runs
        total = anchors[0]
        for a in anchors[1:]:
            total = graph.call_function(operator.add, (total, a))
            total.meta["example_value"] = total.meta["val"] = a.meta["val"]
        first = graph.call_function(operator.add, (results[0], total))
        first.meta["example_value"] = first.meta["val"] = value_of(results[0])
        results[0] = first
    graph.output(tuple(results))
    return fx.GraphModule(root, graph, class_name="LemoStagedLayer")


def _detached(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """x.detach() where x carries a gradient, else x."""
    v = value_of(x)
    if not (isinstance(v, torch.Tensor) and v.requires_grad):
        return x
    d = graph.call_method("detach", (x,))
    d.meta["example_value"] = d.meta["val"] = v.detach()
    return d


def _outlinable(call: fx.Node) -> bool:
    value = value_of(call)
    return (isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value)
            and all(isinstance(value_of(a), (torch.Tensor, int, torch.SymInt)) for a in call.args[1:]))


_RANDOM = {torch.rand, torch.randn, torch.randint, torch.bernoulli, torch.randn_like, torch.rand_like,
           torch.nn.functional.dropout, torch.dropout, torch.nn.functional.alpha_dropout, "bernoulli_", "uniform_",
           "normal_", "exponential_", "random_"}


def _random_ops(body: fx.GraphModule) -> str | None:
    """The name of a random op in a body on CUDA (dropout with p > 0 in training, rand*, bernoulli), None
    when there is none or the body runs on another device (where AOT autograd saves the generator state
    in the graph, and sharing works)."""
    cuda = any(isinstance(v := value_of(p), torch.Tensor) and v.is_cuda
               for p in body.graph.find_nodes(op="placeholder"))
    for node in body.graph.nodes:
        if not cuda or not is_call(node, *_RANDOM):
            continue
        if is_call(node, torch.nn.functional.dropout, torch.dropout, torch.nn.functional.alpha_dropout):
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if p in (0, 0.0) or training is False:
                continue
        return str(getattr(node.target, "__name__", node.target))
    return None


def share_layers(gm: fx.GraphModule) -> RegionsResult:
    """Replace checkpointed layers with identical bodies by calls of one shared invoke_subgraph body."""
    res = RegionsResult("regions")
    groups: dict[Any, list[fx.Node]] = {}
    for call in gm.graph.find_nodes(op="call_function", target=CHECKPOINT):
        if not _outlinable(call):
            res.skip("operands", call.name, "a checkpointed region with non-tensor operands or outputs stays inline")
            continue
        key = (structural_key(getattr(gm, call.args[0].target)), repr(sorted(call.kwargs.items())))
        groups.setdefault(key, []).append(call)
    res.counters["checkpointed_regions"] = sum(len(g) for g in groups.values())
    for calls in groups.values():
        if len(calls) < 2:
            continue
        name = f"{PREFIX}{len(res.regions)}"
        while hasattr(gm, name):
            name += "_"
        shared = getattr(gm, calls[0].args[0].target)
        random = _random_ops(shared)
        if random:
            res.skip("random_ops", calls[0].name, f"{len(calls)} layers of one kind stay inline: their body calls "
                     f"{random} on CUDA, which AOT autograd cannot thread through a body shared by several "
                     "layers (torch 2.11)")
            continue
        staged = _staged(shared)
        for call in calls:
            body = _staged_body(staged, shared, name, call) if staged else _outlined_body(shared, name, call)
            setattr(gm, call.args[0].target, body)
        res.regions.append((name, len(calls)))
        if staged:
            res.counters["staged_bodies"] += 1
    res.counters["shared_bodies"] = len(res.regions)
    res.counters["layers_shared"] = res.layers_shared
    if res.regions:
        res.counters["boundaries_saved"] = _save_boundaries(gm)
        gm.recompile()
    return res


def _save_boundaries(gm: fx.GraphModule) -> int:
    """Pass each checkpointed layer's output that another checkpointed layer reads through `lemo::saved`
    (outside both regions). With shared bodies a layer is one invoke_subgraph call, and AOT autograd's
    partitioner otherwise recomputes a run of consecutive checkpointed layers as a chain in the
    backward, each layer's input from the previous layer's recompute, so every layer of the run holds its
    recomputed activations at once. lemo::saved is an op the partitioner does not recompute: the
    backward reads the saved layer boundary, as whole-model compilation does. Returns the count."""
    calls = list(gm.graph.find_nodes(op="call_function", target=CHECKPOINT))  # graph order: stable names
    checkpoints = set(calls)
    n = 0
    for call in calls:
        for out in list(call.users):
            if out.target is not operator.getitem or not any(u in checkpoints for u in out.users):
                continue
            with gm.graph.inserting_after(out):
                kept = gm.graph.call_function(torch.ops.lemo.saved.default, (out,))
            kept.meta = dict(out.meta)
            out.replace_all_uses_with(kept, delete_user_cb=lambda u: u is not kept)
            n += 1
    return n
