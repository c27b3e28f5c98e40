"""passes.causal — give SDPA `is_causal=True` instead of a mask that is provably the causal mask.

Under Dynamo, Hugging Face models always build their 4-D attention mask (transformers'
`_ignore_causal_mask_sdpa` refuses to skip it while tracing), so SDPA gets an explicit n x n mask and
cannot use its causal flash kernel; the mask itself costs n^2 memory. This pass matches

    mask = <ops on constants only: arange, comparisons, new_ones, expand ...>    # no graph input
    out  = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)

checks that q and k have the same, static length, evaluates the mask's subgraph (it reads no input,
so its value is fixed for this compile: a new length recompiles) and, when that value is exactly the
causal pattern, rewrites the call to

    out  = scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)

Masks that read an input (a user `attention_mask`, packed-sequence `position_ids`), sliding-window
masks, and graphs with a dynamic sequence length are left alone with a SkipReason. Call it before
passes.detect: token elimination then works on the causal form (kept indices are sorted, so causal
order on the compacted rows is causal order on the original positions).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .common import PassResult, is_call, shape_of
from .detect import SDPA_TARGETS, subgraph_modules


@dataclasses.dataclass
class CausalResult(PassResult):
    pass


def make_causal(gm: fx.GraphModule) -> CausalResult:
    res = CausalResult("causal")
    verdicts: dict[fx.Node, str | None] = {}  # outer mask node -> None (causal) or why not
    changed = []
    for mod, outer_of in _graphs(gm):
        for node in list(mod.graph.nodes):
            if not is_call(node, *SDPA_TARGETS):
                continue
            mask = _mask_arg(node)
            if mask is None:
                continue
            src = outer_of(mask)
            if src not in verdicts:
                verdicts[src] = _why_not_causal(gm, src)
            why = verdicts[src] or _why_not_square(node)
            if why:
                res.skip("mask_not_causal", node.name, why)
                continue
            _set_causal(node)
            res.counters["sdpa_made_causal"] += 1
            changed.append(mod)
    for mod in {id(m): m for m in changed}.values():
        mod.graph.lint()
        mod.recompile()
    if changed:
        gm.recompile()
    return res


def _graphs(gm: fx.GraphModule):
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


def _mask_arg(node: fx.Node):
    m = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return m if isinstance(m, fx.Node) else None


def _why_not_square(node: fx.Node) -> str | None:
    q, k = shape_of(node.args[0]), shape_of(node.args[1])
    if q is None or k is None or not isinstance(q[-2], int) or not isinstance(k[-2], int):
        return "query/key lengths are not static"
    if q[-2] != k[-2]:
        return f"query length {q[-2]} != key length {k[-2]} (is_causal would align top-left)"
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    if dropout not in (0, 0.0):
        return "attention dropout"
    return None


def _why_not_causal(gm: fx.GraphModule, mask: fx.Node) -> str | None:
    if mask.graph is not gm.graph:
        return "mask is computed outside the root graph"
    shp = shape_of(mask)
    if shp is None or len(shp) != 4 or not all(isinstance(s, int) for s in shp):
        return "mask shape is not a static 4-D shape (dynamic sequence length?)"
    if shp[-1] != shp[-2]:
        return f"mask is {shp[-2]} x {shp[-1]}, not square"
    nodes = _ancestors(mask)
    for n in nodes:
        if n.op == "placeholder":
            return f"mask depends on the input {n.name} (an attention_mask or position_ids)"
        if n.op not in ("call_function", "call_method", "get_attr"):
            return f"mask depends on {n.op} {n.name}"
    try:
        value = _evaluate(gm, nodes, mask)
    except Exception as e:  # anything odd: leave the mask alone
        return f"could not evaluate the mask ({type(e).__name__}: {e})"
    return _compare_causal(value)


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]  # graph order


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], out: fx.Node) -> torch.Tensor:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[out])
    with torch.no_grad():
        return fx.GraphModule(gm, g)()


def _compare_causal(m: torch.Tensor) -> str | None:
    """None if m (..., n, n) allows exactly the causal pattern: bool (True = attend), or additive
    (0 = attend, at most the dtype's minimum / 2 = blocked). Compared in row chunks."""
    if m.dtype != torch.bool and not m.is_floating_point():
        return f"mask dtype {m.dtype}"
    n = m.shape[-1]
    cols = torch.arange(n, device=m.device)
    low = torch.finfo(m.dtype).min / 2 if m.is_floating_point() else None
    for r0 in range(0, n, 2048):
        rows = m[..., r0:r0 + 2048, :]
        causal = cols[None, :] <= torch.arange(r0, r0 + rows.shape[-2], device=m.device)[:, None]
        if m.dtype == torch.bool:
            allowed = rows
        else:
            allowed = rows == 0
            if not bool((allowed | (rows <= low)).all()):
                return "additive mask has values other than 0 and the dtype's minimum"
        if not bool((allowed == causal).all()):
            return "mask is not the causal pattern (sliding window, padding or a custom mask)"
    return None


def _set_causal(node: fx.Node) -> None:
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 3:
        args[3] = None
    else:
        kwargs["attn_mask"] = None
    if len(args) > 5:
        args[5] = True
    else:
        kwargs["is_causal"] = True
    node.args, node.kwargs = tuple(args), kwargs
    node.meta["lemo_causal"] = True
