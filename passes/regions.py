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
        for call in calls:
            setattr(gm, call.args[0].target, _outlined_body(shared, name, call))
        res.regions.append((name, len(calls)))
    res.counters["shared_bodies"] = len(res.regions)
    res.counters["layers_shared"] = res.layers_shared
    if res.regions:
        gm.recompile()  # the calls are unchanged; only their bodies were replaced
    return res
