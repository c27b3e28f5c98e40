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

The evaluation never holds the n x n mask when it can avoid it: if the mask's rows come from one
`arange` through row-local operations only (elementwise ops, broadcasting, None/slice indexing,
indexing another constant by it, expand) — HF's mask functions are of that form — the subgraph is
evaluated for a band of rows at a time, with that arange replaced by the band's positions, which is
the same computation restricted to those rows. Otherwise the whole mask is evaluated when it is at
most `FULL_EVAL_BYTES`, and left alone (with a reason) when larger.

A graph with a dynamic sequence length (the second length a loop runs: Dynamo then compiles one graph
for every length) builds the mask from that length, a symbolic size, and HF never skips it there. Its
mask is a function of the length only, so the check runs it at several lengths: every row at the
length traced, at small lengths (1 to 257) and at a few large ones (4K to 2M) the first, middle and
last rows, where a sliding window, a chunked or a prefix pattern shows; the graph also gets a guard
(length <= DYNAMIC_MAX_LENGTH), so a longer sequence compiles again and is checked again. Without this
the dynamic graph kept an n x n mask: n^2 memory, SDPA's masked kernel, and on CUDA a new compile for
every length (benchmarks/results/compile_time_1b_varying.json).

Masks that read an input (a user `attention_mask`, packed-sequence `position_ids`) and sliding-window
masks are left alone with a SkipReason (passes.masks reads the first kind). Call it before
passes.detect: token elimination then works on the causal form (kept indices are sorted, so causal
order on the compacted rows is causal order on the original positions).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .common import (SDPA_TARGETS, PassResult, attention_dropout, finish, hop_graphs, is_call, producers, same_size,
                     sdpa_mask, shape_of, size_hint, static_nbytes, value_of)


# Largest mask evaluated whole when its rows cannot be evaluated band by band.
FULL_EVAL_BYTES = 1 << 31
# Elements of one band of rows (rows x n) evaluated at a time.
BAND_ELEMENTS = 1 << 28


# A mask left in place that is at least this large is worth a warning (the backend logs it).
LARGE_MASK_BYTES = 1 << 30

# Dynamic sequence lengths: masks are checked (every row) at these lengths, at the largest ones (first,
# middle and last rows) -- a graph whose mask was proven causal so is guarded to this length at most.
DYNAMIC_SMALL_LENGTHS = (1, 2, 3, 17, 64, 65, 257)
DYNAMIC_LARGE_LENGTHS = (4097, 16387, 65536, 262147, 1 << 20, 1 << 21)
DYNAMIC_MAX_LENGTH = 1 << 21
DYNAMIC_BAND_ROWS = 16


@dataclasses.dataclass
class CausalResult(PassResult):
    # bytes of the largest mask left in place (0 when every mask was made causal or there was none)
    largest_mask_left: int = 0


def make_causal(gm: fx.GraphModule) -> CausalResult:
    res = CausalResult("causal")
    verdicts: dict[fx.Node, str | None] = {}  # outer mask node -> None (causal) or why not
    changed = []
    for mod, outer_of in hop_graphs(gm):
        for node in list(mod.graph.nodes):
            if not is_call(node, *SDPA_TARGETS):
                continue
            mask = sdpa_mask(node)
            if mask is None:
                continue
            src = outer_of(mask)
            if src not in verdicts:
                verdicts[src] = why_not_causal(gm, src)
            why = verdicts[src] or _why_not_square(node)
            if why:
                res.skip("mask_not_causal", node.name, why)
                res.largest_mask_left = max(res.largest_mask_left, static_nbytes(src))
                continue
            _set_causal(node)
            res.counters["sdpa_made_causal"] += 1
            changed.append(mod)
    finish(gm, changed, dead_code=False)
    return res


def _why_not_square(node: fx.Node) -> str | None:
    q, k = shape_of(node.args[0]), shape_of(node.args[1])
    if q is None or k is None:
        return "query/key shapes are unknown"
    if not same_size(q[-2], k[-2]):
        return f"query length {q[-2]} != key length {k[-2]} (is_causal would align top-left)"
    if attention_dropout(node) not in (0, 0.0):
        return "attention dropout"
    return None


