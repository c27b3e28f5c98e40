"""passes.seq_axis — which axis of each value in a decoder block is the sequence axis.

`propagate(node, axes, m)` takes the axes of a node's inputs (`axes`: node -> axis, for the values that
carry the sequence) and returns the axis of its output, with the node's arguments rewritten for a
sequence of m rows (view/reshape/expand sizes on that axis become m). `passes.sparsify` uses it to clone
a block onto the kept rows, and to check beforehand that it can.

Known ops (views, transposes, reductions, concatenation, linear, SDPA, a list of elementwise ops) are
followed by their meaning. Any other op is probed (`probe_axis`): it runs on small random tensors shaped
like its inputs, once on 6 positions and once on 3 of them, and is followed only when exactly one output
axis shrinks with the positions and the 3-row output equals those rows of the 6-row output; ops that mix
positions (softmax or cumsum over the sequence, top-k along it, sizes baked from the sequence length)
fail that test and make the layer a SkipReason.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .common import LINEAR_TARGETS, SDPA_TARGETS, CantRewrite, is_call, op_name, same_size, shape_of, size_hint, value_of


_ELEMENTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt,
    torch.exp, torch.tanh, torch.sigmoid, torch.where, torch.clamp, torch.abs, F.silu, F.gelu, F.relu,
    F.dropout, torch.nn.functional.softplus, torch.erf, torch.cos, torch.sin,
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "to", "float",
    "half", "bfloat16", "type", "type_as", "contiguous", "clone", "detach", "clamp", "abs", "masked_fill",
    "__mul__", "__add__", "__sub__", "__truediv__", "__neg__", "__radd__", "__rmul__", "silu", "relu", "gelu",
    "cos", "sin", "erf",
}
_VIEWS = ("view", "reshape", "_unsafe_view", torch.reshape)
_REDUCTIONS = ("mean", "sum", "amax", "amin", "var", "std", "norm", torch.mean, torch.sum, torch.amax,
               torch.var, torch.std, torch.norm)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# Sequence parallelism (lemo_compile.sequence_parallel, Ulysses layout): an all-to-all with equal splits
# along axis 0 trades slices of the sequence between ranks. Every rank compacts to the same m rows, and
# slices are contiguous and in rank order, so the exchange keeps each row's place on the sequence axis
# and axis 0 of its output counts source ranks. A reshape that merges that rank axis into the sequence
# axis just after it gives the global sequence (P x m rows, sorted); the inverse reshape splits it back.
# Side facts ride in `axes` under tuple keys: ("rank", node) -> its rank axis, ("global", node) -> P.


def is_all_to_all(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node.target).endswith("::all_to_all_single")


def _is_wait(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node.target).endswith("::wait_tensor")


def propagate(node: fx.Node, axes: dict, m: fx.Node) -> tuple[Any, tuple, dict]:
    """Sequence axis of `node`'s output given its inputs' axes, and its args rewritten for m rows."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if src is not None and src in axes and (is_all_to_all(node) or _is_wait(node)):
        a = axes[src]
        if is_all_to_all(node):
            splits = [x for x in node.args[1:3] if x is not None]
            if a == 0 or any(not isinstance(x, (list, tuple)) or len(set(x)) != 1 for x in splits):
                raise CantRewrite("sequence_axis", f"cannot follow the sequence axis through {node.name} (all-to-all): "
                                  "it splits the sequence axis or unequally")
            axes[("rank", node)] = 0
        else:
            _carry(axes, src, node, same=True)
        return a, node.args, dict(node.kwargs)
    if src is not None and src in axes and is_call(node, *_VIEWS):
        got = _rank_view(node, axes, m)
        if got is not None:
            return got
    ax, args, kwargs = _propagate(node, axes, m)
    if ax is not None and src is not None:
        if is_call(node, "transpose", torch.transpose, "permute", torch.permute, "contiguous", "clone", "to"):
            _carry(axes, src, node, same=False)
        elif ("global", src) in axes and (is_call(node, *SDPA_TARGETS) or node.target in _ELEMENTWISE):
            axes[("global", node)] = axes[("global", src)]
    return ax, args, kwargs


def _carry(axes: dict, src: fx.Node, node: fx.Node, same: bool) -> None:
    """Move src's rank axis / global flag to node through a data movement (transpose, permute) or identity."""
    if ("global", src) in axes:
        axes[("global", node)] = axes[("global", src)]
    r = axes.get(("rank", src))
    if r is None:
        return
    if not same and is_call(node, "transpose", torch.transpose):
        nd = len(shape_of(src))
        d0, d1 = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
        r = d1 if r == d0 else d0 if r == d1 else r
    elif not same and is_call(node, "permute", torch.permute):
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        r = [_norm_dim(d, len(dims)) for d in dims].index(r)
    axes[("rank", node)] = r


