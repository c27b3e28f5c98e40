"""passes.masks — carry an attention mask as what it means (segments), not as an n x n tensor.

A padded or packed batch makes Hugging Face build a (b, 1, n, n) mask from one input: the 2-D
`attention_mask` (causal and key padding) or packed `position_ids` (causal within each document,
transformers' packed-sequence rule: a new document wherever a position does not follow the previous
one). This pass reads such a mask, checks what it means, and replaces it with segment ids, a (b, n)
int tensor (docs/design.md §2.1; `traced.segments_from_padding`, `traced.segments_from_positions`):

    mask = <ops on the attention_mask input and constants>          # n x n
    out  = scaled_dot_product_attention(q, k, v, attn_mask=mask)
becomes
    seg  = lemo_compile.traced.segments_from_padding(attention_mask)   # (b, n)
    out  = lemo::segment_attention(q, k, v, seg, scale)[0]          # causal within each segment

`lemo::segment_attention` runs each segment's rows through the causal flash kernel (CUDA) or the
plain-PyTorch twin, so neither the mask nor SDPA's masked kernel is left. It is done in two steps:
`structure_masks` (before passes.detect) replaces the mask with `traced.segment_mask(seg)`, a node that
stands for the same mask (sparsify reads the segments from it: keep sets, compacted attention, the
kept-rows backward), and `lower_segment_attention` (after sparsify) turns every attention that reads
such a node into the op. A `segment_mask` node that something else still reads (the `keys` mode's
n x m mask) is evaluated as a tensor there: correct, but not O(n).

What "checks" means: the mask's subgraph must read exactly one input tensor, of shape (b, n); it is
evaluated on probe inputs (padding on the left, on the right, in holes, none; or packed documents of
random lengths, one-token documents included) and must equal what the segments stand for on every
row of a real token (a padding row of the model's mask may see earlier real keys; the segments give it
none). No real token reads a padding row; HF's loss reads one, the last left pad (its logits predict the
first real token), whose query sees no key: SDPA gives it 0 under a bool mask, as the segments do, but
under a float mask it averages every value, so float padding masks are left alone (`FLOAT_PADDING`). Sliding-window masks, masks that read two inputs, and anything else that does not match are
left alone with a SkipReason (attention then keeps the tensor, as before). Masks must be at most
`FULL_EVAL_BYTES` per probe unless their rows can be evaluated a band at a time (HF's can).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from lemo_compile import traced

from .causal import BAND_ELEMENTS, FULL_EVAL_BYTES, nodes_as_module, row_bands
from .common import (SDPA_TARGETS, CantRewrite, PassResult, attention_dropout, eliminate_dead_code, fake_apply, finish,
                     hop_graphs, is_call, producers, sdpa_mask, shape_of, size_hint, softmax_scale, static_nbytes,
                     value_of)

PADDING, PACKED = "padding", "packed"
# A left-padded query sees no key. Under a bool mask SDPA gives it 0, as the segments do; under a float
# mask (finfo.min) its scores all round to the mask value and the model averages every value alike. HF's
# loss reads that row (the last pad token predicts the first real one), so the segments would change it.
FLOAT_PADDING = ("a float padding mask: a query that sees no key (left padding) averages every value in the "
                 "model and gets 0 from segments, and HF's loss reads the last pad token's output")
_PROBE_SEED = 1234


@dataclasses.dataclass
class MasksResult(PassResult):
    # mask node name -> "padding" | "packed" for every mask carried as segments
    structured: dict[str, str] = dataclasses.field(default_factory=dict)
    # bytes of the largest mask left in place (0 when every mask was carried as segments or there was none)
    largest_mask_left: int = 0


def structure_masks(gm: fx.GraphModule) -> MasksResult:
    """Replace every readable mask of the root graph by `traced.segment_mask(seg)` (see the module doc)."""
    res = MasksResult("masks")
    users: dict[fx.Node, list[tuple[fx.GraphModule, fx.Node]]] = {}
    for mod, outer_of in hop_graphs(gm):
        for node in mod.graph.nodes:
            if is_call(node, *SDPA_TARGETS) and sdpa_mask(node) is not None:
                users.setdefault(outer_of(sdpa_mask(node)), []).append((mod, node))
    for mask, sdpas in users.items():
        if mask.op == "placeholder" or is_call(mask, traced.segment_mask):
            continue
        why = _why_not_sdpa_only(gm, mask, sdpas)
        kind, src = (None, None) if why else read_mask(gm, mask)
        if kind is None:
            res.skip("mask_kept", mask.name, why or src)
            res.largest_mask_left = max(res.largest_mask_left, static_nbytes(mask))
            continue
        _rewrite(gm, mask, kind, src)
        res.structured[mask.name] = kind
        res.counters[f"masks_{kind}"] += 1
        res.counters["attention_calls"] += len(sdpas)
    if res.structured:
        finish(gm, [mod for mod, _ in hop_graphs(gm)])
    return res


def lower_segment_attention(gm: fx.GraphModule) -> int:
    """SDPA calls whose mask is an `traced.segment_mask` node -> lemo::segment_attention. Returns how many."""

    count, changed = 0, []
    for mod, _ in hop_graphs(gm):
        for node in list(mod.graph.nodes):
            if not is_call(node, *SDPA_TARGETS):
                continue
            mask = sdpa_mask(node)
            if not (isinstance(mask, fx.Node) and is_call(mask, traced.segment_mask)) or _why_not_plain(node):
                continue
            try:
                scale = softmax_scale(node)
            except Exception:
                continue
            q, k, v = node.args[:3]
            with mod.graph.inserting_before(node):
                pair = mod.graph.call_function(torch.ops.lemo.segment_attention.default,
                                               (q, k, v, mask.args[0], scale))
                out = mod.graph.call_function(operator.getitem, (pair, 0))
            out.meta.update({key: val for key, val in node.meta.items() if key != "example_value"})
            out.meta["example_value"] = node.meta.get("example_value")
            node.replace_all_uses_with(out)
            mod.graph.erase_node(node)
            changed.append(mod)
            count += 1
    finish(gm, changed)
    return count


def lower_causal_attention(gm: fx.GraphModule) -> int:
    """Causal SDPA calls without a mask inside activation-checkpoint bodies -> lemo::attention_lse (the same
    flash kernel on CUDA; its backward is the kept-rows backward over every row). AOT autograd counts SDPA's
    CUDA kernels as random ops (they take a dropout seed) and wraps each one it recomputes in backward in a
    `graphsafe_run_with_rng_state` op: Inductor's FX graph cache refuses such graphs, so a second process
    compiled an 8B model for 137 s again (benchmarks/results/compile_time_8b_regional.json, cache_reasons),
    and a body shared by several layers (passes.regions) failed to compile. Returns how many calls."""

    count = 0
    for call in gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.tag_activation_checkpoint):
        body = getattr(gm, call.args[0].target)
        changed = False
        for node in list(body.graph.nodes):
            if not _plain_causal(node):
                continue
            try:
                scale = softmax_scale(node)
            except CantRewrite:
                continue
            with body.graph.inserting_before(node):
                pair = body.graph.call_function(torch.ops.lemo.attention_lse.default,
                                                (*node.args[:3], None, scale, True))
                out = body.graph.call_function(operator.getitem, (pair, 0))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            body.graph.erase_node(node)
            changed = True
            count += 1
        if changed:
            body.graph.lint()
            body.recompile()
    return count


def _plain_causal(node: fx.Node) -> bool:
    """SDPA self-attention with is_causal, no mask, no dropout, and no argument lemo::attention_lse lacks."""
    kw = node.kwargs
    if (not is_call(node, *SDPA_TARGETS) or len(node.args) > 3 or sdpa_mask(node) is not None
            or not kw.get("is_causal", False) or attention_dropout(node) not in (0, 0.0)
            or set(kw) - {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}):
        return False
    return bool(_same_length(node))


def segments_of(mask: fx.Node | None) -> fx.Node | None:
    """The segment-id node a mask stands for, if structure_masks made it; else None."""
    if isinstance(mask, fx.Node) and is_call(mask, traced.segment_mask):
        return mask.args[0]
    return None


# -- reading a mask ----------------------------------------------------------------------------------


def _same_length(node: fx.Node) -> bool | None:
    """Whether an SDPA call's query and key are equally long; None when their shapes are unknown."""
    q, k = shape_of(node.args[0]), shape_of(node.args[1])
    if q is None or k is None:
        return None
    return q[-2] is k[-2] or str(q[-2]) == str(k[-2])  # never bool() a symbolic comparison (a guard)


