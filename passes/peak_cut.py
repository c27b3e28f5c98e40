"""passes.peak_cut — compute the LM head and its cross-entropy loss in sequence segments.

Matches, in a Dynamo graph, a cross-entropy whose input is a linear layer's output reached only
through casts and flattening views (HF's `ForCausalLMLoss`, and any loss written the same way):

    logits = linear(h, W_lm, b)            # (b, n, V), returned to the caller
    loss   = cross_entropy(logits.float().view(-1, V), labels.view(-1), ignore_index=-100)

and replaces the loss with one `lemo::linear_cross_entropy` call that reads h and W directly, one
segment of rows at a time, so neither the fp32 logits nor their gradient ever exist in full:

    loss, dh, dW, db = lemo::linear_cross_entropy(h.reshape(-1, d), W_lm, b, labels.view(-1), ...)

The logits themselves stay a graph output (the model returns them) unless LemoConfig.logits is
"drop", in which case a training graph (one that takes a gradient) returns an empty (b, n, 0) tensor
for them and the head's full matmul disappears; evaluation graphs keep their logits. Rows per segment come from LemoConfig.segment_bytes. On CUDA each segment's loss
and logits' gradient are one Triton kernel (kernels/cross_entropy.py) that writes the gradient over
the logits, so a segment holds only its logits.

Left alone, with a SkipReason: losses with class weights or label smoothing, reductions other than
mean/sum, anything between the linear and the loss that is not a cast or a flattening view (logit
soft-capping, a LoRA adapter on the head), linear outputs that are used elsewhere in the graph when
logits are dropped (they are then kept).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lemo_compile import traced
from lemo_compile.config import LemoConfig
from lemo_compile.kernels import cross_entropy, linear_cross_entropy as lce_kernels

from .common import LINEAR_TARGETS, PassResult, finish, is_call, shape_of, value_of

CE_TARGETS = (F.cross_entropy, torch.nn.functional.cross_entropy, torch._C._nn.cross_entropy_loss)
_CASTS = ("float", "to", "contiguous", "type")
_FLATTEN = ("view", "reshape", torch.reshape, "flatten", torch.flatten)
# logits scaled by a constant (Cohere's logit_scale, Granite's logits_scaling): (h W^T) * s = (h * s) W^T
_SCALE_MUL = (operator.mul, torch.mul, "mul", "__mul__", "__rmul__")
_SCALE_DIV = (operator.truediv, torch.div, "div", "__truediv__")


@dataclasses.dataclass
class PeakCutResult(PassResult):
    # per rewritten loss: {"loss", "rows", "vocab", "segment_rows", "logits"}
    losses: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Match:
    ce: fx.Node
    linear: fx.Node
    hidden: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    target: fx.Node
    chain: list[fx.Node]  # nodes between linear and ce
    upcast: bool
    ignore_index: int
    reduction: str
    scales: list[tuple[Any, float]] = dataclasses.field(default_factory=list)  # (operator.mul | truediv, s)
    head: fx.Node | None = None  # the logits the model returns: the linear, or its scaling

    @property
    def logits(self) -> fx.Node:
        return self.head if self.head is not None else self.linear


def peak_cut(gm: fx.GraphModule, cfg: LemoConfig) -> PeakCutResult:
    res = PeakCutResult("peak_cut")
    g = gm.graph
    for ce in [n for n in g.nodes if is_call(n, *CE_TARGETS)]:
        match = _match(ce, res)
        if match is not None:
            res.losses.append(_rewrite(g, match, cfg, res))
            res.counters["losses_segmented"] += 1
    if res.losses:
        finish(gm, [gm])
    return res


# -------------------------------------------------------------------------------------------------
# match, check
# -------------------------------------------------------------------------------------------------


def _arg(node: fx.Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _match(ce: fx.Node, res: PeakCutResult) -> _Match | None:
    where = ce.name
    if ce.target is torch._C._nn.cross_entropy_loss:
        res.skip("loss_form", where, "cross_entropy_loss called directly; expected F.cross_entropy")
        return None
    src, target = ce.args[0], _arg(ce, 1, "target", None)
    if _arg(ce, 2, "weight", None) is not None:
        res.skip("loss_form", where, "class weights are not supported")
        return None
    ignore_index = _arg(ce, 4, "ignore_index", -100)
    reduction = _arg(ce, 6, "reduction", "mean")
    smoothing = _arg(ce, 7, "label_smoothing", 0.0)
    if _arg(ce, 3, "size_average", None) is not None or _arg(ce, 5, "reduce", None) is not None:
        res.skip("loss_form", where, "deprecated size_average/reduce arguments")
        return None
    if not isinstance(ignore_index, int) or reduction not in lce_kernels.REDUCTIONS or smoothing not in (0, 0.0):
        res.skip("loss_form", where, f"ignore_index={ignore_index!r}, reduction={reduction!r}, "
                 f"label_smoothing={smoothing!r}: only an int ignore_index, mean/sum and no smoothing")
        return None
    src_shape, tgt_shape = shape_of(src), shape_of(target)
    if src_shape is None or len(src_shape) != 2 or tgt_shape is None or len(tgt_shape) != 1:
        res.skip("loss_form", where, "expected (N, V) logits and (N,) targets")
        return None
    # walk back from the loss input to a linear through casts and flattening views only
    chain, node, upcast, scales = [], src, False, []
    while isinstance(node, fx.Node) and not is_call(node, *LINEAR_TARGETS):
        if is_call(node, *_CASTS):
            dt = value_of(node).dtype if isinstance(value_of(node), torch.Tensor) else None
            src_dt = value_of(node.args[0]).dtype if isinstance(value_of(node.args[0]), torch.Tensor) else None
            if dt is None or dt not in (torch.float32, src_dt):
                res.skip("loss_chain", where, f"{node.name} casts the logits to {dt}; only an fp32 upcast is "
                         "reproduced")
                return None
            upcast = upcast or dt == torch.float32
        elif is_call(node, *_FLATTEN):
            if not _flattens_rows(node):
                res.skip("loss_chain", where, f"{node.name} reshapes more than the leading (row) dims")
                return None
        elif (scaled := _scale(node)) is not None:
            op, value, src = scaled
            scales.append((op, value))
            chain.append(node)
            node = src
            continue
        else:
            res.skip("loss_chain", where, f"{node.name} ({getattr(node.target, '__name__', node.target)}) between "
                     "the LM head and the loss is not a cast or a flattening view")
            return None
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node):
        res.skip("loss_chain", where, "no linear layer feeds the loss")
        return None
    lin = node
    hidden = lin.args[0]
    weight = _arg(lin, 1, "weight", None)
    bias = _arg(lin, 2, "bias", None)
    lin_val, h_val = value_of(lin), value_of(hidden)
    if not isinstance(lin_val, torch.Tensor) or not isinstance(h_val, torch.Tensor):
        res.skip("loss_chain", where, "no fake values on the LM head")
        return None
    b_val = value_of(bias) if isinstance(bias, fx.Node) else None
    w_val = value_of(weight)
    if isinstance(b_val, torch.Tensor) and isinstance(w_val, torch.Tensor) and b_val.requires_grad != w_val.requires_grad:
        res.skip("loss_form", where, "LM head bias and weight disagree on requires_grad")
        return None
    if scales and bias is not None:
        res.skip("loss_chain", where, "scaled logits of an LM head with a bias: the scale cannot move to its input")
        return None
    # the model returns the scaled logits: they may also feed the output
    nearest = _scale(chain[-1]) if chain else None
    head = chain[-1] if nearest is not None and nearest[2] is lin else None
    for n in chain:
        if len(n.users) > 1 and not (n is head and all(u.op == "output" or u in chain for u in n.users)):
            res.skip("loss_chain", where, f"{n.name} is used outside the loss")
            return None
    # an fp32 head computes in fp32 with or without the cast
    return _Match(ce, lin, hidden, weight, bias, target, chain, upcast or lin_val.dtype == torch.float32,
                  ignore_index, reduction, scales[::-1], head)


def _scale(node: fx.Node) -> tuple[Any, float, fx.Node] | None:
    """(operator.mul or operator.truediv, s, logits) when node multiplies or divides the logits by a
    Python number s (finite, nonzero): a scaling that moves exactly onto the LM head's input."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_call(node, *_SCALE_MUL):
        op = operator.mul
        if isinstance(b, fx.Node) and not isinstance(a, fx.Node):
            a, b = b, a
    elif is_call(node, *_SCALE_DIV):
        op = operator.truediv
    else:
        return None
    if (not isinstance(a, fx.Node) or isinstance(b, bool) or not isinstance(b, (int, float))
            or not math.isfinite(b) or b == 0):
        return None
    return op, float(b), a