def _rank_view(node: fx.Node, axes: dict, m: Any):
    """A reshape that merges a rank axis into the sequence axis after it (the global sequence), or splits a
    global sequence axis into (ranks, rows); None for any other view."""
    src = node.args[0]
    a, in_shape, out_shape = axes[src], shape_of(src), shape_of(node)
    sizes, tuple_form = _sizes(node.args)
    sizes = list(sizes)
    r = axes.get(("rank", src))
    if r is not None and r == a - 1:
        p = in_shape[r]
        for j in range(len(out_shape)):
            if same_size(out_shape[j], p * in_shape[a]) and same_size(_prod(out_shape[:j]), _prod(in_shape[:r])):
                if m is not None and not (isinstance(sizes[j], int) and sizes[j] == -1):
                    sizes[j] = m * p if not isinstance(m, fx.Node) else m.graph.call_function(operator.mul, (m, p))
                axes[("global", node)] = p
                return j, _with_sizes(node.args, sizes, tuple_form), dict(node.kwargs)
    p = axes.get(("global", src))
    if p is not None:
        for j in range(len(out_shape) - 1):
            if (same_size(out_shape[j], p) and same_size(out_shape[j] * out_shape[j + 1], in_shape[a])
                    and same_size(_prod(out_shape[:j]), _prod(in_shape[:a]))):
                if m is not None and not (isinstance(sizes[j + 1], int) and sizes[j + 1] == -1):
                    sizes[j + 1] = m
                axes[("rank", node)] = j
                return j + 1, _with_sizes(node.args, sizes, tuple_form), dict(node.kwargs)
    return None


def _propagate(node: fx.Node, axes: dict, m: fx.Node) -> tuple[Any, tuple, dict]:
    args, kwargs = node.args, dict(node.kwargs)
    tracked = [a for a in node.all_input_nodes if a in axes]
    if not tracked:
        return None, args, kwargs
    t = node.target
    out_shape = shape_of(node)
    val = value_of(node)

    def fail(why: str):
        raise CantRewrite("sequence_axis", f"cannot follow the sequence axis through {node.name} "
                          f"({getattr(t, '__name__', t)}): {why}")

    if is_call(node, *_VIEWS):
        src = args[0]
        a = axes.get(src)
        if a is None:
            return None, args, kwargs
        sizes, tuple_form = _sizes(args)
        j = _match_view_axis(shape_of(src), a, out_shape)
        if j is None:
            fail("the sequence dimension is merged or split")
        sizes = list(sizes)
        if not (isinstance(sizes[j], int) and sizes[j] == -1):
            sizes[j] = m
        return j, _with_sizes(args, sizes, tuple_form), kwargs
    if is_call(node, "new_empty", "new_zeros", "new_ones"):
        # a buffer shaped like its source (DeepSeek's MLA key, filled slice by slice): its size on the
        # sequence axis becomes m; the values come from the in-place writes that follow
        a = axes.get(args[0])
        sizes, tuple_form = _sizes(args)
        j = _match_view_axis(shape_of(args[0]), a, out_shape)
        if j is None:
            fail("its output sizes do not keep the source's sequence axis")
        sizes = list(sizes)
        sizes[j] = m
        return j, _with_sizes(args, sizes, tuple_form), kwargs
    if is_call(node, "expand"):
        a = axes.get(args[0])
        sizes, tuple_form = _sizes(args)
        j = a + len(sizes) - len(shape_of(args[0]))
        sizes = list(sizes)
        if not (isinstance(sizes[j], int) and sizes[j] == -1):
            sizes[j] = m
        return j, _with_sizes(args, sizes, tuple_form), kwargs
    if is_call(node, "transpose", torch.transpose):
        a = axes[args[0]]
        nd = len(shape_of(args[0]))
        d0, d1 = _norm_dim(args[1], nd), _norm_dim(args[2], nd)
        return (d1 if a == d0 else d0 if a == d1 else a), args, kwargs
    if is_call(node, "permute", torch.permute):
        a = axes[args[0]]
        dims = args[1] if isinstance(args[1], (tuple, list)) else args[1:]
        nd = len(dims)
        return [_norm_dim(d, nd) for d in dims].index(a), args, kwargs
    if is_call(node, "unsqueeze", torch.unsqueeze):
        a = axes[args[0]]
        d = _norm_dim(args[1], len(out_shape))
        return (a + 1 if d <= a else a), args, kwargs
    if is_call(node, operator.getitem):
        src = args[0]
        if isinstance(value_of(src), (tuple, list)):
            return axes.get(src), args, kwargs
        return _getitem_axis(axes[src], args[1], len(shape_of(src)), fail), args, kwargs
    if is_call(node, "chunk", "split", torch.chunk, torch.split, "unbind"):
        a = axes[args[0]]
        nd = len(shape_of(args[0]))
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        if _norm_dim(dim, nd) == a:
            fail("split along the sequence")
        return a, args, kwargs
    if is_call(node, *_REDUCTIONS):
        a = axes[args[0]]
        nd = len(shape_of(args[0]))
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None:
            fail("reduction over every axis")
        dims = [_norm_dim(d, nd) for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        if a in dims:
            fail("reduction over the sequence")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        return (a if keep else a - sum(d < a for d in dims)), args, kwargs
    if is_call(node, *SDPA_TARGETS):
        return axes.get(args[0]), args, kwargs
    if is_call(node, *LINEAR_TARGETS):
        if any(a in axes for a in args[1:]):
            fail("weights on the sequence axis")
        return axes.get(args[0]), args, kwargs
    if is_call(node, torch.cat, torch.concat, "cat"):
        seq = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        ax = {axes[x] for x in seq if isinstance(x, fx.Node) and x in axes}
        if len(ax) != 1 or any(isinstance(x, fx.Node) and x not in axes and isinstance(value_of(x), torch.Tensor)
                               for x in seq):
            fail("concatenating tensors with and without the sequence axis")
        a = ax.pop()
        if _norm_dim(dim, len(out_shape)) == a:
            fail("concatenation along the sequence")
        return a, args, kwargs
    if is_call(node, "size", "dim"):
        return None, args, kwargs
    if node.op in ("call_function", "call_method") and (t in _ELEMENTWISE):
        if not isinstance(val, torch.Tensor):
            return None, args, kwargs
        out_nd = val.dim()
        cand = {axes[a] + out_nd - len(shape_of(a)) for a in tracked if shape_of(a) is not None}
        if len(cand) != 1:
            fail("inputs disagree on the sequence axis")
        # untracked tensor operands must broadcast along the sequence axis (size 1 or absent)
        j = cand.pop()
        for a in node.all_input_nodes:
            if a in axes or not isinstance(value_of(a), torch.Tensor):
                continue
            shp = shape_of(a)
            k = j - (out_nd - len(shp))
            if 0 <= k < len(shp) and not same_size(shp[k], 1):
                fail(f"operand {a.name} is full length on the sequence axis but not compacted")
        return j, args, kwargs
    return probe_axis(node, axes, fail), args, kwargs


def _sizes(args: tuple) -> tuple[tuple, bool]:
    if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)):
        return tuple(args[1]), True
    return tuple(args[1:]), False


