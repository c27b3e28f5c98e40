"""passes.mlp_segment — compute SwiGLU MLPs in row segments (LemoConfig.segment_mlp).

Matches, in a Dynamo graph and in its activation-checkpoint bodies, the MLP of Llama, Mistral and
Qwen2/3 (dense layers, and sparse layers whose MLP runs on kept rows):

    g = linear(x, W_gate); u = linear(x, W_up); y = linear(silu(g) * u, W_down)

and replaces it with one `lemo::swiglu_mlp(x, W_gate, W_up, W_down, rows)` call (lemo_compile.mlp):
the backward keeps only x and recomputes the intermediates one segment of rows at a time, so neither
the forward's (rows x intermediate) tensors nor their gradients exist at full length. Exact up to the
segments' GEMM rounding. Rows per segment come from LemoConfig.segment_bytes.

Left alone, with a SkipReason: an activation other than SiLU (Gemma's GELU), projections with a bias
or an adapter (LoRA on the MLP: the product's inputs are then not plain linears), fused gate/up
projections (Phi-3), intermediates used elsewhere, graphs with an autocast region (the op computes in
the weights' dtype).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from lemo_compile import mlp
from lemo_compile.config import LemoConfig

from .common import PassResult, is_call, shape_of, value_of
from .detect import LINEAR_TARGETS, subgraph_modules

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
    for down in [n for n in g.nodes if is_call(n, *LINEAR_TARGETS)]:
        prod = down.args[0]
        if not is_call(prod, *MUL):
            continue
        m = _match(down, prod, res, where)
        if m is None:
            continue
        res.mlps.append(_rewrite(g, down, *m, cfg, where))
        res.counters["mlps_segmented"] += 1
        changed = True
    if changed:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    for name, sub, _ in subgraph_modules(gm):
        _segment_in(sub, cfg, res, f"{where}{name}.")


def _plain_linear(n) -> bool:
    if not is_call(n, *LINEAR_TARGETS):
        return False
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return bias is None


def _match(down: fx.Node, prod: fx.Node, res: MlpSegmentResult, where: str):
    """(x, gate weight, up weight, down weight) of a SwiGLU MLP ending at `down`, else None (with a
    SkipReason when the product of an activation and a linear feeds it, i.e. it looks like an MLP)."""
    at = f"{where}{down.name}"
    a, b = prod.args[0], prod.args[1] if len(prod.args) > 1 else None
    act, up = (a, b) if is_call(a, *SILU) or not is_call(b, *SILU) else (b, a)
    act_like = isinstance(act, fx.Node) and act.op in ("call_function", "call_method") and len(act.args) == 1 \
        and is_call(act.args[0], *LINEAR_TARGETS)
    if not is_call(act, *SILU):
        if act_like:
            res.skip("mlp_form", at, f"activation {getattr(act.target, '__name__', act.target)}: only SiLU "
                     "(SwiGLU) MLPs are segmented")
        return None
    if act.kwargs.get("inplace") or (len(act.args) > 1 and act.args[1]):
        res.skip("mlp_form", at, "in-place SiLU")
        return None
    gate = act.args[0]
    if not (_plain_linear(gate) and _plain_linear(up)) or gate.args[0] is not up.args[0]:
        res.skip("mlp_form", at, "gate and up are not two bias-free linears of one input (an adapter or a bias "
                 "on the MLP?)")
        return None
    if down.args[2:3] not in ((), (None,)) or down.kwargs.get("bias") is not None:
        res.skip("mlp_form", at, "down projection has a bias")
        return None
    for n in (gate, up, act, prod):
        if len(n.users) != 1:
            res.skip("mlp_used", at, f"{n.name} is used outside the MLP")
            return None
    x = gate.args[0]
    ws = [n.args[1] if len(n.args) > 1 else n.kwargs.get("weight") for n in (gate, up, down)]
    # nodes a pass added (the kept-rows MLP of a sparse layer) carry no fake values; the weights do
    vals = [value_of(v) for v in ws] + [v for v in (value_of(x), value_of(down)) if isinstance(v, torch.Tensor)]
    if not all(isinstance(v, torch.Tensor) for v in vals[:3]):
        res.skip("mlp_form", at, "no fake values on the MLP's weights")
        return None
    if len({v.dtype for v in vals}) != 1 or any(v.dim() != 2 for v in vals[:3]):
        res.skip("mlp_form", at, "input, weights and output do not share one dtype / 2-D weights")
        return None
    return (x, *ws)


def _rewrite(g: fx.Graph, down: fx.Node, x: fx.Node, wg: fx.Node, wu: fx.Node, wd: fx.Node, cfg: LemoConfig,
             where: str) -> dict:
    w_val = value_of(wg)
    inter = int(w_val.shape[0])
    rows = mlp.segment_rows(inter, cfg.segment_bytes, w_val.dtype.itemsize)
    with g.inserting_before(down):
        y = g.call_function(torch.ops.lemo.swiglu_mlp.default, (x, wg, wu, wd, rows))
    y.meta.update({k: v for k, v in down.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value",
                                                                 "val", "tensor_meta")})
    down.replace_all_uses_with(y)
    g.erase_node(down)
    shape = shape_of(x)
    return {"where": f"{where}{y.name}", "rows": str(shape[:-1]) if shape else "(kept rows)", "inter": inter,
            "segment_rows": rows}
