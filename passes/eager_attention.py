"""Eager attention written out as tensor ops becomes one scaled_dot_product_attention call.

Models without an SDPA path (RoFormer, RemBERT, Megatron-BERT, GPT-NeoX-Japanese, CPM-Ant, ...) and models
loaded with `attn_implementation="eager"` compute attention as

    s = q @ k^T [* c | / c]... [+ mask] [- rowmax(s)]
    p = softmax(s, -1) [.to(dtype)] [dropout(p=0 or eval)]
    o = p @ v

Detection recognizes attention by its SDPA call, so such layers stayed dense. This pass replaces each chain
it can prove equal to `F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c)` (k = the
transpose of the matmul's right operand): the same function of q, k, v and the mask, up to rounding.
Everything downstream then treats the layer like any SDPA model, and the n x n score and probability
tensors of the eager chain are gone from dense layers too.

Scores computed over (batch x heads) rows with bmm / baddbmm (BART-era models, GPT-NeoX-Japanese) count
too, when the queries, keys and values are views of 4-D tensors and the output is viewed back to 4-D.
A mask applied as `torch.where(m, s, c)` with c at the bottom of the float range (GPT-Neo) becomes the
additive mask `where(m, 0, c)` (plus any additive mask after it): s + c rounds to c for every finite
score, so the masked entries are the same as in the eager chain.

Every chain with a mask is rewritten only where every query keeps a key (`_why_a_query_may_see_no_key`):
a query that sees none (left padding) gets a uniform softmax in the model, which SDPA does not reproduce
(no gradient through a torch.where's masked scores; the fused backward's log-sum-exp). Proven for causal
masks, packed masks, and masks evaluated at compile time from constants and module buffers (GPT-Neo's
causal buffer); a padding mask read from an input is refused, with the reason.

A chain is left alone, with the reason, when it holds anything SDPA cannot express: a soft cap (tanh)
on the scores, attention sinks (the scores read twice), a scale or mask computed as a product with a
tensor, a mask added before a scale, attention dropout while training, a float mask whose dtype is
not the queries'.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .causal import FULL_EVAL_BYTES, nodes_as_module, why_not_causal
from .common import (EAGER_REFUSAL, CantRewrite, PassResult, fake_apply, finish, hop_graphs, is_call, module_stack,
                     producers, same_size, shape_of, value_of)
from .masks import PACKED, read_mask

SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, "softmax")
MATMUL = (torch.matmul, operator.matmul, torch.Tensor.matmul, "matmul")
BMM = (torch.bmm, torch.Tensor.bmm, "bmm")
BADDBMM = (torch.baddbmm, torch.Tensor.baddbmm, "baddbmm")
DROPOUT = (F.dropout, torch.dropout)
SCALE = {operator.mul: 1, torch.mul: 1, "mul": 1, operator.truediv: -1, torch.div: -1, "div": -1,
         "__truediv__": -1, torch.true_divide: -1}
CASTS = ("float", "half", "bfloat16", "type_as", "contiguous")


def sdpa_from_eager(gm: fx.GraphModule, example_inputs: Sequence = ()) -> PassResult:
    """Rewrite every provable eager attention chain of the root graph and checkpoint bodies (see module doc).
    example_inputs: the root graph's inputs, whose module buffers a torch.where mask may be read from."""
    res = PassResult("eager_attention")
    changed = []
    ctx = _Context(gm, _buffers(gm, example_inputs))
    for mod, outer_of in hop_graphs(gm):
        ctx.outer_of = outer_of
        for sm in [n for n in mod.graph.nodes if is_call(n, *SOFTMAX)]:
            try:
                _rewrite(mod.graph, sm, ctx)
            except CantRewrite as e:
                res.skip(e.kind, _where(sm), e.detail)
                sm.meta[EAGER_REFUSAL] = e.detail  # detect names it where it finds no SDPA
                continue
            res.counters["attention_rewritten"] += 1
            changed.append(mod)
    finish(gm, changed)
    return res


def _where(node: fx.Node) -> str:
    stack = module_stack(node)
    return f"{stack[-1][0]} ({node.name})" if stack else node.name