def _with_sizes(args: tuple, sizes: list, tuple_form: bool) -> tuple:
    return (args[0], tuple(sizes)) if tuple_form else (args[0], *sizes)


def _prod(xs) -> Any:
    p = 1
    for x in xs:
        p = p * x
    return p


def _match_view_axis(in_shape, a: int, out_shape) -> int | None:
    """Output axis j that is exactly input axis a (same size, same product of the sizes before it)."""
    before = _prod(in_shape[:a])
    for j in range(len(out_shape)):
        if same_size(out_shape[j], in_shape[a]) and same_size(_prod(out_shape[:j]), before):
            return j
    return None


def _getitem_axis(a: int, index: Any, nd: int, fail) -> int:
    items = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for x in items if x is not None and x is not Ellipsis)
    i_in, i_out = 0, 0
    for x in items:
        if x is Ellipsis:
            span = nd - n_real
            if i_in <= a < i_in + span:
                return i_out + (a - i_in)
            i_in += span
            i_out += span
        elif x is None:
            i_out += 1
        elif isinstance(x, slice):
            if i_in == a:
                if not (x.start in (None, 0) and x.stop is None and x.step in (None, 1)):
                    fail("slicing the sequence axis")
                return i_out
            i_in += 1
            i_out += 1
        elif isinstance(x, int):
            if i_in == a:
                fail("indexing the sequence axis")
            i_in += 1
        else:
            fail("advanced indexing")
    return i_out + (a - i_in)


# -------------------------------------------------------------------------------------------------
# ops without a rule: probed
# -------------------------------------------------------------------------------------------------

_PROBE_ROWS = 6
_PROBE_KEPT = (0, 2, 5)
_PROBE_MAX_NUMEL = 1 << 24  # elements over all probe inputs (an untracked weight can be large)


