"""passes.fuse — replace the two ends of a compacted block with the fused row kernels (kernels/rows.py).

Runs after passes.sparsify on the same Dynamo graph. It matches, per kept-row copy of a block:

1. gather + RMSNorm (the block's input norm, cloned onto the kept rows by sparsify):

       x   = gather_seq(h, idx, 1)                       # (b, m, d)
       xf  = x.to(float32); var = xf.pow(2).mean(-1, keepdim=True)
       y   = weight * (xf * rsqrt(var + eps)).to(dtype)
   ->  y   = gather_rmsnorm(h, idx, ok, weight, eps)     # lemo::gather_rmsnorm_rows, rows read by index

2. GEMM + residual scatter-add (attention output projection in attn_mode=tokens, MLP down projection
   in mlp_mode=tokens), with or without a LoRA branch added to the projection:

       rows = linear(z, W, b) [+ r]
       h1   = scatter_add_rows(h, rows, idx, ok)
   ->  h1   = lemo::linear_scatter_add(h, z, W, b, r, idx, ok)

Only exact structural matches are rewritten (an RMSNorm with an offset weight, as in Gemma, is not
this pattern and is left to Inductor); dtypes must agree, as the kernels require. Counters:
`gather_rmsnorm`, `linear_scatter_add`; skips are recorded for chains that almost match.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from lemo_compile import ops, traced

from .common import LINEAR_TARGETS, PassResult, finish, graph_modules, is_call, shape_of, value_of


@dataclasses.dataclass
class FuseResult(PassResult):
    pass


def fuse(gm: fx.GraphModule) -> FuseResult:
    res = FuseResult("fuse")
    changed: dict[int, fx.GraphModule] = {}
    for mod in graph_modules(gm):
        g = mod.graph
        for node in list(g.nodes):
            if node.graph is not g:  # erased meanwhile
                continue
            if is_call(node, traced.gather_seq) and _fuse_norm(g, node, res):
                changed[id(mod)] = mod
            elif is_call(node, traced.scatter_add_rows) and _fuse_scatter(g, node, res):
                changed[id(mod)] = mod
    finish(gm, changed.values())
    return res


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _ok_of(g: fx.Graph, idx: fx.Node) -> fx.Node | None:
    """The in-range flags that come with a keep-set index: getitem(keep_set(...), 1)."""
    if not (is_call(idx, operator.getitem) and idx.args[1] == 0):
        return None
    for u in idx.args[0].users:
        if is_call(u, operator.getitem) and u.args[1] == 1:
            return u
    return None


def _like(node):
    """The node itself, or for a kept-row copy made by sparsify (no fake value: its sequence length
    differs) the original it was cloned from, which has the same dtype and rank."""
    if isinstance(node, fx.Node) and value_of(node) is None:
        if is_call(node, traced.gather_seq):
            return _like(node.args[0])
        return node.meta.get("lemo_like", node)
    return node


def _dtype(node) -> torch.dtype | None:
    v = value_of(_like(node)) if isinstance(node, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _rank(node) -> int | None:
    s = shape_of(_like(node)) if isinstance(node, fx.Node) else None
    return None if s is None else len(s)


# -------------------------------------------------------------------------------------------------
# gather + RMSNorm
# -------------------------------------------------------------------------------------------------


def _match_norm(gather: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """(output node, weight, eps) of an HF RMSNorm applied to `gather`, else None (read-only)."""
    up = _only_user(gather)
    if up is None or not _is_cast(up, torch.float32):
        return None
    users = list(up.users)
    if len(users) != 2:
        return None
    pw = next((u for u in users if is_call(u, "pow", torch.pow, operator.pow)), None)
    mul = next((u for u in users if is_call(u, operator.mul, torch.mul, "mul")), None)
    if pw is None or mul is None or pw.args[-1] != 2:
        return None
    mean = _only_user(pw)
    if not (mean is not None and is_call(mean, "mean", torch.mean)):
        return None
    dim = mean.kwargs.get("dim", mean.args[1] if len(mean.args) > 1 else None)
    keep = mean.kwargs.get("keepdim", mean.args[2] if len(mean.args) > 2 else False)
    rank = _rank(gather)
    d_axis = -1 if rank is None else rank - 1
    if dim not in (-1, d_axis, (-1,), [-1]) or not keep:
        return None
    add = _only_user(mean)
    if not (add is not None and is_call(add, operator.add, torch.add, "add")):
        return None
    eps = add.args[1] if add.args[0] is mean else add.args[0]
    if not isinstance(eps, float):
        return None
    rs = _only_user(add)
    if not (rs is not None and is_call(rs, torch.rsqrt, "rsqrt")) or _only_user(rs) is not mul:
        return None
    if set(mul.args) != {up, rs}:
        return None
    down = _only_user(mul)
    if down is None or not _is_cast(down, _dtype(gather)):
        return None
    out = _only_user(down)
    if not (out is not None and is_call(out, operator.mul, torch.mul, "mul")):
        return None
    weight = out.args[0] if out.args[1] is down else out.args[1]
    wshape = shape_of(weight) if isinstance(weight, fx.Node) else None
    if wshape is None or len(wshape) != 1 or _dtype(weight) != _dtype(gather):
        return None
    return out, weight, eps


def _is_cast(node: fx.Node, dtype: torch.dtype | None) -> bool:
    if dtype is None:
        return False
    if is_call(node, "float"):
        return dtype == torch.float32
    if is_call(node, "to"):
        target = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
        return target == dtype
    return False


def _fuse_norm(g: fx.Graph, gather: fx.Node, res: FuseResult) -> bool:
    h, idx, axis = gather.args
    if axis != 1:
        return False
    matched = _match_norm(gather)
    if matched is None:
        return False
    out, weight, eps = matched
    ok = _ok_of(g, idx)
    hs, ids = shape_of(h), shape_of(idx)
    # (the kernel checks at run time that h and idx have the same batch; residual streams always do)
    if ok is None or hs is None or len(hs) != 3 or (ids is not None and not _same(hs[0], ids[0])):
        res.skip("fuse_norm", gather.name, "no keep-set flags, or a broadcast batch")
        return False
    with g.inserting_before(out):
        new = g.call_function(ops.gather_rmsnorm, (h, idx, ok, weight, eps))
    new.meta.update({k: v for k, v in out.meta.items() if k == "nn_module_stack"})
    out.replace_all_uses_with(new)
    res.counters["gather_rmsnorm"] += 1
    return True


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


# -------------------------------------------------------------------------------------------------
# GEMM + scatter-add
# -------------------------------------------------------------------------------------------------


def _no_dropout(node: fx.Node) -> bool:
    if not is_call(node, torch.nn.functional.dropout, torch.dropout):
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return p == 0 or training is False


def _fuse_scatter(g: fx.Graph, sc: fx.Node, res: FuseResult) -> bool:
    h, rows, idx, ok = sc.args
    if _only_user(rows) is not sc:
        return False
    # A cast to the dtype the rows already have (PEFT's `result.to(torch_result_dtype)`) is a no-op
    # and so is a dropout of probability 0 (Phi-3's residual dropouts). A cast from fp32 to h's dtype
    # (PEFT's fp32 adapters on a bf16 model: the sum is fp32) is the rounding the kernel does itself.
    while rows.args and isinstance(rows.args[0], fx.Node) and _only_user(rows.args[0]) is rows:
        src = rows.args[0]
        if not (_no_dropout(rows) or _is_cast(rows, _dtype(h)) and _dtype(src) in (_dtype(h), torch.float32)):
            break
        rows = src
    lin, r = None, None
    if is_call(rows, *LINEAR_TARGETS):
        lin = rows
    elif is_call(rows, operator.add, torch.add, "add") and len(rows.args) == 2 and not rows.kwargs:
        a, b = rows.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            a = b = None
        if is_call(a, *LINEAR_TARGETS) and _only_user(a) is rows:
            lin, r = a, b
        elif is_call(b, *LINEAR_TARGETS) and _only_user(b) is rows:
            lin, r = b, a
    if lin is None:
        res.skip("fuse_scatter", sc.name, f"rows {rows.name} are not a linear (+ one branch)")
        return False
    x = lin.args[0]
    w = lin.args[1] if len(lin.args) > 1 else lin.kwargs["weight"]
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    dts = {_dtype(t) for t in (h, x, w, bias) if t is not None}
    r_ok = r is None or _dtype(r) in dts | {torch.float32} and shape_of(_like(r)) == shape_of(_like(lin))
    if len(dts) != 1 or None in dts or not r_ok:
        r_dt = "" if r is None else f", branch {_dtype(r)}"
        res.skip("fuse_scatter", sc.name, f"dtypes {sorted(map(str, dts))}{r_dt} or branch shape differ")
        return False
    with g.inserting_before(sc):
        new = g.call_function(torch.ops.lemo.linear_scatter_add.default, (h, x, w, bias, r, idx, ok))
    new.meta.update({k: v for k, v in sc.meta.items() if k in ("nn_module_stack", "example_value")})
    sc.replace_all_uses_with(new)
    res.counters["linear_scatter_add"] += 1
    return True