def _why_not_plain(node: fx.Node) -> str | None:
    if _same_length(node) is False:  # (sparsify's compacted copies carry no shapes: both m long)
        return "query and key lengths differ"
    if attention_dropout(node) not in (0, 0.0):
        return "attention dropout"
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if causal:
        return "is_causal together with a mask"
    return None


def _why_not_sdpa_only(gm: fx.GraphModule, mask: fx.Node, sdpas: list) -> str | None:
    """A reason when the mask is read by anything but SDPA masks (directly, or through an activation
    checkpoint's operand), or when an SDPA call that reads it is not plain self-attention."""
    for mod, node in sdpas:
        why = _why_not_plain(node)
        if why:
            return f"{node.name}: {why}"
    for user in mask.users:
        if is_call(user, *SDPA_TARGETS) and sdpa_mask(user) is mask:
            continue
        if user.op == "call_function" and user.args and getattr(user.args[0], "op", None) == "get_attr":
            body = getattr(gm, user.args[0].target, None)
            if isinstance(body, fx.GraphModule) and _body_reads_only_sdpa(body, user, mask):
                continue
        return f"the mask is also read by {user.name}"
    return None


def _body_reads_only_sdpa(body: fx.GraphModule, call: fx.Node, mask: fx.Node) -> bool:
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    for i, operand in enumerate(call.args[1:]):
        if operand is not mask:
            continue
        if i >= len(placeholders):
            return False
        for u in placeholders[i].users:
            if not (is_call(u, *SDPA_TARGETS) and sdpa_mask(u) is placeholders[i]):
                return False
    return any(a is mask for a in call.args[1:])


