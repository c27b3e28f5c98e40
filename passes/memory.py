"""passes.memory — a static liveness estimate of peak memory over the AOT forward and backward graphs.

Read-only. It walks the forward graph in order, then the backward graph, and keeps the bytes of every
live buffer; sizes come from each node's fake value (`meta["val"]`), so nothing runs. The model:

    forward placeholders, get_attr constants  resident: counted once at the start (`inputs_bytes`)
    a computing node                          allocates its output(s), rounded up to 512 bytes
    a view / alias / in-place op              allocates nothing; its base lives as long as it does
    a buffer                                  is freed after the last user of any alias of it
    forward outputs the backward reads        cross the boundary and live until their last backward use
    other forward outputs                     held by the caller to the end (`out.logits` while
                                              `out.loss.backward()` runs)
    tangents                                  allocated at the start of the backward
    backward outputs (gradients)              live to the end

With a dynamic sequence length the sizes are sympy formulas in that length (`s27`, ...), every
timeline point is a formula, and the estimate can be evaluated at any length (`at`) or inverted
(`max_length`): the longest context that fits a budget, before a run.

    est = estimate(fw_graph, bw_graph)
    est.format()                    # peak 3.1 GiB in backward at mm_41, top live tensors, formula
    est.at(s27=32768)               # bytes at another length
    est.max_length(80 * 2**30, "s27")

What it is not: it knows nothing of the allocator's fragmentation, of workspaces kernels allocate
internally (cuBLAS, SDPA), or of what the caller keeps outside the graphs (pass those as `resident`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import operator
import os
from typing import Any, Iterable, Union

import sympy
import torch
import torch.fx as fx

from lemo_compile import _compat

log = logging.getLogger(__name__)

Size = Union[int, sympy.Expr]

GRANULE = 512  # CUDA caching allocator rounds every block up to a multiple of 512 bytes
GIB = 2 ** 30
FORWARD, BACKWARD = "forward", "backward"
# Hint for a size symbol without one (data-dependent, "unbacked"): Inductor's own fallback
# (torch._inductor.config.unbacked_symint_fallback).
UNBACKED_FALLBACK = 8192

# ATen ops whose output always shares its input's storage. Ops whose schema says "may alias"
# (reshape, contiguous, flatten: `Tensor(a) self -> Tensor(a)`) are decided per node by comparing
# fake storages, since they copy when the input's strides do not allow a view.
_VIEW_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "expand", "expand_as", "permute", "t", "transpose",
    "slice", "select", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "diagonal", "narrow",
    "unfold", "split", "split_with_sizes", "unbind", "chunk", "view_as_real", "view_as_complex",
    "real", "imag", "view_as", "lift_fresh",
})
_END = math.inf  # last use of a buffer held to the end of the step


@dataclasses.dataclass
class MemoryEstimate:
    """Peak live bytes over one training step's forward then backward graph.

    Sizes (`peak_bytes`, `inputs_bytes`, `saved_bytes`, `resident`) are ints, or sympy formulas
    when the graphs have symbolic sizes; `timeline` and `live_at_peak` are ints evaluated at `hints`.
    """

    peak_bytes: Size  # formula of the timeline point that is largest at `hints`
    peak_graph: str  # "forward" or "backward"
    peak_node: str  # name of the node running at the peak ("(inputs)"/"(tangents)" at a graph start)
    live_at_peak: list[tuple[str, int, str]]  # (node, bytes, graph) of graph-allocated buffers, largest first
    timeline: list[tuple[str, str, int]]  # (graph, node, live bytes incl. resident and inputs)
    inputs_bytes: Size  # forward placeholders and constants (parameters, caller's activations)
    saved_bytes: Size  # distinct forward-allocated buffers the backward reads (inputs excluded)
    resident: Size = 0  # bytes the caller said live outside the graphs
    hints: dict[str, int] = dataclasses.field(default_factory=dict)  # symbol name -> value used
    candidates: tuple[Size, ...] = ()  # every distinct timeline formula; the peak is their max
    unsized: tuple[str, ...] = ()  # nodes without a fake value, counted as 0 bytes
    host_bytes: Size = 0  # activations offloaded to host memory (LemoConfig.offload); not in the peak

    @property
    def symbols(self) -> tuple[str, ...]:
        """Names of the size symbols the peak depends on."""
        names = set()
        for c in self.candidates:
            if isinstance(c, sympy.Expr):
                names.update(s.name for s in c.free_symbols)
        return tuple(sorted(names))

    @property
    def peak_hint(self) -> int:
        """The peak in bytes at `hints`."""
        return _eval(self.peak_bytes, self._subs({}))

    def at(self, **symbol_values: int) -> int:
        """The peak in bytes with the given symbols (others at their hints).

        The maximum over every timeline point's formula, not just the formula of the point that
        peaks at the hints: at another length another point may be the peak (a quadratic attention
        temporary overtaking a linear one, say)."""
        subs = self._subs(symbol_values)
        return max(_eval(c, subs) for c in self.candidates)

    @property
    def host_hint(self) -> int:
        """Offloaded bytes at `hints`."""
        return _eval(self.host_bytes, self._subs({}))

    def host_at(self, **symbol_values: int) -> int:
        """Offloaded bytes with the given symbols (others at their hints)."""
        return _eval(self.host_bytes, self._subs(symbol_values))

    def max_length(self, budget_bytes: int, symbol: str | sympy.Symbol, host_budget_bytes: int | None = None) -> int:
        """Largest integer value of `symbol` (e.g. the sequence length) whose peak fits `budget_bytes`
        (and whose offloaded bytes fit `host_budget_bytes`, when given).

        Binary search over the maximum of every timeline formula, other symbols at their hints;
        assumes the peak does not shrink as the length grows. 0 when even length 1 does not fit."""
        name = symbol.name if isinstance(symbol, sympy.Symbol) else str(symbol)
        if name not in self.symbols:
            raise ValueError(f"unknown symbol {name!r}: the peak depends on {self.symbols or 'no symbol'}")
        sym = sympy.Symbol(name, integer=True, positive=True)
        device = _max_evaluator(self.candidates, sym, self._subs({}, drop=name))
        if host_budget_bytes is None:
            peak = device
        else:  # over the host budget counts as not fitting
            host = _max_evaluator((self.host_bytes,), sym, self._subs({}, drop=name))
            peak = lambda n: device(n) if host(n) <= host_budget_bytes else budget_bytes + 1  # noqa: E731
        if peak(1) > budget_bytes:
            return 0
        lo, hi = 1, 2
        while peak(hi) <= budget_bytes:
            lo, hi = hi, hi * 2
            if hi > 2 ** 62:
                raise ValueError(f"the peak does not grow with {name}: every length fits {budget_bytes} bytes")
        while hi - lo > 1:  # peak(lo) <= budget < peak(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= budget_bytes else (lo, mid)
        return lo

    def format(self, top: int = 5) -> str:
        """A short summary: peak in GiB, where, the largest live tensors, the formula if symbolic."""
        lines = [f"peak {_gib(self.peak_hint)} in {self.peak_graph} at {self.peak_node}"]
        if isinstance(self.peak_bytes, sympy.Expr) and self.peak_bytes.free_symbols:
            at = ", ".join(f"{s}={self.hints[s]}" for s in sorted(str(s) for s in self.peak_bytes.free_symbols)
                           if s in self.hints)
            lines.append(f"  peak bytes = {self.peak_bytes}   (evaluated at {at})")
        lines.append(f"  inputs {_gib(_eval(self.inputs_bytes, self._subs({})))}, saved for backward "
                     f"{_gib(_eval(self.saved_bytes, self._subs({})))}"
                     + (f", resident {_gib(_eval(self.resident, self._subs({})))}" if self.resident else ""))
        if self.live_at_peak:
            lines.append(f"  largest live at peak ({len(self.live_at_peak)} buffers):")
            lines += [f"    {_gib(b):>24}  {name} ({g})" for name, b, g in self.live_at_peak[:top]]
        if self.unsized:
            lines.append(f"  {len(self.unsized)} nodes without a fake value counted as 0 bytes")
        return "\n".join(lines)

    def _subs(self, values: dict[str, int], drop: str | None = None) -> dict[sympy.Symbol, int]:
        known = set(self.symbols) | set(self.hints)
        bad = [k for k in values if k not in known]
        if bad:
            raise ValueError(f"unknown symbols {bad}; the estimate knows {sorted(known)}")
        merged = {**self.hints, **values}
        return {sympy.Symbol(k, integer=True, positive=True): v for k, v in merged.items() if k != drop}


def estimate(fw: fx.Graph, bw: fx.Graph | None, *, resident: Size = 0, fusion_aware: bool = True,
             outputs_held: bool = True, hints: dict[str, int] | None = None) -> MemoryEstimate:
    """Static peak-memory estimate of one step: `fw` then `bw` (None: forward only, outputs live to the end).

    resident      bytes live outside the graphs for the whole step (optimizer state, other modules).
    fusion_aware  treat pointwise values whose every consumer is pointwise or a reduction as never
                  materialized. A heuristic standing in for Inductor's scheduler: Inductor inlines such
                  producers into their consumer's kernel, so on a GPU the intermediate never exists; but
                  it may still materialize one with several consumers in different kernels, or one too
                  costly to recompute, so the estimate can be a little low for long pointwise fan-outs.
                  Turn it off for graphs run eagerly (aot_eager), where every op allocates.
    outputs_held  forward outputs the backward does not read are held by the caller through the
                  backward (False: freed at the end of the forward).
    hints         symbol name -> value to evaluate symbolic sizes at; defaults to the fake tensors'
                  hints (the traced sizes).
    """
    w = _Walk(fusion_aware)
    fw_nodes = list(fw.nodes)
    saved_names = _saved_names(bw) if bw is not None else set()
    w.walk(fw_nodes, FORWARD)
    fw_last = w.step
    for v in _output_values(fw_nodes):
        if v.name in saved_names:
            continue  # crosses into the backward, where its placeholder extends its life
        for b in w.bufs_of(v):
            w.hold(b, _END if bw is None or outputs_held else fw_last)
    if bw is not None:
        fw_by_name = {n.name: n for n in fw_nodes}
        w.start_backward(fw_by_name)
        bw_nodes = list(bw.nodes)
        w.walk(bw_nodes, BACKWARD)
        for v in _output_values(bw_nodes):
            for b in w.bufs_of(v):
                w.hold(b, _END)
    w.hints.update(hints or {})
    return w.finish(resident)


# --- internals ---------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Buffer:
    name: str  # the node that allocated it
    graph: str
    nbytes: Size
    start: int  # step it is allocated at
    end: float  # last step it is used at (inclusive); _END when held to the end
    is_input: bool = False
    saved: bool = False  # a forward buffer the backward reads


class _Walk:
    """Assigns every node's value to buffers and every buffer a lifetime [start, end] in steps."""

    def __init__(self, fusion_aware: bool):
        self.fusion_aware = fusion_aware
        self.buffers: list[_Buffer] = []
        self.step = 0  # current step; each graph starts with a step of its own (inputs / tangents)
        self.points: list[tuple[int, str, str]] = []  # (step, graph, node) where the timeline samples
        self.vals: dict[fx.Node, tuple[frozenset, list | None]] = {}  # node -> (buffers, per-element)
        self.hints: dict[str, int] = {}
        self.unsized: list[str] = []
        self._envs: set[int] = set()
        self._fw_by_name: dict[str, fx.Node] = {}
        self.host: list[Size] = []  # sizes of offloaded values

    def bufs_of(self, node: Any) -> frozenset:
        return self.vals[node][0] if isinstance(node, fx.Node) and node in self.vals else frozenset()

    def hold(self, b: _Buffer, end: float) -> None:
        b.end = max(b.end, end)

    def start_backward(self, fw_by_name: dict[str, fx.Node]) -> None:
        self.step += 1
        self._fw_by_name = fw_by_name

    def walk(self, nodes: list[fx.Node], graph: str) -> None:
        start = self.step
        self.points.append((start, graph, "(inputs)" if graph == FORWARD else "(tangents)"))
        for node in nodes:
            if node.op == "output":
                continue
            if node.op in ("placeholder", "get_attr"):
                self._input(node, graph, start)
                continue
            self._visit(node, graph)

    def _visit(self, node: fx.Node, graph: str, where: str = "") -> None:
        body = _body_of(node)
        if body is not None:
            self._call_body(node, body, graph, where)
        else:
            self.step += 1
            self.points.append((self.step, graph, where + node.name))
            self.vals[node] = self._classify(node, graph)
        for inp in node.all_input_nodes:
            if node.target is operator.getitem and self.vals.get(inp, (None, None))[1] is not None:
                continue  # one element of a tuple: it holds that element's buffers, not the others'
            for b in self.bufs_of(inp):
                if b.end != _END:
                    b.end = max(b.end, self.step)

    def _call_body(self, call: fx.Node, body: fx.GraphModule, graph: str, where: str) -> None:
        """A call of a shared layer body (invoke_subgraph, passes.regions) walked as if inline: its
        placeholders are the call's operands, its outputs the call's values. The body's nodes are walked
        once per call (one body serves many layers), so each call gets buffers of its own."""
        for ph, arg in zip(body.graph.find_nodes(op="placeholder"), call.args[2:]):
            self.vals[ph] = self.vals.get(arg, (frozenset(), None)) if isinstance(arg, fx.Node) else (frozenset(), None)
        for node in body.graph.nodes:
            if node.op == "get_attr" and node not in self.vals:  # a constant: resident, counted once
                self.vals[node] = self._alloc(node, node.meta.get("val"), graph, self.step, is_input=True)
                for b in self.vals[node][0]:
                    b.end = _END
            elif node.op == "call_function":
                self._visit(node, graph, f"{where}{call.name}/")
        out = body.graph.output_node().args[0]
        elems = [self.bufs_of(o) for o in (out if isinstance(out, (tuple, list)) else (out,))]
        self.vals[call] = (frozenset().union(*elems), elems)

    def _input(self, node: fx.Node, graph: str, start: int) -> None:
        val = node.meta.get("val")
        self._note_hints(val)
        src = self._fw_by_name.get(node.name) if graph == BACKWARD else None
        if src is not None and src.op != "output" and src in self.vals:  # a saved forward value
            self.vals[node] = self.vals[src]
            for b in self.vals[src][0]:
                if not b.is_input:
                    b.saved = True
                    b.end = max(b.end, start)  # crosses the boundary even if the backward never reads it
            return
        # forward inputs and constants are resident; tangents (and any backward input the forward
        # cannot name) arrive at the backward's start and live until their last use
        is_input = graph == FORWARD or node.op == "get_attr"
        tangent = graph == BACKWARD and not is_input
        self.vals[node] = self._alloc(node, val, graph, start, is_input=is_input)
        for b in self.vals[node][0]:
            b.saved = tangent and not node.name.startswith("tangents")
            if is_input:
                b.end = _END

    def _classify(self, node: fx.Node, graph: str) -> tuple[frozenset, list | None]:
        val = node.meta.get("val")
        self._note_hints(val)
        if "val" not in node.meta:
            self.unsized.append(node.name)
        tgt = node.target
        args = [a for a in node.all_input_nodes if a in self.vals]
        if tgt is operator.getitem and isinstance(node.args[0], fx.Node):
            _, elems = self.vals.get(node.args[0], (frozenset(), None))
            idx = node.args[1]
            if elems is not None and isinstance(idx, int) and -len(elems) <= idx < len(elems):
                return elems[idx], None
            return self._alias(args, val)
        if isinstance(tgt, torch._ops.OpOverload):
            schema = tgt._schema
            name = tgt.overloadpacket.__name__
            if name in _VIEW_OPS or (_may_alias(schema) and _shares_storage(val, args)):
                return self._alias(args, val)
            if schema.is_mutable:  # in place: writes into an argument, allocates nothing
                return self._alias(args, val)
            if self.fusion_aware and _fused(node):
                union = frozenset().union(*(self.bufs_of(a) for a in args))
                return union, None  # never materialized: its inputs live as long as its consumers
        return self._alloc(node, val, graph, self.step)

    def _alias(self, args: list[fx.Node], val: Any) -> tuple[frozenset, list | None]:
        union = frozenset().union(*(self.bufs_of(a) for a in args))
        elems = [union] * len(val) if isinstance(val, (tuple, list)) else None
        return union, elems

    def _alloc(self, node: fx.Node, val: Any, graph: str, step: int, *, is_input: bool = False):
        if isinstance(val, (tuple, list)):
            elems = [self._alloc(node, v, graph, step, is_input=is_input)[0] for v in val]
            return frozenset().union(*elems), elems
        if not isinstance(val, torch.Tensor):
            return frozenset(), None
        if _offloaded(node):  # lives in host memory: its own budget, not the device's peak
            self.host.append(_nbytes(val))
            return frozenset(), None
        b = _Buffer(node.name, graph, _nbytes(val), step, step, is_input=is_input)
        self.buffers.append(b)
        return frozenset([b]), None

    def _note_hints(self, val: Any) -> None:
        for s in _symints(val):
            expr = s.node.expr
            if isinstance(expr, sympy.Symbol) and expr.name not in self.hints:
                hint = getattr(s.node, "hint", None)
                if hint is not None:
                    self.hints[expr.name] = int(hint)
            env = getattr(s.node, "shape_env", None)  # every backed symbol's traced value
            if env is not None and id(env) not in self._envs:
                self._envs.add(id(env))
                known = getattr(env, "backed_var_to_val", None) or getattr(env, "var_to_val", None) or {}
                for sym, v in known.items():
                    self.hints.setdefault(str(sym), int(v))

    def finish(self, resident: Size) -> MemoryEstimate:
        for b in self.buffers:
            if isinstance(b.nbytes, sympy.Expr):
                for s in b.nbytes.free_symbols:
                    if s.name not in self.hints:
                        log.debug("size symbol %s has no hint; evaluating it at %d", s, UNBACKED_FALLBACK)
                        self.hints[s.name] = UNBACKED_FALLBACK
        subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in self.hints.items()}
        by_size: dict[Size, int] = {}
        hint_of = {id(b): by_size[b.nbytes] if b.nbytes in by_size else by_size.setdefault(b.nbytes, _eval(b.nbytes, subs))
                   for b in self.buffers}

        allocs: dict[int, list[_Buffer]] = collections.defaultdict(list)
        frees: dict[int, list[_Buffer]] = collections.defaultdict(list)
        for b in self.buffers:
            allocs[b.start].append(b)
            if b.end != _END:
                frees[int(b.end)].append(b)

        live = _Sum()
        live.add(resident, _eval(resident, subs))
        timeline, formulas, peak_i = [], [], 0
        for i, (step, graph, name) in enumerate(self.points):
            for b in allocs.pop(step, ()):
                live.add(b.nbytes, hint_of[id(b)])
            timeline.append((graph, name, live.hint))
            formulas.append(live.key())
            if live.hint > timeline[peak_i][2]:
                peak_i = i
            for b in frees.pop(step, ()):
                live.add(b.nbytes, -hint_of[id(b)], sign=-1)

        peak_step = self.points[peak_i][0]
        at_peak = [(b.name, hint_of[id(b)], b.graph) for b in self.buffers
                   if not b.is_input and b.start <= peak_step <= b.end]
        at_peak.sort(key=lambda t: -t[1])
        inputs = _total(b.nbytes for b in self.buffers if b.is_input)
        saved = _total(b.nbytes for b in self.buffers if b.saved and not b.is_input)
        cands = tuple(_Sum.expr(k) for k in dict.fromkeys(formulas))
        return MemoryEstimate(
            peak_bytes=_Sum.expr(formulas[peak_i]), peak_graph=self.points[peak_i][1],
            peak_node=self.points[peak_i][2], live_at_peak=at_peak, timeline=timeline,
            inputs_bytes=inputs, saved_bytes=saved, resident=resident, hints=dict(self.hints),
            candidates=cands, unsized=tuple(self.unsized), host_bytes=_total(self.host))


