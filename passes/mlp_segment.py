"""passes.mlp_segment — compute SwiGLU MLPs in row segments (LemoConfig.segment_mlp).

Matches, in a Dynamo graph and in its activation-checkpoint bodies, the MLP of Llama, Mistral and
Qwen2/3 (dense layers, and sparse layers whose MLP runs on kept rows):

    g = linear(x, W_gate); u = linear(x, W_up); y = linear(silu(g) * u, W_down)

and replaces it with one `lemo::swiglu_mlp(x, W_gate, W_up, W_down, rows)` call (kernels.swiglu):
the backward keeps only x and recomputes the intermediates one segment of rows at a time, so neither
the forward's (rows x intermediate) tensors nor their gradients exist at full length. Exact up to the
segments' GEMM rounding. Rows per segment come from LemoConfig.mlp_segment_bytes.

A projection may carry a PEFT LoRA adapter (no dropout), traced as

    (linear(z, W) + linear(linear(z.to(A.dtype), A), B) * scale).to(z.dtype)

(either cast absent when the dtypes already agree); an MLP with one or more such projections becomes
`lemo::swiglu_lora_mlp(x, W_gate, W_up, W_down, A_gate, B_gate, A_up, B_up, A_down, B_down, scales,
rows)`, None where a projection has no adapter.

Left alone, with a SkipReason: an activation other than SiLU (Gemma's GELU), projections with a bias
or an adapter of another form (LoRA dropout, DoRA, several adapters), fused gate/up projections
(Phi-3), intermediates used elsewhere, graphs with an autocast region (the op computes in the weights'
dtype).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lemo_compile.config import LemoConfig
from lemo_compile.kernels import swiglu

from .common import (ADD_TARGETS, LINEAR_TARGETS, PassResult, finish, is_call, shape_of,
                     subgraph_modules, value_of)

SILU = (F.silu, torch.nn.functional.silu, torch.ops.aten.silu.default)
MUL = (operator.mul, torch.mul, "mul")


@dataclasses.dataclass
class MlpSegmentResult(PassResult):
    # per rewritten MLP: {"where", "rows", "inter", "segment_rows"}
    mlps: list[dict] = dataclasses.field(default_factory=list)


def segment_mlps(gm: fx.GraphModule, cfg: LemoConfig) -> MlpSegmentResult:
    res = MlpSegmentResult("mlp_segment")
    _segment_in(gm, cfg, res, "")
    return res


def _autocast(g: fx.Graph) -> bool:
    """An autocast region in the graph, or autocast entered around the compiled call (Dynamo then
    traces under it without recording it as nodes)."""
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return True
    return any("autocast" in getattr(n.target, "__name__", str(n.target)) for n in g.nodes
               if n.op in ("call_function", "call_method"))


def _segment_in(gm: fx.GraphModule, cfg: LemoConfig, res: MlpSegmentResult, where: str) -> None:
    g = gm.graph
    changed = False
    if _autocast(g):  # the op would compute in the weights' dtype, not autocast's
        res.skip("autocast", where or "graph", "the graph has an autocast region; MLPs left alone")
        return
    for prod in [n for n in g.nodes if is_call(n, *MUL)]:
        m = _match(prod, res, where)
        if m is None:
            continue
        res.mlps.append(_rewrite(g, *m, cfg, where))
        res.counters["mlps_segmented"] += 1
        changed = True
    if changed:
        finish(gm, [gm])
    for name, sub, _ in subgraph_modules(gm):
        _segment_in(sub, cfg, res, f"{where}{name}.")


def _plain_linear(n) -> bool:
    if not is_call(n, *LINEAR_TARGETS):
        return False
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return bias is None


def _weight(n: fx.Node):
    return n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")


def _cast_to(n: Any) -> torch.dtype | None:
    """The dtype of a `t.to(dtype)` / `t.to(dtype=...)` node with nothing else, else None."""
    if not is_call(n, "to") or len(n.args) > 2 or set(n.kwargs) - {"dtype"}:
        return None
    dt = n.args[1] if len(n.args) == 2 else n.kwargs.get("dtype")
    return dt if isinstance(dt, torch.dtype) and not (len(n.args) == 2 and n.kwargs) else None


@dataclasses.dataclass
class _Proj:
    """A bias-free projection of `z`, plain (`a` None) or with a PEFT LoRA adapter; `out` is its output node."""

    z: fx.Node
    w: Any
    out: fx.Node
    a: Any = None
    b: Any = None
    scale: float = 1.0
    inner: tuple = ()  # the adapter's nodes between `z` and `out`, each used once


def _adapted(base: fx.Node) -> _Proj | None:
    """The projection whose frozen linear is `base`: a LoRA adapter added to it when the graph has one
    in PEFT's form, else just `base`. None when `base` is not a bias-free linear."""
    if not _plain_linear(base):
        return None
    z, plain = base.args[0], _Proj(base.args[0], _weight(base), base)
    if len(base.users) != 1:
        return plain
    add = next(iter(base.users))
    if not is_call(add, *ADD_TARGETS) or len(add.args) != 2 or add.kwargs:
        return plain
    mul = add.args[1] if add.args[0] is base else add.args[0]
    if not is_call(mul, *MUL) or len(mul.args) != 2:
        return plain
    lb, scale = mul.args if isinstance(mul.args[1], (int, float)) else mul.args[::-1]
    if not (isinstance(scale, (int, float)) and _plain_linear(lb) and _plain_linear(lb.args[0])):
        return plain
    la = lb.args[0]
    zc = la.args[0]
    cast_in = zc is not z
    if cast_in and not (_cast_to(zc) is not None and zc.args[0] is z):
        return plain
    out = add
    cast_out = len(add.users) == 1 and _cast_to(next(iter(add.users))) is not None
    if cast_out:
        out = next(iter(add.users))
    inner = (*((zc,) if cast_in else ()), la, lb, mul, base, *((add,) if cast_out else ()))
    if any(len(n.users) != 1 for n in inner):
        return plain
    return _Proj(z, _weight(base), out, _weight(la), _weight(lb), float(scale), inner)