def read_mask(gm: fx.GraphModule, mask: fx.Node) -> tuple[str | None, fx.Node | str]:
    """("padding" | "packed", the input it reads), or (None, why not)."""
    if mask.graph is not gm.graph:
        return None, "mask is computed outside the root graph"
    mshape = shape_of(mask)
    if mshape is None or len(mshape) != 4:
        return None, "mask is not 4-D"
    nodes = producers(mask)
    if isinstance(nodes, str):
        return None, f"mask {nodes}"
    inputs = [n for n in nodes if n.op == "placeholder" and isinstance(value_of(n), torch.Tensor)]
    for n in nodes:
        if n.op not in ("placeholder", "call_function", "call_method", "get_attr"):
            return None, f"mask depends on {n.op} {n.name}"
    if len(inputs) != 1:
        names = ", ".join(n.name for n in inputs) or "none"
        return None, f"mask reads {len(inputs)} input tensors ({names}); segments need exactly one"
    src = inputs[0]
    sshape = shape_of(src)
    if sshape is None or len(sshape) != 2 or value_of(src).is_floating_point():
        return None, f"mask reads {src.name}, not a (batch, tokens) integer tensor"
    try:
        b, n, mb = (_hint(d) for d in (sshape[0], mshape[-1], mshape[0]))
        if _hint(sshape[1]) != n or _hint(mshape[-2]) != n:
            return None, "mask is not square over the input's tokens"
        evaluate = _evaluator(gm, nodes, mask, src, n)
        if evaluate is None:
            return None, f"mask rows are not row-local and the whole mask is over {FULL_EVAL_BYTES >> 30} GiB"
        device = value_of(src).device
        for kind in (PADDING, PACKED):
            if all(_matches(evaluate, probe, kind, mb, n) for probe in _probes(kind, b, n, device)):
                if kind == PADDING and value_of(mask).is_floating_point():
                    return None, FLOAT_PADDING
                return kind, src
    except Exception as e:  # anything odd: the mask stays
        return None, f"could not evaluate the mask ({type(e).__name__}: {e})"
    return None, ("mask is neither causal + key padding nor causal within packed documents (sliding window "
                  "or a custom mask)")


def _hint(d) -> int:
    """size_hint, raising where a symbolic size has no hint (the mask is then left alone)."""
    hint = size_hint(d)
    if hint is None:
        raise ValueError(f"size {d} has no hint")
    return hint