def probe_axis(node: fx.Node, axes: dict, fail) -> int:
    """The output's sequence axis of an op without a rule, found by running it: on random inputs with
    _PROBE_ROWS positions on each tracked input's axis, and on _PROBE_KEPT of them. The op is followed
    when every tensor it returns has exactly one axis that goes from 6 to 3 with the positions, all its
    other sizes unchanged, and the 3-position result equals the kept positions of the 6-position one
    (so no position reads another, and no size comes from the sequence length). Calls `fail` otherwise."""
    if node.op not in ("call_function", "call_method"):
        fail("unsupported op")
    if is_collective(node.target):  # never run one on a probe: ranks that do not probe alike would hang
        fail("a collective exchanges positions between ranks")
    kept = torch.tensor(_PROBE_KEPT)
    gen = torch.Generator().manual_seed(0)
    full: dict[fx.Node, Any] = {}
    small: dict[fx.Node, Any] = {}
    for a in node.all_input_nodes:
        v = value_of(a)
        if isinstance(v, torch.Tensor):
            shape = [size_hint(s) for s in v.shape]
            if None in shape:
                fail("unsupported op (an input has a size without a hint)")
            if a in axes:
                shape[axes[a]] = _PROBE_ROWS
            # on the value's device: an op may only run there (a Triton kernel inside a fused Function)
            full[a] = _random(shape, v.dtype, gen).to(v.device if v.device.type != "meta" else "cpu")
            small[a] = full[a].index_select(axes[a], kept.to(full[a].device)) if a in axes else full[a]
        elif isinstance(v, (bool, int, float)) and not isinstance(v, torch.SymInt):
            full[a] = small[a] = v
        elif a.op == "get_attr" and isinstance(body := getattr(a.graph.owning_module, a.target, None), fx.GraphModule):
            full[a] = small[a] = body  # a higher-order op's body (an autograd.Function's forward and backward)
        else:
            fail(f"unsupported op (input {a.name} is {type(v).__name__}, not a tensor or a constant)")
    if sum(t.numel() for t in full.values() if isinstance(t, torch.Tensor)) > _PROBE_MAX_NUMEL:
        fail("unsupported op (its inputs are too large to probe)")
    try:
        out_full, out_small = _run(node, full), _run(node, small)
    except Exception as e:  # noqa: BLE001 - any failure of the op on the probe means "not followed"
        fail(f"unsupported op (probe failed: {type(e).__name__}: {str(e)[:120]})")
    outs_full = out_full if isinstance(out_full, (tuple, list)) else (out_full,)
    outs_small = out_small if isinstance(out_small, (tuple, list)) else (out_small,)
    found = set()
    for o, p in zip(outs_full, outs_small):
        if not (isinstance(o, torch.Tensor) and isinstance(p, torch.Tensor)) or o.dim() != p.dim():
            fail("unsupported op (it returns something other than tensors that follow the positions)")
        moved = [j for j in range(o.dim()) if o.shape[j] != p.shape[j]]
        if len(moved) != 1 or (o.shape[moved[0]], p.shape[moved[0]]) != (_PROBE_ROWS, len(_PROBE_KEPT)):
            fail("its output sizes do not follow the positions one to one")
        if not _same(o.index_select(moved[0], kept.to(o.device)), p):
            fail("it mixes positions (the output at a position depends on other positions)")
        found.add(moved[0])
    if len(found) != 1:
        fail("its outputs disagree on the sequence axis")
    return found.pop()


def is_collective(target: Any) -> bool:
    """A torch.distributed communication op (functional collectives and their c10d ops)."""
    if "c10d" in op_name(target).split("::")[0]:
        return True
    return (getattr(target, "__module__", None) or "").startswith("torch.distributed")


def _random(shape: list[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    return torch.randint(0, 4, shape, generator=gen, dtype=dtype)


def run_concrete(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """node's op on the values of env; an argument outside env takes its traced value (a static size)."""
    return _run(node, env, fallback=True)


def _run(node: fx.Node, env: dict[fx.Node, Any], fallback: bool = False) -> Any:
    def arg(a):
        if a in env or not fallback:
            return env[a]
        v = value_of(a)
        if not isinstance(v, (int, float, bool)):
            raise ValueError(f"{a.name} has no static value")
        return v

    args = fx.map_arg(node.args, arg)
    kwargs = fx.map_arg(node.kwargs, arg)
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)  # in-place ops
    # manual_seed reseeds every CUDA device too: restore theirs as well, or a compile would reset the
    # user's dropout stream
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        tol = 1e-5 if a.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else 2e-2
        return torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True)
    return torch.equal(a, b)