def _only_user(node: fx.Node, what: str) -> fx.Node:
    if len(node.users) != 1:
        raise CantRewrite("eager_attention", f"the {what} {node.name} is read {len(node.users)} times (attention "
                                             f"sinks or weights returned?); SDPA cannot express that")
    return next(iter(node.users))


def _const(x: Any, what: str) -> float:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise CantRewrite("eager_attention", f"the scores are scaled by {x} ({what}), not a number known at compile time")


@dataclasses.dataclass
class _Context:
    gm: fx.GraphModule  # the root graph
    buffers: dict  # its placeholders that are module buffers -> their values (_buffers)
    checked: dict = dataclasses.field(default_factory=dict)  # (condition, mask) -> why not: one mask, all layers
    outer_of: Any = None  # the graph being rewritten: node -> the root node it stands for


def _buffers(gm: fx.GraphModule, example_inputs: Sequence) -> dict[fx.Node, torch.Tensor]:
    """Placeholder -> value of the root graph's inputs that are module buffers (Dynamo names them after
    their source, `..._buffers_<name>_`), where a real tensor was given for them."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        return {}
    return {n: t for n, t in zip(phs, example_inputs) if "_buffers_" in n.name and isinstance(t, torch.Tensor)
            and not isinstance(t, torch._subclasses.FakeTensor)}


def _rewrite(g: fx.Graph, sm: fx.Node, ctx: _Context) -> None:
    dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
    scores = sm.args[0]
    ndim = len(value_of(scores).shape) if isinstance(value_of(scores), torch.Tensor) else None
    if dim is None or dim not in (-1, None if ndim is None else ndim - 1):  # None: torch's legacy implicit dim
        raise CantRewrite("eager_attention", f"softmax over dim {dim}, not the last")
    _only_user(scores, "scores")
    scale, mask, where, qk = _scores(scores)
    _only_user(qk, "scores")
    pv = _probabilities(sm)
    q, kt = qk.args[-2:]  # matmul / bmm (q, k^T); baddbmm (zeros, q, k^T)
    q, k, v = _heads(q, "queries"), _keys(kt), _heads(pv.args[1], "values")
    vals = [value_of(t) for t in (q, k if k is not None else kt, v)]
    if k is None:  # keys^T that is no transpose of keys: SDPA gets its transpose, shape (.., d, n) -> (.., n, d)
        vals[1] = vals[1].transpose(-2, -1)
    if not all(same_size(a, b) for t in vals[1:] for a, b in zip(t.shape[:2], vals[0].shape[:2])):
        raise CantRewrite("eager_attention", f"queries {tuple(vals[0].shape)}, keys {tuple(vals[1].shape)} and "
                                             f"values {tuple(vals[2].shape)} differ in batch or heads")
    if len({t.dtype for t in vals}) != 1:  # GPT-Neo casts q and k to fp32; SDPA takes one dtype
        raise CantRewrite("eager_attention", f"queries, keys and values of dtypes {[t.dtype for t in vals]}")
    for m in (mask, where[0] if where else None):
        if m is None:
            continue
        mv = value_of(m)
        if not isinstance(mv, torch.Tensor) or mv.dim() > 4:
            raise CantRewrite("eager_attention", f"the mask {m} is not a tensor SDPA can broadcast over "
                                                 f"(batch, heads, queries, keys)")
        if m is mask and mv.dtype != vals[0].dtype:  # a bool added to the scores adds 0 or 1: SDPA reads a mask
            raise CantRewrite("eager_attention", f"a {mv.dtype} tensor added to {vals[0].dtype} scores")
    why = _why_a_query_may_see_no_key(ctx, where[0] if where else None, mask)
    if why:
        raise CantRewrite("eager_attention", why)
    if where and (value_of(where[0]).dtype != torch.bool or value_of(where[1]).dtype != vals[0].dtype):
        raise CantRewrite("eager_attention", f"torch.where over scores with a {value_of(where[0]).dtype} "
                                             f"condition and a {value_of(where[1]).dtype} fill")
    target = pv if value_of(pv).dim() == 4 else _four_d_view(pv, vals)
    if k is None:  # every check passed: only now is the graph changed
        with g.inserting_after(kt):
            k = g.call_method("transpose", (kt, -2, -1))
        k.meta.update({key: v for key, v in kt.meta.items() if key not in ("example_value", "val")})
        k.meta["example_value"] = vals[1]
    if where:
        mask = _where_mask(g, target, *where, mask)
    with g.inserting_before(target):
        out = g.call_function(F.scaled_dot_product_attention, (q, k, v),
                              {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": scale})
    out.meta.update(target.meta)
    target.replace_all_uses_with(out)


def _where_mask(g: fx.Graph, before: fx.Node, cond: fx.Node, fill: fx.Node, add: fx.Node | None) -> fx.Node:
    """where(cond, 0, fill) [+ add]: the additive mask equal to masking the scores with where(cond, s, fill)."""
    with g.inserting_before(before):
        mask = g.call_function(torch.where, (cond, 0.0, fill))
        mask.meta["example_value"] = fake_apply(torch.where, cond, 0.0, fill)
        if add is not None:
            mask_sum = g.call_function(operator.add, (mask, add))
            mask_sum.meta["example_value"] = fake_apply(operator.add, mask, add)
            mask = mask_sum
    return mask


def _heads(node: fx.Node, what: str) -> fx.Node:
    """The 4-D (batch, heads, tokens, dim) tensor behind node: node itself, or the tensor a 3-D
    (batch x heads, tokens, dim) view of it was made from (BART-era attention)."""
    val = value_of(node)
    if isinstance(val, torch.Tensor) and val.dim() == 4:
        return node
    src = node.args[0] if is_call(node, "view", "reshape", torch.reshape) else None
    sv = value_of(src)
    if (isinstance(val, torch.Tensor) and val.dim() == 3 and isinstance(sv, torch.Tensor) and sv.dim() == 4
            and same_size(sv.shape[0] * sv.shape[1], val.shape[0])
            and all(map(same_size, sv.shape[2:], val.shape[1:]))):
        return src
    raise CantRewrite("eager_attention", f"the {what} {node.name} are not 4-D (batch, heads, tokens, dim), nor a "
                                         f"(batch x heads) view of such a tensor")


def _keys(kt: fx.Node) -> fx.Node | None:
    """The keys (batch, heads, tokens, dim) whose transpose is kt: the transpose's input, or None where kt is
    a 4-D tensor made otherwise (a permute), whose transpose _rewrite adds once every check has passed."""
    val = value_of(kt)
    if is_call(kt, "transpose", torch.transpose) and isinstance(val, torch.Tensor):
        dims = {d % val.dim() for d in kt.args[1:3] if isinstance(d, int)}
        if dims == {val.dim() - 2, val.dim() - 1}:
            return _heads(kt.args[0], "keys")
    if not (isinstance(val, torch.Tensor) and val.dim() == 4):
        raise CantRewrite("eager_attention", f"the keys^T {kt.name} are not a 4-D tensor or a transpose of keys")
    return None


def _four_d_view(pv: fx.Node, vals: list) -> fx.Node:
    """The 3-D p @ v output's one reader, a view back to (batch, heads, tokens, dim): SDPA's output replaces it."""
    user = _only_user(pv, "attention output")
    uv = value_of(user)
    want = (*vals[0].shape[:3], vals[2].shape[-1])
    if not (is_call(user, "view", "reshape", torch.reshape) and isinstance(uv, torch.Tensor) and uv.dim() == 4
            and all(map(same_size, uv.shape, want))):
        raise CantRewrite("eager_attention", f"the (batch x heads) attention output {pv.name} is not viewed back "
                                             f"to (batch, heads, tokens, dim)")
    return user


def _scores(node: fx.Node) -> tuple[float, fx.Node | None, tuple[fx.Node, fx.Node] | None, fx.Node]:
    """Walk back from the softmax input to the q @ k^T matmul: (scale, additive mask or None, where-mask
    (condition, fill) or None, matmul). Nothing is changed: _rewrite builds the masks once every check passed."""
    scale, mask, where = 1.0, None, None
    while True:
        if is_call(node, *MATMUL, *BMM):
            return scale, mask, where, node
        if is_call(node, *BADDBMM):
            return scale * _zero_base(node), mask, where, node
        if node.op not in ("call_function", "call_method"):
            raise CantRewrite("eager_attention", f"the scores come from {node.op} {node.name}, not q @ k^T")
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if is_call(node, *SCALE) and len(tensors) == 1 and len(node.args) == 2 and not node.kwargs:
            sign = next(s for t, s in SCALE.items() if is_call(node, t))
            other = node.args[1] if node.args[0] is tensors[0] else node.args[0]
            if sign < 0 and node.args[0] is not tensors[0]:
                raise CantRewrite("eager_attention", f"{node.name} divides a number by the scores")
            scale *= _const(other, node.name) ** sign
            nxt = tensors[0]
        elif is_call(node, operator.add, torch.add, "add", "__add__") and len(tensors) == 2 and mask is None:
            a, b = tensors
            a_scores = _reaches_matmul(a)
            if a_scores == _reaches_matmul(b):
                raise CantRewrite("eager_attention", f"{node.name} adds two tensors made from the scores, or none")
            nxt, mask = (a, b) if a_scores else (b, a)
            if value_of(node) is None or value_of(node).dim() != 4:
                raise CantRewrite("eager_attention", f"{node.name} adds the mask to scores that are not 4-D "
                                                     f"(batch, heads, queries, keys)")
            if mask is not None and scale != 1.0:  # mask added after the scale: fine; before it: the mask is scaled
                raise CantRewrite("eager_attention", f"the mask {mask.name} is added before a scale of the scores")
        elif is_call(node, torch.where, "where") and len(node.args) == 3 and not node.kwargs and where is None:
            cond, nxt, fill = node.args
            if not (isinstance(cond, fx.Node) and isinstance(nxt, fx.Node) and _range_bottom(fill)):
                raise CantRewrite("eager_attention", f"{node.name} is a torch.where over the scores that is not "
                                                     f"a mask (fill at the bottom of the float range)")
            if _reaches_matmul(cond) or scale != 1.0:
                raise CantRewrite("eager_attention", f"{node.name} masks scores with a condition made from them, "
                                                     f"or before a scale")
            if value_of(node) is None or value_of(node).dim() != 4:
                raise CantRewrite("eager_attention", f"{node.name} masks scores that are not 4-D")
            where = (cond, fill)
        elif _is_cast(node) or is_call(node, "view", "reshape", torch.reshape) or _min_clamp(node):
            nxt = node.args[0]
        elif _row_max_shift(node):  # s - max(s, -1): softmax does not change; SDPA does the same inside
            nxt = node.args[0]
            if len(nxt.users) == 2:
                node = nxt
                continue
        else:
            raise CantRewrite("eager_attention", f"op {_op(node)} between q @ k^T and the softmax")
        _only_user(nxt, "scores")
        node = nxt


def _zero_base(node: fx.Node) -> float:
    """alpha of baddbmm(zeros, q, k^T, beta=.., alpha=..) (GPT-NeoX-Japanese): alpha * q @ k^T."""
    base = node.args[0]
    if not is_call(base, torch.zeros, torch.zeros_like, "new_zeros", "zero_"):
        raise CantRewrite("eager_attention", f"baddbmm adds {base} to the scores, not zeros")
    return _const(node.kwargs.get("alpha", 1), node.name)


def _min_clamp(node: fx.Node) -> bool:
    """torch.max(s, torch.tensor(finfo.min)) (XGLM): a no-op for finite scores; a masked entry stays
    at the bottom of the range either way, so the softmax is the same."""
    if not (is_call(node, torch.max, torch.maximum, "max", "maximum") and len(node.args) == 2):
        return False
    lo = node.args[1]  # Dynamo writes torch.tensor(x) as torch.full((), x)
    value = (lo.args[0] if is_call(lo, torch.tensor) and lo.args else
             lo.args[1] if is_call(lo, torch.full) and len(lo.args) > 1 and tuple(lo.args[0]) == () else None)
    return value in {torch.finfo(t).min for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _why_a_query_may_see_no_key(ctx: _Context, cond: fx.Node | None, add: fx.Node | None) -> str | None:
    """None when every query keeps a key under [where(cond, s, fill)] [+ add]; else why that is not proven.

    A query that sees no key has every score at the bottom of the range, and HF's loss reads such a row (the
    last left pad predicts the first real token). The model averages every value there; SDPA does not
    reproduce it: under a torch.where the model passes no gradient to the masked scores, SDPA's additive mask
    to all of them (GPT-Neo, left padding: parameter gradients off by up to 4e2 at an equal loss); SDPA's
    fused CPU backward recomputes the probabilities from a log-sum-exp that rounds to the mask value (eager
    Llama, left padding: off by 3e3); and passes.masks cannot make such a mask segments (FLOAT_PADDING).

    Proven where the masks are causal (every query sees itself; passes.causal, at many lengths when the
    length is symbolic), or evaluated at compile time from constants and module buffers (`ctx.buffers`,
    their values when compiled: Dynamo does not guard buffer data); an additive mask read from an input
    only when packed (every token sees itself). A checkpoint body's mask is checked as the root-graph
    operand it views."""
    parts = []
    for what, m in (("torch.where condition", cond), ("mask", add)):
        if m is not None:
            root = _root_of(ctx, m)
            if isinstance(root, str):
                return f"the {what} ({m.name}) {root}"
            parts.append((what, root))
    if not parts:  # no mask: every query sees every key
        return None
    key = tuple(parts)
    if key not in ctx.checked:
        ctx.checked[key] = _why_rows_unproven(ctx, parts)
    return ctx.checked[key]


def _root_of(ctx: _Context, node: fx.Node) -> fx.Node | str:
    """The root-graph node `node` stands for (itself in the root; in a checkpoint body, the operand its
    placeholder receives, reached through views and casts that keep the last two sizes), or why not."""
    n = node
    while n.op != "placeholder" and n.graph is not ctx.gm.graph:
        if not (_is_cast(n) or is_call(n, operator.getitem, "view", "reshape", "expand", "to", "contiguous")):
            return f"is computed inside a checkpointed layer ({_op(n)})"
        n = n.args[0]
    outer = ctx.outer_of(n)
    if not isinstance(outer, fx.Node) or outer.graph is not ctx.gm.graph:
        return "is computed inside a checkpointed layer"
    inner, out = shape_of(node), shape_of(outer)
    if inner is None or out is None or len(out) < 2 or not all(same_size(a, b) for a, b in zip(inner[-2:], out[-2:])):
        return f"is a slice of {outer.name} inside a checkpointed layer"
    return outer


def _why_rows_unproven(ctx: _Context, parts: list) -> str | None:
    """_why_a_query_may_see_no_key for root-graph nodes: parts = [(what, node)], condition first."""
    gm = ctx.gm
    deps = {}  # node -> producers(node), computed once
    for what, m in parts:
        if isinstance(deps.setdefault(m, producers(m)), str):
            return f"the {what} ({m.name}) {deps[m]}"
    inputs = {m: [n for n in deps[m] if n.op == "placeholder" and isinstance(value_of(n), torch.Tensor)
                  and n not in ctx.buffers] for _, m in parts}  # tensor inputs, module buffers aside
    if len(parts) == 1 and parts[0][0] == "mask":  # additive only: packed, causal, or evaluated below
        mask = parts[0][1]
        if inputs[mask] and read_mask(gm, mask)[0] == PACKED:
            return None
        if not inputs[mask] and why_not_causal(gm, mask) is None:
            return None
    keep = None
    for what, m in parts:
        if inputs[m]:
            return (f"the {what} ({m.name}) reads the input {inputs[m][0].name} and may leave a query no key "
                    f"(left padding), whose eager softmax SDPA does not reproduce")
        free = tuple(n for n in deps[m] if n.op == "placeholder")
        if any(n not in ctx.buffers for n in free):
            return f"the {what} ({m.name}) depends on a symbolic size: its rows are not checked at other lengths"
        if value_of(m).numel() * value_of(m).element_size() > FULL_EVAL_BYTES:
            return f"the {what} ({m.name}) is too large to check at compile time"
        try:
            with torch.no_grad():
                value = nodes_as_module(gm, deps[m], m, inputs=free)(*(ctx.buffers[n] for n in free))
            value = value if value.dtype == torch.bool else value > torch.finfo(value.dtype).min / 2
        except Exception as e:  # anything odd: not proven
            return f"could not evaluate the {what} ({m.name}): {type(e).__name__}: {e}"
        keep = value if keep is None else keep & value
    if not keep.any(-1).all():
        return "a query sees no key under the mask, whose eager softmax SDPA does not reproduce"
    return None


def _range_bottom(fill: Any) -> bool:
    """A 0-d constant tensor (torch.tensor(x) / torch.full((), x)) with x <= half the lowest float32: the
    value masked scores take; -inf too."""
    if not isinstance(fill, fx.Node):
        return False
    value = (fill.args[0] if is_call(fill, torch.tensor) and fill.args else
             fill.args[1] if is_call(fill, torch.full) and len(fill.args) > 1 and tuple(fill.args[0]) == () else None)
    return isinstance(value, float) and value <= torch.finfo(torch.float32).min / 2


def _row_max_shift(node: fx.Node) -> bool:
    """node = s - max(s, dim=-1, keepdim=True)[0] (or .amax): the shift that keeps exp() in range."""
    if not (is_call(node, operator.sub, torch.sub, "sub") and len(node.args) == 2):
        return False
    s, m = node.args
    if not isinstance(m, fx.Node) or len(m.users) != 1:
        return False
    if is_call(m, operator.getitem) and m.args[1] == 0:
        m = m.args[0]
    if not (is_call(m, torch.max, "max", torch.amax, "amax") and m.args[0] is s):
        return False
    dim = m.kwargs.get("dim", m.args[1] if len(m.args) > 1 else None)
    keep = m.kwargs.get("keepdim", m.args[2] if len(m.args) > 2 else False)
    return dim in (-1, (-1,), [-1]) and keep is True


def _reaches_matmul(node: fx.Node, depth: int = 12) -> bool:
    """Is a q @ k^T matmul among the first `depth` producers of node (the scores side of the mask add)?"""
    todo, seen = [(node, 0)], set()
    while todo:
        n, d = todo.pop()
        if n in seen or d > depth:
            continue
        seen.add(n)
        if is_call(n, *MATMUL, *BMM, *BADDBMM):
            return True
        todo.extend((a, d + 1) for a in n.all_input_nodes)
    return False


def _probabilities(sm: fx.Node) -> fx.Node:
    """Walk forward from the softmax to the p @ v matmul through casts and a dropout that does nothing."""
    node = sm
    while True:
        user = _only_user(node, "probabilities" if node is not sm else "softmax")
        if is_call(user, *MATMUL, *BMM):
            if user.args[0] is not node:
                raise CantRewrite("eager_attention", "the probabilities are the matmul's right operand")
            return user
        if is_call(user, *DROPOUT):
            _no_dropout(user)
        elif not (_is_cast(user) or is_call(user, "view", "reshape", torch.reshape)):  # views keep row-major order
            raise CantRewrite("eager_attention", f"op {_op(user)} between the softmax and p @ v")
        node = user


def _no_dropout(node: fx.Node) -> None:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    names = ("training", "train")
    training = next((node.kwargs[k] for k in names if k in node.kwargs), node.args[2] if len(node.args) > 2 else True)
    if training is False or p == 0 or p == 0.0:
        return
    raise CantRewrite("attention_dropout", f"attention dropout p={p} while training ({node.name}); set the "
                                           f"model's attention dropout to 0 for lemo to use SDPA here")


def _is_cast(node: fx.Node) -> bool:
    if is_call(node, *CASTS):
        return True
    if is_call(node, "to"):
        rest = list(node.args[1:]) + list(node.kwargs.values())
        return all(isinstance(a, (torch.dtype, bool)) for a in rest) and bool(rest)
    return False


def _op(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