def _flattens_rows(node: fx.Node) -> bool:
    """A view/reshape/flatten that only merges leading dims and keeps the last (vocab) dim."""
    src = shape_of(node.args[0])
    out = shape_of(node)
    if src is None or out is None or len(out) > len(src) or len(out) < 1:
        return False
    return out[-1] == src[-1] or (len(out) == len(src) and list(out) == list(src))


# -------------------------------------------------------------------------------------------------
# rewrite
# -------------------------------------------------------------------------------------------------


def _rewrite(g: fx.Graph, m: _Match, cfg: LemoConfig, res: PeakCutResult) -> dict:
    h_val, w_val = value_of(m.hidden), value_of(m.weight)
    vocab, d = shape_of(m.weight)[0], shape_of(m.weight)[1]
    grad_on = torch.is_grad_enabled()
    grad_x = bool(grad_on and h_val.requires_grad)
    grad_w = bool(grad_on and isinstance(w_val, torch.Tensor) and w_val.requires_grad)
    fused = cross_entropy.use_triton(h_val.device, h_val.dtype, m.upcast)
    rows = lce_kernels.segment_rows(int(vocab), cfg.segment_bytes, m.upcast, h_val.dtype.itemsize, fused)
    with g.inserting_before(m.ce):
        hidden = m.hidden
        for op, value in m.scales:  # in the model's order, nearest the LM head first
            hidden = g.call_function(op, (hidden, value))
        x2 = g.call_method("reshape", (hidden, -1, d))
        t1 = g.call_method("reshape", (m.target, -1))
        out = g.call_function(torch.ops.lemo.linear_cross_entropy.default,
                              (x2, m.weight, m.bias, t1, m.ignore_index, m.reduction, m.upcast, rows, grad_x, grad_w))
        loss = g.call_function(operator.getitem, (out, 0))
    loss.meta.update({k: v for k, v in m.ce.meta.items() if k in ("nn_module_stack", "stack_trace")})
    m.ce.replace_all_uses_with(loss)
    g.erase_node(m.ce)
    for n in m.chain:  # reverse order from the loss: each is now unused
        if not n.users:
            g.erase_node(n)
    logits_mode = "kept"
    if cfg.logits == "drop" and not (grad_x or grad_w):
        # An evaluation graph (no_grad, or nothing trainable upstream): whoever asks for logits there
        # reads them (metrics, generation), so logits="drop" does not apply.
        logits_mode = "kept (no gradient taken: logits='drop' applies to training graphs only)"
    elif cfg.logits == "drop":
        outputs = [u for u in m.logits.users if u.op == "output"]
        others = [u for u in m.logits.users if u.op != "output"]
        if others:
            res.skip("logits_used", m.ce.name, f"logits feed {', '.join(u.name for u in others)}; kept")
        elif outputs:
            with g.inserting_before(m.linear):
                empty = g.call_function(traced.empty_logits, (m.hidden,))
            m.logits.replace_all_uses_with(empty)
            logits_mode = "dropped"
    return {"loss": loss.name, "rows": str(shape_of(m.hidden)[:-1]), "vocab": int(vocab),
            "segment_rows": rows, "logits": logits_mode, "grad_hidden": grad_x, "grad_weight": grad_w}