def _projection(out: Any) -> _Proj | None:
    """The projection (plain or adapted) whose output node is `out`, else None."""
    if _plain_linear(out):
        return _adapted(out)
    node = out.args[0] if _cast_to(out) is not None else out
    if not is_call(node, *ADD_TARGETS):
        return None
    for base in node.args:
        p = _adapted(base) if isinstance(base, fx.Node) else None
        if p is not None and p.out is out:
            return p
    return None


def _match(prod: fx.Node, res: MlpSegmentResult, where: str):
    """(gate, up, down) projections of a SwiGLU MLP whose product is `prod`, else None (with a
    SkipReason when the product of an activation and a linear feeds a linear, i.e. it looks like an MLP)."""
    linears = [u for u in prod.users if is_call(u, *LINEAR_TARGETS) and u.args[0] is prod]
    if not linears or len(prod.args) != 2:
        return None
    at = f"{where}{linears[0].name}"
    a, b = prod.args
    act, up = (a, b) if is_call(a, *SILU) or not is_call(b, *SILU) else (b, a)
    if not is_call(act, *SILU):
        if isinstance(act, fx.Node) and act.op in ("call_function", "call_method") and len(act.args) == 1 \
                and _projection(act.args[0]) is not None:
            res.skip("mlp_form", at, f"activation {getattr(act.target, '__name__', act.target)}: only SiLU "
                     "(SwiGLU) MLPs are segmented")
        return None
    if act.kwargs.get("inplace") or (len(act.args) > 1 and act.args[1]):
        res.skip("mlp_form", at, "in-place SiLU")
        return None
    # the down projection: the linear whose adapter (if any) accounts for the product's other users
    # (without an input cast, the adapter's A is a linear of the product too)
    downs = [p for p in map(_adapted, linears) if p is not None and all(u is p.out or u in p.inner for u in prod.users)]
    if len(downs) != 1:
        if any(not _plain_linear(u) for u in linears):
            res.skip("mlp_form", at, "down projection has a bias")
        else:
            res.skip("mlp_used", at, f"{prod.name} is used outside the MLP (by other code, or by an adapter lemo "
                     "does not know: LoRA dropout, DoRA, several adapters)")
        return None
    down = downs[0]
    gate, up = _projection(act.args[0]), _projection(up)
    if gate is None or up is None or gate.z is not up.z:
        res.skip("mlp_form", at, "gate and up are not two bias-free projections of one input (a bias, fused "
                 "gate/up, or an adapter lemo does not know?)")
        return None
    for n in (gate.out, up.out, act):
        if len(n.users) != 1:
            res.skip("mlp_used", at, f"{n.name} is used outside the MLP")
            return None
    projs = (gate, up, down)
    # nodes a pass added (the kept-rows MLP of a sparse layer) carry no fake values; the weights do
    ws = [value_of(p.w) for p in projs]
    io = [v for v in (value_of(gate.z), value_of(down.out)) if isinstance(v, torch.Tensor)]
    if not all(isinstance(v, torch.Tensor) for v in ws):
        res.skip("mlp_form", at, "no fake values on the MLP's weights")
        return None
    if len({v.dtype for v in ws + io}) != 1 or any(v.dim() != 2 for v in ws):
        res.skip("mlp_form", at, "input, weights and output do not share one dtype / 2-D weights")
        return None
    if not all(_adapter_ok(p, ws[0].dtype) for p in projs if p.a is not None):
        res.skip("mlp_form", at, "an adapter's weights or casts do not match PEFT's LoRA arithmetic")
        return None
    return projs