def why_not_causal(gm: fx.GraphModule, mask: fx.Node) -> str | None:
    if mask.graph is not gm.graph:
        return "mask is computed outside the root graph"
    shp = shape_of(mask)
    if shp is None or len(shp) != 4:
        return "mask is not 4-D"
    if not same_size(shp[-1], shp[-2]):
        return f"mask is {shp[-2]} x {shp[-1]}, not square"
    nodes = producers(mask)
    if isinstance(nodes, str):
        return f"mask {nodes}"
    for n in nodes:
        if n.op == "placeholder" and isinstance(value_of(n), torch.Tensor):
            return f"mask depends on the input {n.name} (an attention_mask or position_ids)"
        if n.op not in ("placeholder", "call_function", "call_method", "get_attr"):
            return f"mask depends on {n.op} {n.name}"
    if not all(isinstance(s, int) for s in shp):
        return _why_not_causal_dynamic(gm, nodes, mask)
    if any(n.op == "placeholder" for n in nodes):
        return "mask reads a symbolic size, but its shape is static"
    n = shp[-1]
    bands = row_bands(gm, nodes, mask, n)
    try:
        if bands is not None:
            step = max(1, BAND_ELEMENTS // n)
            for r0 in range(0, n, step):
                why = _compare_causal(bands(r0, min(step, n - r0)), r0)
                if why:
                    return why
            return None
        numel = shp[0] * shp[1] * n * n
        if numel > FULL_EVAL_BYTES:
            return (f"mask rows are not row-local in one arange and the whole mask ({numel / 2**30:.1f} GiB) "
                    f"is too large to evaluate at compile time")
        return _compare_causal(_evaluate(gm, nodes, mask), 0)
    except Exception as e:  # anything odd: leave the mask alone
        return f"could not evaluate the mask ({type(e).__name__}: {e})"


def _why_not_causal_dynamic(gm: fx.GraphModule, nodes: list[fx.Node], mask: fx.Node) -> str | None:
    """why_not_causal for a mask whose length is symbolic (see the module doc): None, and the graph
    guarded to DYNAMIC_MAX_LENGTH, when the mask is causal at every length checked."""
    shp = shape_of(mask)
    length = shp[-1]
    scalars = {p: value_of(p) for p in nodes if p.op == "placeholder"}
    sym = [p for p, v in scalars.items() if same_size(v, length)]
    if len(sym) != 1 or any(same_size(shp[i], length) for i in (0, 1)):
        return f"mask shape {tuple(shp)}: its length is not one symbolic size lemo can vary"
    traced_length = size_hint(length)
    if traced_length is None or traced_length > DYNAMIC_MAX_LENGTH:
        return f"mask length {length} has no hint at most {DYNAMIC_MAX_LENGTH}"
    others = {p: size_hint(v) for p, v in scalars.items() if p is not sym[0]}
    if any(v is None for v in others.values()):
        return "mask reads a symbolic size without a hint"
    bands = row_bands(gm, nodes, mask, length, inputs=(sym[0],), fixed=others)
    if bands is None:
        return "mask rows of a dynamic length are not row-local in one arange"
    try:
        for n in sorted({traced_length, *DYNAMIC_SMALL_LENGTHS, *DYNAMIC_LARGE_LENGTHS}):
            full = n == traced_length or n in DYNAMIC_SMALL_LENGTHS
            step = max(1, BAND_ELEMENTS // n) if full else DYNAMIC_BAND_ROWS
            starts = range(0, n, step) if full else sorted({0, max(0, n // 2 - step // 2), max(0, n - step)})
            for r0 in starts:
                why = _compare_causal(bands(r0, min(step, n - r0), n), r0)
                if why:
                    return f"at length {n}: {why}"
    except Exception as e:  # anything odd: leave the mask alone
        return f"could not evaluate the mask ({type(e).__name__}: {e})"
    # proven up to DYNAMIC_MAX_LENGTH: the comparison, evaluated on the symbolic size, becomes a guard
    # (true at the traced length), so a longer sequence compiles again
    bool(length <= DYNAMIC_MAX_LENGTH)
    return None


def nodes_as_module(gm: fx.GraphModule, nodes: list[fx.Node], out: fx.Node, inputs: tuple = (),
                    fixed: dict | None = None, band: tuple | None = None) -> fx.GraphModule:
    """`nodes` (ancestors of `out`, in graph order) as a module of (*inputs[, band positions]): nodes in
    `fixed` become those constants; with band = (arange, rows of _propagate_rows) that arange becomes
    the last argument and the expands along the row axis keep the band's own row count."""
    g = fx.Graph()
    env: dict[fx.Node, object] = {x: g.placeholder(f"input_{i}") for i, x in enumerate(inputs)}
    if band is not None:
        env[band[0]] = g.placeholder("band")
    env.update(fixed or {})
    for node in nodes:
        if node in env:
            continue
        new = g.node_copy(node, lambda a: env[a])
        if band is not None and node.op == "call_method" and node.target == "expand" and node in band[1]:
            new.args = _expand_args_for_band(new.args, band[1][node])
        env[node] = new
    g.output(env[out])
    return fx.GraphModule(gm, g)


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], out: fx.Node) -> torch.Tensor:
    with torch.no_grad():
        return nodes_as_module(gm, nodes, out)()


# Row-local operations: row i of the output depends only on row i of the row-indexed inputs.
_ELEMENTWISE_FNS = {
    operator.add, operator.sub, operator.mul, operator.and_, operator.or_, operator.xor, operator.invert,
    operator.neg, operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
    torch.add, torch.sub, torch.mul, torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne,
    torch.logical_and, torch.logical_or, torch.logical_not, torch.bitwise_and, torch.bitwise_or,
    torch.bitwise_not, torch.where,
}
_ELEMENTWISE_METHODS = {
    "to", "bool", "int", "long", "float", "type_as", "__and__", "__or__", "__invert__", "le", "lt", "ge",
    "gt", "eq", "ne", "add", "sub", "mul", "logical_and", "logical_or", "logical_not",
    # Dynamo records some operators as tensor dunder methods (on CUDA, HF's packed-sequence mask
    # `a == b` comes out as call_method __eq__ where the CPU trace has operator.eq)
    "__eq__", "__ne__", "__le__", "__lt__", "__ge__", "__gt__", "__add__", "__radd__", "__sub__", "__rsub__",
    "__mul__", "__rmul__", "__xor__", "__rand__", "__ror__", "__rxor__", "__neg__",
}


def _right_axis(t_shape, axis_from_right: int) -> int | None:
    """Size of a shape at a right-aligned axis (-1 = last), None when the shape has no such axis."""
    return t_shape[axis_from_right] if len(t_shape) >= -axis_from_right else None


def _probe_axis(shape, axis: int, index) -> int | None:
    """Where axis `axis` (right-aligned) of a tensor of `shape` lands after basic indexing `index`
    (None / full slices / Ellipsis only): found by indexing a tiny tensor."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or i == slice(None) for i in items):
        return None
    probe_shape = [1] * len(shape)
    probe_shape[axis] = 2
    out = torch.empty(probe_shape)[index]
    hits = [i for i, s in enumerate(out.shape) if s == 2]
    return hits[0] - out.dim() if len(hits) == 1 else None


def _propagate_rows(nodes: list[fx.Node], start: fx.Node, n: int) -> dict[fx.Node, int] | None:
    """Right-aligned row axis of every node that depends on `start` (a length-n arange), if each is
    row-local in it; None as soon as one is not."""
    rows: dict[fx.Node, int] = {start: -1}
    for node in nodes[nodes.index(start) + 1:]:
        ins = [a for a in node.all_input_nodes if a in rows]
        if not ins:
            continue
        axes = {rows[a] for a in ins}
        if len(axes) != 1:
            return None
        axis = axes.pop()
        shp = shape_of(node)
        if shp is None:
            return None
        others = [a for a in node.all_input_nodes if a not in rows]
        if node.op == "call_function" and node.target is operator.getitem:
            src, index = node.args
            if src in rows:  # basic indexing of a row-indexed tensor
                if any(isinstance(i, fx.Node) for i in (index if isinstance(index, tuple) else (index,))):
                    return None
                axis = _probe_axis(shape_of(src), rows[src], index)
            else:  # a constant indexed by row-indexed index tensors (advanced indexing, all dims)
                items = index if isinstance(index, tuple) else (index,)
                if not all(isinstance(i, fx.Node) for i in items) or len(items) != len(shape_of(src)):
                    return None
                others = [i for i in items if i not in rows]
        elif node.op == "call_method" and node.target == "expand":
            pass  # sizes at the row axis are rewritten to -1 for a band
        elif node.op == "call_method" and node.target == "unsqueeze":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if not isinstance(dim, int):
                return None
            out_ndim = len(shp)
            pos = out_ndim - 1 + axis  # the row axis, counted from the front, in the input
            insert = dim if dim >= 0 else dim + out_ndim
            axis = (pos + (insert <= pos)) - out_ndim
        elif node.op == "call_method" and node.target in ("new_ones", "new_zeros", "new_full", "new_empty"):
            continue  # a fresh constant: reads only the dtype and device of the row-indexed tensor
        elif node.op == "call_function" and node.target in _ELEMENTWISE_FNS:
            pass
        elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            pass
        else:
            return None
        if axis is None or not same_size(_right_axis(shp, axis), n):
            return None
        for o in others:  # broadcast partners must not vary along the row axis
            oshp = shape_of(o)
            if oshp is not None and _right_axis(oshp, axis) is not None and not same_size(_right_axis(oshp, axis), 1):
                return None
        rows[node] = axis
    return rows


def row_bands(gm: fx.GraphModule, nodes: list[fx.Node], mask: fx.Node, n: int, inputs: tuple = (),
              fixed: dict | None = None):
    """A function (r0, rows, *input values) -> mask[..., r0:r0 + rows, :], computed without the rest of
    the mask, or None when no arange of the subgraph indexes the mask's rows row-locally. `inputs` and
    `fixed` as in nodes_as_module."""
    for a in nodes:
        if not (is_call(a, torch.arange) and len(shape_of(a) or ()) == 1 and same_size(shape_of(a)[0], n)):
            continue
        bounds = _arange_bounds(a, n)
        rows = _propagate_rows(nodes, a, n) if bounds is not None else None
        if rows is None or rows.get(mask) != -2:
            continue
        fn = nodes_as_module(gm, nodes, mask, inputs, fixed, band=(a, rows))
        start, kwargs = bounds

        def evaluate(r0: int, count: int, *values, fn=fn, start=start, kwargs=kwargs) -> torch.Tensor:
            with torch.no_grad():
                return fn(*values, torch.arange(start + r0, start + r0 + count, **kwargs))

        return evaluate
    return None


def _arange_bounds(node: fx.Node, n):
    """(start, kwargs) of `torch.arange(n)` / `torch.arange(start, start + n)` with unit step; n may be a
    symbolic size (then only `torch.arange(n)`, n a graph input)."""
    args = node.args
    if len(args) == 1 and isinstance(args[0], fx.Node) and args[0].op == "placeholder" \
            and same_size(value_of(args[0]), n):
        start = 0
    elif not all(isinstance(x, int) for x in args):
        return None
    elif len(args) == 1:
        start = 0
    elif len(args) == 2 and args[1] - args[0] == n:
        start = args[0]
    else:
        return None
    kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "device")}
    if set(node.kwargs) - {"dtype", "device", "requires_grad"} or node.kwargs.get("requires_grad"):
        return None
    return start, kwargs


def _expand_args_for_band(args: tuple, axis: int) -> tuple:
    src, *sizes = args
    nested = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    sizes = list(sizes[0] if nested else sizes)
    sizes[axis] = -1  # keep the band's own row count
    return (src, tuple(sizes)) if nested else (src, *sizes)


def _compare_causal(m: torch.Tensor, r0: int) -> str | None:
    """None if rows r0.. of a mask, m (..., rows, n), allow exactly the causal pattern: bool (True =
    attend), or additive (0 = attend, at most the dtype's minimum / 2 = blocked). Compared in chunks."""
    if m.dtype != torch.bool and not m.is_floating_point():
        return f"mask dtype {m.dtype}"
    n = m.shape[-1]
    cols = torch.arange(n, device=m.device)
    low = torch.finfo(m.dtype).min / 2 if m.is_floating_point() else None
    for c0 in range(0, m.shape[-2], 2048):
        rows = m[..., c0:c0 + 2048, :]
        first = r0 + c0
        causal = cols[None, :] <= torch.arange(first, first + rows.shape[-2], device=m.device)[:, None]
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