def _scalar_inputs(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Placeholders of symbolic sizes (dynamic shapes) -> the values they had when traced."""
    out = {}
    for n in nodes:
        if n.op == "placeholder" and not isinstance(value_of(n), torch.Tensor):
            out[n] = _hint(value_of(n))
    return out


def _evaluator(gm: fx.GraphModule, nodes: list[fx.Node], mask: fx.Node, src: fx.Node, n: int):
    """(A function (probe, r0, rows) -> mask[..., r0:r0 + rows, :] for the input `src` = probe, rows per
    call): banded (HF's masks: rows row-local in one arange) or whole (small masks), symbolic sizes
    fixed to their hints; None when neither applies."""
    scalars = _scalar_inputs(nodes)
    bands = row_bands(gm, nodes, mask, shape_of(mask)[-1], inputs=(src,), fixed=scalars)
    if bands is not None:
        return (lambda probe, r0, count: bands(r0, count, probe)), max(1, BAND_ELEMENTS // n)
    if _hint(shape_of(mask)[0]) * n * n > FULL_EVAL_BYTES:
        return None
    fn = nodes_as_module(gm, nodes, mask, inputs=(src,), fixed=scalars)

    def whole(probe, r0, count):
        with torch.no_grad():
            return fn(probe)[..., r0:r0 + count, :]

    return whole, n


def _probes(kind: str, b: int, n: int, device) -> list[torch.Tensor]:
    """Inputs to evaluate the mask at: 4 probes of (b, n). Padding: every row meets no padding, left
    padding, right padding and holes across the probes. Packed: documents of random lengths (one-token
    documents included), one document, positions that do not start at 0."""
    g = torch.Generator().manual_seed(_PROBE_SEED)
    probes = []
    for p in range(4):
        rows = []
        for r in range(b):
            pattern = (r + p) % 4
            if kind == PADDING:
                row = torch.ones(n, dtype=torch.int64)
                if pattern == 1:
                    row[: max(1, n // 3)] = 0
                elif pattern == 2:
                    row[n - max(1, n // 4):] = 0
                elif pattern == 3:
                    row = (torch.rand(n, generator=g) < 0.7).to(torch.int64)
                    row[-1] = 1
            else:
                if pattern == 0:
                    row = torch.arange(n)
                else:
                    cuts = sorted(set(torch.randint(1, max(2, n), (1 + pattern * 3,), generator=g).tolist()))
                    if pattern == 3 and n > 2:
                        cuts = sorted(set(cuts + [n - 1, n - 2]))  # one-token documents
                    bounds = [0] + [c for c in cuts if 0 < c < n] + [n]
                    row = torch.cat([torch.arange(e - s) for s, e in zip(bounds, bounds[1:])])
                    if pattern == 2:
                        row = row + 5 * (row == torch.arange(n)).to(torch.int64)  # first document starts at 5
            rows.append(row)
        probes.append(torch.stack(rows).to(device))
    return probes


def _expected_segments(kind: str, probe: torch.Tensor) -> torch.Tensor:
    if kind == PADDING:
        return traced.segments_from_padding(probe)
    return traced.segments_from_positions(probe, probe.shape[0])


def _matches(evaluate, probe: torch.Tensor, kind: str, mb: int, n: int) -> bool:
    fn, step = evaluate
    seg = _expected_segments(kind, probe)
    if mb not in (1, seg.shape[0]) or (mb == 1 and seg.shape[0] != 1):
        return False
    cols = torch.arange(n, device=seg.device)
    for r0 in range(0, n, step):
        count = min(step, n - r0)
        m = fn(probe, r0, count)
        if m.dtype != torch.bool:
            if not m.is_floating_point():
                return False
            m = m > torch.finfo(m.dtype).min / 2
        m = m.expand(seg.shape[0], m.shape[1], count, n)
        rows = torch.arange(r0, r0 + count, device=seg.device)
        sq = seg[:, r0:r0 + count]
        want = (sq[:, None, :, None] == seg[:, None, None, :]) & (seg != 0)[:, None, None, :] \
            & (cols[None, None, None, :] <= rows[None, None, :, None])
        real = (sq != 0)[:, None, :, None]
        if not bool(((m == want) | ~real).all()):
            return False
    return True


# -- rewriting ---------------------------------------------------------------------------------------


def _rewrite(gm: fx.GraphModule, mask: fx.Node, kind: str, src: fx.Node) -> None:
    g = gm.graph
    with g.inserting_after(mask):
        if kind == PADDING:
            seg = g.call_function(traced.segments_from_padding, (src,))
            seg.meta["example_value"] = fake_apply(traced.segments_from_padding, src)
        else:
            b = shape_of(mask)[0]
            b = b if isinstance(b, int) else None  # a symbolic batch: position_ids carry it
            seg = g.call_function(traced.segments_from_positions, (src, b))
            seg.meta["example_value"] = fake_apply(traced.segments_from_positions, src, b)
    with g.inserting_after(seg):
        smask = g.call_function(traced.segment_mask, (seg,))
        smask.meta["example_value"] = fake_apply(traced.segment_mask, seg)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in mask.meta:
            seg.meta[key] = smask.meta[key] = mask.meta[key]
    for user in list(mask.users):
        if is_call(user, *SDPA_TARGETS):
            user.replace_input_with(mask, smask)
            continue
        # an activation checkpoint: pass the segments in, and build the mask node inside the body
        body = getattr(gm, user.args[0].target)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        args = list(user.args)
        for i, operand in enumerate(user.args[1:]):
            if operand is not mask:
                continue
            args[i + 1] = seg
            ph = placeholders[i]
            ph.meta["example_value"] = seg.meta["example_value"]
            ph.meta.pop("val", None)
            with body.graph.inserting_before(placeholders[-1].next):
                inner = body.graph.call_function(traced.segment_mask, (ph,))
            inner.meta["example_value"] = smask.meta["example_value"]
            for u in list(ph.users):
                if u is not inner:
                    u.replace_input_with(ph, inner)
        user.args = tuple(args)
    eliminate_dead_code(g)