def _adapter_ok(p: _Proj, dtype: torch.dtype) -> bool:
    """The adapter's A and B share a dtype, its input cast (if any) is to that dtype and its output cast
    (if any) back to the model dtype; without an output cast the sum must already be in it."""
    a, b = value_of(p.a), value_of(p.b)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.dim() == 2 and b.dim() == 2):
        return False
    cast_in = [n for n in p.inner if _cast_to(n) is not None and n.args[0] is p.z]
    if cast_in and _cast_to(cast_in[0]) != a.dtype or not cast_in and a.dtype != dtype:
        return False
    cast_out = _cast_to(p.out)  # `out` is the cast back when there is one, else the sum
    if cast_out is not None:
        return cast_out == dtype
    return torch.promote_types(dtype, a.dtype) == dtype


def _rewrite(g: fx.Graph, gate: _Proj, up: _Proj, down: _Proj, cfg: LemoConfig, where: str) -> dict:
    w_val = value_of(gate.w)
    inter = int(w_val.shape[0])
    projs = (gate, up, down)
    lora = any(p.a is not None for p in projs)
    a_size = max((value_of(p.a).dtype.itemsize for p in projs if p.a is not None), default=0)
    rows = swiglu.segment_rows(inter, cfg.mlp_segment_bytes, w_val.dtype.itemsize, a_size)
    x = gate.z
    with g.inserting_before(down.out):
        if lora:
            args = (x, gate.w, up.w, down.w, *(t for p in projs for t in (p.a, p.b)), [p.scale for p in projs], rows)
            y = g.call_function(torch.ops.lemo.swiglu_lora_mlp.default, args)
        else:
            y = g.call_function(torch.ops.lemo.swiglu_mlp.default, (x, gate.w, up.w, down.w, rows))
    y.meta.update({k: v for k, v in down.out.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value",
                                                                     "val", "tensor_meta")})
    down.out.replace_all_uses_with(y)
    shape = shape_of(x)
    out = {"where": f"{where}{y.name}", "rows": str(shape[:-1]) if shape else "(kept rows)", "inter": inter,
           "segment_rows": rows}
    if lora:
        out["adapters"] = [name for name, p in zip(("gate", "up", "down"), projs) if p.a is not None]
    return out