class _Sum:
    """A running sum of sizes kept as {monomial: coefficient} so adding is cheap and equal totals
    compare equal (timeline formulas are deduplicated by this key)."""

    def __init__(self):
        self.const = 0
        self.terms: collections.Counter = collections.Counter()
        self.hint = 0

    def add(self, size: Size, hint: int, sign: int = 1) -> None:
        self.hint += hint
        if isinstance(size, int):
            self.const += sign * size
            return
        for m, c in _terms(size):
            if m == 1:
                self.const += sign * int(c)
            else:
                self.terms[m] += sign * c
                if self.terms[m] == 0:
                    del self.terms[m]

    def key(self) -> tuple:
        return (self.const, frozenset(self.terms.items()))

    @staticmethod
    def expr(key: tuple) -> Size:
        const, terms = key
        if not terms:
            return int(const)
        return sympy.Add(sympy.Integer(const), *(c * m for m, c in terms))


@functools.lru_cache(maxsize=4096)
def _terms(size: sympy.Expr) -> tuple:
    """{monomial: coefficient} of an expanded size (the same few sizes recur on every layer)."""
    return tuple(sympy.expand(size).as_coefficients_dict().items())


def offloaded_outputs(fw: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """(output, the saved value it holds) for each forward output AOT autograd's activation offloading
    moved to host memory: named cpu_offload_<saved value>; on a CPU graph Inductor drops the copy as a
    no-op and the value keeps its saved_for_offloading mark."""
    by_name = {n.name: n for n in fw.nodes}
    res = []
    for n in fw.find_nodes(op="output")[0].args[0]:
        if not isinstance(n, fx.Node):
            continue
        if _offloaded(n):
            res.append((n, by_name.get(n.name.removeprefix(_compat.OFFLOAD_PREFIX), n)))
        elif n.meta.get("saved_for_offloading"):
            res.append((n, n))
    return res


def offloaded_bytes(fw: fx.Graph) -> Size:
    """Bytes of the forward outputs moved to host memory (a formula under dynamic shapes)."""
    return _total(_nbytes(out.meta["val"]) for out, _ in offloaded_outputs(fw) if "val" in out.meta)


def _offloaded(node: fx.Node) -> bool:
    """A forward value AOT autograd's activation offloading moved to host memory (sync device_put
    or async ao.offload / ao.wait_tensor, all named cpu_offload_*)."""
    return node.name.startswith((_compat.OFFLOAD_PREFIX, "async_" + _compat.OFFLOAD_PREFIX))


def _body_of(node: fx.Node) -> fx.GraphModule | None:
    """The body an invoke_subgraph call runs (a shared layer body of passes.regions), else None."""
    if node.op != "call_function" or node.target is not torch.ops.higher_order.invoke_subgraph:
        return None
    body = getattr(node.graph.owning_module, getattr(node.args[0], "target", ""), None)
    return body if isinstance(body, fx.GraphModule) else None


def _saved_names(bw: fx.Graph) -> set[str]:
    return {n.name for n in bw.nodes if n.op == "placeholder" and not n.name.startswith("tangents")}


def _output_values(nodes: list[fx.Node]) -> list[fx.Node]:
    out = [n for n in nodes if n.op == "output"]
    if not out:
        return []
    vals: list[fx.Node] = []
    fx.map_arg(out[0].args, lambda n: vals.append(n))
    return vals


def _fused(node: fx.Node) -> bool:
    """Pointwise, not an output, and every consumer (looking through views) pointwise or a reduction."""
    if torch.Tag.pointwise not in node.target.tags:
        return False
    todo, seen = list(node.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        t = u.target
        if not isinstance(t, torch._ops.OpOverload):
            return False  # the graph output, getitem, a higher-order op
        if t.overloadpacket.__name__ in _VIEW_OPS:
            todo.extend(u.users)
        elif torch.Tag.pointwise not in t.tags and torch.Tag.reduction not in t.tags:
            return False
    return True


def _may_alias(schema: Any) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _shares_storage(val: Any, args: list[fx.Node]) -> bool:
    """Whether a may-alias op's output is a view of one of its inputs (the fake tensors say)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    if not isinstance(val, torch.Tensor):
        return True
    try:
        ref = StorageWeakRef(val.untyped_storage())
        return any(isinstance(v := a.meta.get("val"), torch.Tensor) and StorageWeakRef(v.untyped_storage()) == ref
                   for a in args)
    except Exception:  # no storage to compare: trust the schema
        return True


def _symints(val: Any) -> Iterable[torch.SymInt]:
    if isinstance(val, torch.SymInt):
        yield val
    elif isinstance(val, torch.Tensor):
        yield from (s for s in val.shape if isinstance(s, torch.SymInt))
    elif isinstance(val, (tuple, list)):
        for v in val:
            yield from _symints(v)


def _nbytes(t: torch.Tensor) -> Size:
    """numel × itemsize, rounded up to the allocator's granule when concrete."""
    numel = t.numel()
    if isinstance(numel, torch.SymInt):
        expr = numel.node.expr
        if not expr.free_symbols:
            numel = int(expr)
        else:
            return sympy.expand(expr * t.dtype.itemsize)
    n = int(numel) * t.dtype.itemsize
    return -(-n // GRANULE) * GRANULE


def _total(sizes: Iterable[Size]) -> Size:
    s = _Sum()
    for x in sizes:
        s.add(x, 0)
    return _Sum.expr(s.key())


def _eval(size: Size, subs: dict) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, sympy.Expr) and not size.free_symbols:
        return int(size)
    by_name = {s.name: v for s, v in subs.items()}
    return int(size.xreplace({s: by_name[s.name] for s in size.free_symbols if s.name in by_name}))


def _max_evaluator(cands: tuple[Size, ...], sym: sympy.Symbol, subs: dict):
    """L -> max over formulas at sym=L. Polynomials become integer coefficient lists (fast, exact);
    formulas with floor divisions and the like are substituted each time."""
    consts, polys, others = [], [], []
    for c in cands:
        if isinstance(c, int) or not c.free_symbols:
            consts.append(int(c))
            continue
        e = c.xreplace({s: subs[k] for s in c.free_symbols
                        for k in subs if k.name == s.name and s.name != sym.name})
        x = next((s for s in e.free_symbols if s.name == sym.name), None)
        if x is None:
            consts.append(int(e))
            continue
        try:
            coeffs = sympy.Poly(e, x).all_coeffs()
            if all(co.is_Integer for co in coeffs):
                polys.append([int(co) for co in coeffs])
                continue
        except Exception:  # not a polynomial in x (FloorDiv, Max, ...): substitute instead
            pass
        others.append((e, x))
    top = max(consts, default=-math.inf)

    def peak(n: int) -> int:
        best = top
        for co in polys:
            v = 0
            for a in co:
                v = v * n + a
            best = max(best, v)
        for e, x in others:
            best = max(best, int(e.xreplace({x: n})))
        return int(best)

    return peak


def _gib(n: int) -> str:
    return f"{n / GIB:.3f} GiB ({n:,} B)"


# --- plotting ----------------------------------------------------------------------------------


def plot_timeline(estimates: dict[str, MemoryEstimate], path: str | os.PathLike) -> None:
    """Write a PNG: live GiB against step for each labelled estimate, the forward/backward boundary
    dashed and each peak annotated. Needs matplotlib (`pip install lemo-compile[plot]`)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plot_timeline needs matplotlib: pip install 'lemo-compile[plot]'") from e
    fig = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch in the caller's process
    ax = fig.add_subplot()
    for i, (label, est) in enumerate(estimates.items()):
        color = f"C{i}"
        ys = [b / GIB for _, _, b in est.timeline]
        ax.plot(range(len(ys)), ys, color=color, label=label, linewidth=1.2)
        bw_start = next((j for j, (g, _, _) in enumerate(est.timeline) if g == BACKWARD), None)
        if bw_start is not None:
            ax.axvline(bw_start - 0.5, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        if ys:
            j = max(range(len(ys)), key=lambda k: ys[k])
            ax.plot([j], [ys[j]], "o", color=color)
            right = j > len(ys) / 2  # keep the label inside the axes
            ax.annotate(f"{label}: {ys[j]:.3g} GiB\n{est.timeline[j][0]} {est.timeline[j][1]}",
                        (j, ys[j]), textcoords="offset points", xytext=(-6 if right else 6, 6),
                        ha="right" if right else "left", fontsize=8, color=color)
    ax.set_xlabel("step (forward nodes, then backward; dashed: backward starts)")
    ax.set_ylabel("live memory (GiB)")
    ax.set_title("static liveness estimate")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":  # python -m lemo_compile.passes.memory: estimate a tiny Llama's training step
    from lemo_compile.testing.models import random_batch, tiny_model

    graphs: list[fx.GraphModule] = []
    model = tiny_model("llama")
    batch = random_batch(256, b=1, n=512, seed=0)
    compiled = torch.compile(model, backend=_compat.aot_eager(graphs.append, graphs.append))
    compiled(**batch).loss.backward()
    print(estimate(graphs[0].graph, graphs[1].graph).format())
