"""passes.sparsify — token elimination in the sparse decoder layers of a Dynamo graph.

For each sparse layer (LemoConfig.keep_fraction) it inserts, before the attention call:

    x_pred   = input_norm(h).detach()                       # the model's own norm output, no grad
    scores   = predictor(x_pred)                            # (b, nb), frozen
    idx, ok  = keep_set(scores, token_valid, B, keep)       # (b, m) sorted token rows, m = k * B

and then rewrites the attention block per `attn_mode` and the MLP block per `mlp_mode`:

    tokens   h1 = h0.scatter_add(idx, block_c(gather(h0, idx), gather(cos/sin), mask[idx][:, idx]))
    keys     k, v computed from gather(h0, idx); sdpa(q_all, k_c, v_c, mask[:, idx])
    backward a = block(h0.detach()) with sdpa -> lemo::attention_lse (dense, exact forward);
             a_c = block_c(gather(h0, idx)) with sdpa -> lemo::attention_kept (dropped-term backward);
             h1 = h0 + straight_through_rows(a, a_c, idx)    # value of a, gradient into a_c only

The compacted copy `block_c` is the block's own nodes cloned onto m rows. Shapes inside the block are
rewritten by tracking which axis of every value is the sequence axis (view/reshape/expand sizes on
that axis become m; everything else is left as traced). Ops the tracker does not understand make
the layer a SkipReason instead of a guess.
"""

from __future__ import annotations

import dataclasses
import operator
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx

from lemo_compile import ops, traced
from lemo_compile.config import AttnMode, LemoConfig, MlpMode

from .common import (LINEAR_TARGETS, MOVES, SDPA_TARGETS, CantRewrite, PassResult, closure_back, finish,
                     is_call, same_size, shape_of, softmax_scale, stream_base, value_of)
from .detect import Block, DetectResult, Layer
from .masks import segments_of
from . import seq_axis
from .seq_axis import propagate


@dataclasses.dataclass
class SparsifyResult(PassResult):
    # per rewritten layer: {"layer", "keep", "attn_mode", "mlp_mode", "kept_tokens"}
    layers: list[dict] = dataclasses.field(default_factory=list)


def sparsify(gm: fx.GraphModule, det: DetectResult, cfg: LemoConfig) -> SparsifyResult:
    res = SparsifyResult("sparsify")
    num_layers = det.num_layers if cfg.num_layers is None else cfg.num_layers
    if num_layers:
        cfg.check_layers(num_layers)
    if cfg.predictor not in ("pooled", "random") and num_layers:
        file_layers = ops.predictor_file(cfg.predictor)[0]["model"]["num_layers"]
        if file_layers != num_layers:
            raise ValueError(f"lemo predictors {cfg.predictor!r} were made for another model: "
                             f"{file_layers} layers in the file, {num_layers} in the model")
    touched: dict[int, fx.GraphModule] = {}
    renamed: dict[fx.Node, fx.Node] = {}  # residual-stream nodes replaced by a rewrite
    for layer in det.layers:
        keep = cfg.keep_fraction(layer.index, num_layers)
        if keep is None:
            res.counters["dense_layers"] += 1
            continue
        for old, new in renamed.items():
            for blk in (layer.attn, layer.mlp):
                if blk.residual_in is old:
                    _reroot(blk, new)
        try:
            info = _rewrite_layer(layer, keep, cfg, renamed=renamed,
                                  checkpointed=layer.gm is not gm)
        except CantRewrite as e:
            res.skip(e.kind, layer.name, e.detail)
            continue
        touched[id(layer.gm)] = layer.gm
        res.layers.append(info)
        res.counters["sparse_layers"] += 1
        res.counters[f"attn_{cfg.attn_mode.value}"] += 1
        res.counters[f"mlp_{cfg.mlp_mode.value}"] += 1
        if info["mlp_whole"] is not None:
            res.counters["mlp_whole"] += 1
    finish(gm, touched.values())
    return res


# -------------------------------------------------------------------------------------------------
# one layer
# -------------------------------------------------------------------------------------------------


def _rewrite_layer(layer: Layer, keep: Fraction, cfg: LemoConfig,
                   renamed: dict[fx.Node, fx.Node], checkpointed: bool = False) -> dict:
    attn, mlp = layer.attn, layer.mlp
    g = layer.gm.graph
    h0 = attn.residual_in
    hshape = shape_of(h0)
    n = hshape[1]
    sdpa = attn.sdpa
    seq_ext = _sequence_externals(attn, n)
    # validate everything that can refuse before the graph is touched
    _validate(attn, seq_ext)
    if mlp.whole is None and cfg.mlp_mode is not MlpMode.DENSE:
        try:
            _validate(mlp, {})
        except CantRewrite as e:
            mlp.whole = f"{e.kind}: {e.detail}"
    if mlp.whole is not None and mlp.reads is not None and cfg.mlp_mode is not MlpMode.DENSE:
        raise CantRewrite("parallel_residual", f"parallel-residual layer whose MLP cannot run on the kept rows "
                          f"({mlp.whole})")
    if mlp.reads is not None:
        # the blocks share the layer input's norm: rewriting one would cut the other's gradient to h. Summed
        # first (attn + mlp, then + h), the tokens rewrites, which replace each block's residual add, do not apply
        modes = (cfg.attn_mode, cfg.mlp_mode)
        ok_modes = [(AttnMode.BACKWARD, MlpMode.BACKWARD)]
        if attn.residual_add is not mlp.residual_add:
            ok_modes.append((AttnMode.TOKENS, MlpMode.TOKENS))
        if modes not in ok_modes:
            raise CantRewrite("parallel_residual", f"parallel-residual layer with attn_mode={cfg.attn_mode.value}, "
                              f"mlp_mode={cfg.mlp_mode.value}: supported are "
                              + ", ".join(f"{a.value}/{b.value}" for a, b in ok_modes))
    _check_sequence_parallel(attn, n, cfg)
    scale = softmax_scale(sdpa) if cfg.attn_mode is AttnMode.BACKWARD else None
    predictor, weights = cfg.predictor, None
    if cfg.predictor == "pooled":
        try:
            weights = _predictor_weights(attn)
        except CantRewrite:
            if cfg.attn_mode is not AttnMode.BACKWARD:
                raise  # only there is the full-length q and k computed anyway
            predictor = "pooled (attention q/k)"
    elif cfg.predictor != "random":
        _check_predictor_file(cfg, layer, x_width=shape_of(h0)[-1])

    # --- keep set, inserted right before the attention call ----------------------------------
    with g.inserting_before(sdpa):
        x_pred = g.call_method("detach", (_norm_output(layer, attn),))
        seg = segments_of(attn.mask)  # a mask passes.masks carries as segments
        valid = (g.call_function(traced.token_valid_from_segments, (seg,)) if seg is not None
                 else g.call_function(traced.token_valid_from_mask, (attn.mask, h0)))
        scores = _predictor_node(g, cfg, layer, attn, x_pred, valid, weights)
        ks = g.call_function(traced.keep_set, (scores, valid, cfg.block_size, keep.numerator,
                                            keep.denominator, tuple(cfg.forced_blocks), seg))
        idx = g.call_function(operator.getitem, (ks, 0))
        ok = g.call_function(operator.getitem, (ks, 1))
        m = g.call_method("size", (idx, 1))
    # Sparse checkpointing (docs/design.md §2.2): inside an activation-checkpoint body, the keep set and the
    # kept rows are marked saved, and the kept rows of the MLP's input are formed from them, so the
    # recompute in backward starts from m rows instead of the layer's full input. attn_mode="backward"
    # also saves the dense attention's output and log-sum-exp at the kept queries (they need every key).
    whole = mlp.whole if cfg.mlp_mode is not MlpMode.DENSE else None
    # A post-norm layer's MLP reads norm(h + attn): its kept rows are not formed from the attention's
    # Nor are they where a residual add takes the stream times a gain (MiniMax, Doge).
    scaled = attn.stream is not None or mlp.stream is not None
    sparse_ckpt = (checkpointed and cfg.sparse_checkpoint and cfg.mlp_mode is not MlpMode.DENSE and whole is None
                   and cfg.attn_mode in (AttnMode.TOKENS, AttnMode.BACKWARD) and not layer.post_norm and not scaled)
    if sparse_ckpt:
        with g.inserting_before(sdpa):
            idx = g.call_function(torch.ops.lemo.saved.default, (idx,))
            ok = g.call_function(torch.ops.lemo.saved.default, (ok,))

    attn_stack = attn.output.meta.get("nn_module_stack")
    mlp_stack = mlp.output.meta.get("nn_module_stack")
    before = set(g.nodes)
    mode = cfg.attn_mode
    compact = None  # (kept rows of h, their attention update) when the MLP can start from them
    if mode is AttnMode.TOKENS:
        compact = _attn_tokens(g, attn, seq_ext, idx, ok, m, save_rows=sparse_ckpt)
    elif mode is AttnMode.KEYS:
        _attn_keys(g, attn, seq_ext, idx, ok, m)
    else:
        compact = _attn_backward(g, attn, seq_ext, idx, ok, m, scale, save_rows=sparse_ckpt)

    before = _tag_new_nodes(g, before, attn_stack)
    mmode = cfg.mlp_mode
    rows = compact if sparse_ckpt else None
    if whole is not None:
        h2 = _mlp_whole(g, mlp, idx, ok, mmode)
        if h2 is not None:
            renamed[mlp.residual_add] = h2
    elif mmode is MlpMode.TOKENS:
        renamed[mlp.residual_add] = _mlp_tokens(g, mlp, idx, ok, m, rows)
    elif mmode is MlpMode.BACKWARD:
        _mlp_backward(g, mlp, idx, ok, m, rows)
    _tag_new_nodes(g, before, mlp_stack)
    if not checkpointed:
        saved = None
    elif sparse_ckpt:
        saved = "kept rows"
    elif not cfg.sparse_checkpoint:
        saved = "full input (sparse_checkpoint=False)"
    elif whole is not None:
        saved = "full input (the MLP runs whole)"
    elif layer.post_norm:
        saved = "full input (post-norm layer: the MLP reads a norm of the attention's residual sum)"
    elif scaled:
        saved = "full input (a residual add takes the stream times a gain)"
    else:
        saved = f"full input (attn_mode={mode.value}, mlp_mode={mmode.value} need every row in backward)"
    return {"layer": layer.index, "name": layer.name, "keep": float(keep), "attn_mode": mode.value,
            "mlp_mode": mmode.value, "mlp_whole": whole, "predictor": predictor, "kept_tokens": _kept(n, cfg, keep),
            "checkpoint_saves": saved}


def sequence_parallel_ranks(attn: Block) -> int:
    """P when the attention exchanges sequence slices between P ranks (lemo_compile.sequence_parallel's
    all-to-all around the attention), else 1."""
    exchange = _exchange(attn)
    return 1 if exchange is None else len(exchange.args[1])


def _exchange(attn: Block) -> fx.Node | None:
    return next((n for n in attn.nodes if seq_axis.is_all_to_all(n) and isinstance(n.args[1], (list, tuple))), None)


def _check_sequence_parallel(attn: Block, n: Any, cfg: LemoConfig) -> None:
    """Under sequence parallelism every rank compacts its slice to the same m rows and the ranks' kept rows
    are concatenated in rank order before attention (passes.seq_axis): exact in tokens and backward mode
    when every kept row is a real row. Keys mode masks keys by their position in the slice (not built)."""
    ranks = sequence_parallel_ranks(attn)
    if ranks == 1:
        return
    if cfg.attn_mode is AttnMode.KEYS:
        raise CantRewrite("sequence_parallel", f"attn_mode=keys under sequence parallelism ({ranks} ranks) is "
                          "not built (tokens and backward are)")
    if not isinstance(n, int) or n % cfg.block_size:
        raise CantRewrite("sequence_parallel", f"a slice of {n} rows is not a whole number of "
                          f"{cfg.block_size}-token blocks: a partly filled kept block would put rows that are "
                          "not tokens between the ranks' rows")
    if attn.mask is not None:
        raise CantRewrite("sequence_parallel", "an attention mask under sequence parallelism")


def _kept(n: Any, cfg: LemoConfig, keep: Fraction) -> Any:
    from lemo_compile.selection import kept_tokens_count
    m = kept_tokens_count(n, cfg.block_size, keep, cfg.forced_blocks)
    return m if isinstance(m, int) else str(m)  # never int() a SymInt: that adds a guard


def _norm_output(layer: Layer, attn: Block) -> fx.Node:
    """The normalized hidden states the predictor reads: the input norm's last node, else h."""
    out = None
    for n in attn.nodes:
        rel = layer.rel(n) or ""
        if rel.split(".")[0] in ("input_layernorm", "ln_1", "input_norm", "attention_norm"):
            out = n
    return out if out is not None else attn.residual_in


def _predictor_node(g: fx.Graph, cfg: LemoConfig, layer: Layer, attn: Block, x: fx.Node, valid: fx.Node,
                    weights: tuple | None) -> fx.Node:
    """The block-score node of cfg.predictor; for "pooled", `weights` are _predictor_weights(attn), or None
    when q/k are no linear map of x (then the attention's own q and k are pooled)."""
    if cfg.predictor == "random":
        lid = layer.index if layer.index is not None else (cfg.layer_index or 0)
        return g.call_function(torch.ops.lemo.random_block_scores.default, (x, lid, cfg.seed, cfg.block_size))
    if cfg.predictor != "pooled":  # a calibrated predictor file
        lid = layer.index if layer.index is not None else cfg.layer_index
        return g.call_function(torch.ops.lemo.calibrated_block_scores.default,
                               (x, valid, cfg.predictor, lid, cfg.block_size))
    if weights is None:  # q/k are no linear map of x (MLA): pool the attention's own, detached
        q, k = (g.call_method("detach", (t,)) for t in attn.sdpa.args[:2])
        return g.call_function(traced.pooled_attention_block_scores, (q, k, valid, cfg.block_size))
    kind, heads, hd, lin = weights
    if kind == "separate":
        wq, bq = _weight_bias(lin["q_proj"])
        wk, bk = _weight_bias(lin["k_proj"])
        kv_heads = shape_of(wk)[0] // hd
    elif kind == "probed":  # a fused projection of another layout (GPT-NeoX, CodeGen, GPTBigCode)
        picked = []
        for linear, rows in (lin["q"], lin["k"]):
            w, b = _weight_bias(linear)
            picked += [g.call_function(operator.getitem, (w, rows)),
                       g.call_function(operator.getitem, (b, rows)) if b is not None else None]
        wq, bq, wk, bk = picked
        kv_heads = len(lin["k"][1]) // hd
    else:
        w, b = _weight_bias(lin["qkv_proj"])
        rows = shape_of(w)[0]
        kv_heads = (rows - heads * hd) // (2 * hd)
        qs, ks = slice(0, heads * hd), slice(heads * hd, heads * hd + kv_heads * hd)
        wq = g.call_function(operator.getitem, (w, qs))
        wk = g.call_function(operator.getitem, (w, ks))
        bq = g.call_function(operator.getitem, (b, qs)) if b is not None else None
        bk = g.call_function(operator.getitem, (b, ks)) if b is not None else None
    return g.call_function(traced.pooled_block_scores, (x, valid, wq, bq, wk, bk, heads, kv_heads, cfg.block_size))


def _check_predictor_file(cfg: LemoConfig, layer: Layer, x_width) -> None:
    """A predictor file made for another model is an error (not a skip): the user asked for it."""
    meta, factors = ops.predictor_file(cfg.predictor)
    model = meta["model"]
    lid = layer.index if layer.index is not None else cfg.layer_index
    if lid is None:
        raise CantRewrite("predictor_inputs", "a single-layer graph without LemoConfig(layer_index=...) cannot "
                                              "use a calibrated predictor file")
    if model["hidden_size"] != x_width or lid not in factors:
        raise ValueError(f"lemo predictors {cfg.predictor!r} were made for another model: file hidden size "
                         f"{model['hidden_size']} and {model['num_layers']} layers, graph hidden size {x_width} "
                         f"at layer {lid}")
    if meta.get("block_size", cfg.block_size) != cfg.block_size:
        raise ValueError(f"lemo predictors {cfg.predictor!r} were calibrated with block size "
                         f"{meta['block_size']}, LemoConfig.block_size is {cfg.block_size}")


def _predictor_weights(attn: Block) -> tuple[str, int, int, dict]:
    q_shape = shape_of(attn.sdpa.args[0])
    lin = dict(attn.linears)
    for role, node in attn.linears.items():  # GPT-J's attn.q_proj: the attention module's own q/k
        leaf = role.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj") and role.count(".") == 1:
            lin.setdefault(leaf, node)
    heads, hd = q_shape[1] * sequence_parallel_ranks(attn), q_shape[-1]  # SDPA sees H / P heads per rank
    kind = "separate" if "q_proj" in lin and "k_proj" in lin else "fused" if "qkv_proj" in lin else None
    if kind == "separate" and (_out_features(lin["q_proj"]) != heads * hd or _out_features(lin["k_proj"]) % hd):
        kind = None  # q_proj also projects something else (Qwen3-Next: a gate per head)
    if kind is None:
        probed = _probe_qk_rows(attn, heads, hd)
        if isinstance(probed, str):
            raise CantRewrite("predictor_inputs", f"no q/k projections found for the pooled predictor "
                              f"(linears: {sorted(lin)}; {probed}); use LemoConfig(predictor='random')")
        kind, lin = "probed", {"q": probed[:2], "k": probed[2:]}
    return kind, heads, hd, lin


def _out_features(linear: fx.Node) -> Any:
    return shape_of(_weight_bias(linear)[0])[0]


def _probe_qk_rows(attn: Block, heads: int, hd: int):
    """(q linear, q rows, k linear, k rows): which output features of which projection become SDPA's query
    and key, head by head, found by running the data movement between them (views, transposes, chunks,
    indexing; a LoRA branch added to the projection passes through) on the features' indices, for any
    layout (GPT-NeoX interleaves q/k/v per head, CodeGen in groups, Qwen3-Next's q_proj interleaves each
    head's query with its output gate). A string says why not."""
    sides, why = [], "no single projection feeds the query or the key through views only"
    for t in attn.sdpa.args[:2]:
        for role, linear in attn.linears.items():
            if ".lora_" in role:
                continue
            got = _probe_side(attn, linear, t, hd)
            if isinstance(got, str):
                why = f"probing {role}: {got}"
            elif got is not None:
                sides.append((linear, got))
                break
        else:
            return why
    (lq, q_rows), (lk, k_rows) = sides
    overlap = lq is lk and set(q_rows) & set(k_rows)
    if len(q_rows) != heads * hd or len(k_rows) % hd or overlap:
        return f"query/key features do not form {heads} heads of {hd}"
    return lq, q_rows, lk, k_rows


def _probe_side(attn: Block, linear: fx.Node, target: fx.Node, hd: int):
    """The output features of `linear` that become SDPA input `target` (the features of the first batch
    row, first token, in order); None when `linear` does not feed it through data movement only."""
    closure = {linear}
    for node in attn.nodes:
        first = node.args[0] if node.args else None
        if first in closure and is_call(node, *MOVES):
            closure.add(node)
        elif is_call(node, operator.add, torch.add, "add") and sum(a in closure for a in node.args) == 1:
            closure.add(node)  # the projection plus its LoRA branch
    node = target  # walk back from the SDPA input along computed operands (rotary, q/k norms)
    while isinstance(node, fx.Node) and node not in closure:
        flat = [a for a in node.args for a in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(a, fx.Node)]
        node = next((a for a in flat if a.op not in ("placeholder", "get_attr")), None)
    if node is None or node is linear:
        return None
    # partial rotary (GPT-NeoX) slices the head dims first: climb to the whole head
    while node is not linear and (shape_of(node) or [hd])[-1] != hd and node.args and node.args[0] in closure:
        node = node.args[0]
    val = value_of(linear)
    if not isinstance(val, torch.Tensor) or val.dim() != 3:
        return "the projection's output is not (batch, tokens, features)"
    b, n, f = (int(x) for x in val.shape)
    pos = torch.arange(n, dtype=torch.float64)[:, None] * f
    env = {linear: (pos + torch.arange(f, dtype=torch.float64)).expand(b, n, f).contiguous()}
    try:
        for c in attn.nodes:
            if c in closure and c is not linear:
                if is_call(c, operator.add, torch.add, "add"):
                    env[c] = next(env[a] for a in c.args if a in closure)
                    continue
                env[c] = seq_axis.run_concrete(c, env)
                if c is node:
                    break
    except Exception as e:  # a size only known at run time, an op the probe cannot run
        return type(e).__name__
    first = env[node][0].flatten()
    return [int(v) % f for v in first[first < f].tolist()]
    return "no single projection feeds both the query and the key through views only"


def _validate(blk: Block, seq_ext: dict[fx.Node, int]) -> None:
    """Dry run of the sequence-axis tracking over the whole block; raises CantRewrite, changes nothing."""
    axes: dict[fx.Node, Any] = {blk.residual_in: 1, **seq_ext}
    if blk.reads is not None:
        axes[blk.reads] = 1
    for node in blk.nodes:
        ax, _, _ = propagate(node, axes, None)
        if ax is not None:
            axes[node] = ax
    if axes.get(blk.output) != 1:
        raise CantRewrite("sequence_axis", f"block output {blk.output.name} does not keep the sequence on axis 1")


def _weight_bias(linear: fx.Node) -> tuple[fx.Node, Any]:
    w = linear.args[1] if len(linear.args) > 1 else linear.kwargs["weight"]
    b = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return w, b


def _sequence_externals(blk: Block, n: Any) -> dict[fx.Node, int]:
    """Externals other than h and the mask that carry the sequence (rotary cos/sin), with the axis they
    carry it on: 1, or the one other axis of that size (RoFormer's (1, 1, n, d) sinusoidal positions; axis
    0 is the batch's). Parameters never do, whatever their sizes (a norm weight of the hidden size when
    the sequence is as long)."""
    out = {}
    weights = {a for node in blk.nodes if is_call(node, *LINEAR_TARGETS) for a in node.args[1:]}
    for e in blk.externals:
        if e is blk.residual_in or e is blk.mask or e in weights or isinstance(value_of(e), torch.nn.Parameter):
            continue
        shp = shape_of(e)
        axes = [i for i, s in enumerate(shp or ()) if same_size(s, n)]
        if shp is not None and len(shp) >= 2 and same_size(shp[1], n):
            out[e] = 1
        elif len(axes) == 1 and axes[0] >= 1:
            out[e] = axes[0]
        elif axes:
            raise CantRewrite("unknown_sequence_input", f"block input {e.name} {tuple(shp)} has the sequence "
                              "length on the batch axis or on several axes")
    return out


# -------------------------------------------------------------------------------------------------
# attention modes
# -------------------------------------------------------------------------------------------------


def _gather_inputs(g: fx.Graph, h: fx.Node, seq_ext: dict[fx.Node, int], idx: fx.Node) -> dict[fx.Node, fx.Node]:
    env = {h: g.call_function(traced.gather_seq, (h, idx, 1))}
    for e, axis in seq_ext.items():
        env[e] = g.call_function(traced.gather_seq, (e, idx, axis))
    return env


def _attn_tokens(g, attn: Block, seq_ext, idx, ok, m, save_rows: bool = False) -> tuple[fx.Node, fx.Node]:
    with g.inserting_before(attn.residual_add):
        env = _gather_inputs(g, attn.residual_in, seq_ext, idx)
        x_c = env[attn.residual_in]
        if save_rows:
            x_c = env[attn.residual_in] = g.call_function(torch.ops.lemo.saved.default, (x_c,))
        mask_c = _kept_mask(g, attn.mask, idx, ok)
        out_c = _clone(g, attn, attn.nodes, env, m, sdpa_patch=lambda node: _set_mask(node, mask_c),
                       seq_ext=seq_ext)[attn.output]
        stream = attn.stream if attn.stream is not None else attn.residual_in  # what the residual add takes
        h1 = _like(g.call_function(traced.scatter_add_rows, (stream, out_c, idx, ok)), attn.residual_add)
    attn.residual_add.replace_all_uses_with(h1)
    return x_c, out_c


def _attn_keys(g, attn: Block, seq_ext, idx, ok, m) -> None:
    sdpa = attn.sdpa
    body = set(attn.nodes)
    kv_nodes = closure_back(sdpa.args[1], body) | closure_back(sdpa.args[2], body)
    order = [n for n in attn.nodes if n in kv_nodes]
    with g.inserting_before(sdpa):
        env = _gather_inputs(g, attn.residual_in, seq_ext, idx)
        q_pos = g.call_function(traced.positions_like, (idx, attn.residual_in))
        if segments_of(attn.mask) is not None:
            mask_k = g.call_function(traced.segment_mask_keys, (segments_of(attn.mask), idx, ok))
        elif attn.mask is not None:
            mask_k = g.call_function(traced.gather_mask, (attn.mask, None, idx, ok))
        else:
            mask_k = g.call_function(traced.causal_positions_mask, (q_pos, idx, ok))
        _clone(g, attn, order, env, m, check_output=False, seq_ext=seq_ext)
    args = list(sdpa.args)
    args[1], args[2] = env[sdpa.args[1]], env[sdpa.args[2]]
    kwargs = dict(sdpa.kwargs)
    if len(args) > 3:
        args[3] = mask_k
    else:
        kwargs["attn_mask"] = mask_k
    kwargs["is_causal"] = False
    sdpa.args, sdpa.kwargs = tuple(args), kwargs


def _attn_backward(g, attn: Block, seq_ext, idx, ok, m, scale, save_rows: bool = False) -> tuple[fx.Node, fx.Node]:
    sdpa = attn.sdpa
    h0 = attn.residual_in
    q, k, v = sdpa.args[:3]
    # dense attention with its log-sum-exp (inputs detached below: exact forward, nothing saved)
    with g.inserting_before(sdpa):
        qd, kd, vd = (g.call_method("detach", (t,)) for t in (q, k, v))  # LoRA weights still want grad
        seg = segments_of(attn.mask)
        if seg is not None:
            lse_pair = g.call_function(torch.ops.lemo.segment_attention.default, (qd, kd, vd, seg, scale))
        else:
            lse_pair = g.call_function(torch.ops.lemo.attention_lse.default,
                                       (qd, kd, vd, attn.mask, scale, bool(sdpa.kwargs.get("is_causal", False))))
        dense_out = g.call_function(operator.getitem, (lse_pair, 0))
        dense_lse = g.call_function(operator.getitem, (lse_pair, 1))
    # kept rows, with grad: attention output = the dense one, backward = the dropped-term one
    with g.inserting_before(attn.residual_add):
        env = _gather_inputs(g, h0, seq_ext, idx)
        # under sequence parallelism the attention sees every rank's kept rows in rank order: their
        # positions in the global sequence (rank r's slice starts at r x n) and validity
        idx_a, ok_a = idx, ok
        exchange = _exchange(attn)
        if exchange is not None:
            ranks, group, n = len(exchange.args[1]), exchange.args[3], shape_of(h0)[1]
            idx_a = g.call_function(traced.gather_ranks, (idx, ranks, group, n))
            ok_a = g.call_function(traced.gather_ranks, (ok, ranks, group))
        out_g = g.call_function(traced.gather_seq, (dense_out, idx_a, 2))
        lse_g = g.call_function(traced.gather_seq, (dense_lse, idx_a, 2))
        if save_rows:  # the recompute in backward starts from these, never from the full input
            env[h0], out_g, lse_g = (g.call_function(torch.ops.lemo.saved.default, (t,))
                                     for t in (env[h0], out_g, lse_g))
        # the model's mask gathered to kept x kept; without one, causal by the kept rows' positions,
        # which the op's backward expands a chunk of queries at a time (never an m x m mask)
        # with segments: causal by position within the kept rows' segments (0 = out of range)
        mask_c = None
        if seg is not None:
            pos, valid = idx, g.call_function(traced.gather_segments, (seg, idx, ok))
        elif attn.mask is not None:
            mask_c = g.call_function(traced.gather_mask, (attn.mask, idx, idx, ok))
            pos, valid = None, None
        else:
            pos, valid = idx_a, ok_a

        def kept_attention(node: fx.Node) -> fx.Node:
            return g.call_function(torch.ops.lemo.attention_kept.default,
                                   (env[q], env[k], env[v], out_g, lse_g, mask_c, pos, valid, scale))

        out_c = _clone(g, attn, attn.nodes, env, m, replace={sdpa: kept_attention}, seq_ext=seq_ext)[attn.output]
        a_st = _like(g.call_function(traced.straight_through_rows, (attn.output, out_c, idx, ok)), attn.output)
    sdpa.replace_all_uses_with(dense_out)
    g.erase_node(sdpa)
    attn.nodes = [n for n in attn.nodes if n is not sdpa]
    _detach_block_input(g, attn, h0)
    attn.residual_add.replace_input_with(attn.output, a_st)
    return env[h0], out_c  # out_c equals the attention update at the kept rows (attention_kept is the identity)


def _kept_mask(g: fx.Graph, mask: fx.Node | None, idx: fx.Node, ok: fx.Node) -> fx.Node | None:
    """The model's mask restricted to kept x kept rows: gathered from the tensor, or, for a mask carried as
    segments, the segment mask of the kept rows' segments (kept rows are sorted, so compact order is
    causal order; passes.masks then lowers the attention to lemo::segment_attention)."""
    seg = segments_of(mask)
    if seg is not None:
        return g.call_function(traced.segment_mask, (g.call_function(traced.gather_segments, (seg, idx, ok)),))
    return g.call_function(traced.gather_mask, (mask, idx, idx, ok)) if mask is not None else None


def _set_mask(node: fx.Node, mask_c: fx.Node | None) -> None:
    if mask_c is None:
        return
    if len(node.args) > 3:
        args = list(node.args)
        args[3] = mask_c
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "attn_mask": mask_c}


# -------------------------------------------------------------------------------------------------
# MLP modes
# -------------------------------------------------------------------------------------------------


def _mlp_input(mlp: Block) -> fx.Node:
    """The MLP's residual input as the graph has it now (the attention rewrite may have replaced it)."""
    return mlp.residual_add.args[0] if mlp.residual_add.args[1] is mlp.output else mlp.residual_add.args[1]


def _kept_rows(g, h1: fx.Node, idx, ok, rows) -> fx.Node:
    """The rows idx of the MLP's input: gathered from h1, or, given (x_c, out_c) of the attention's kept
    rows, formed as x_c + out_c, which does not read h1. In tokens mode that equals h1 at the kept rows
    exactly; in backward mode up to the rounding of the output projection over m rows instead of n."""
    if rows is None:
        return g.call_function(traced.gather_seq, (h1, idx, 1))
    return g.call_function(traced.add_rows, (rows[0], rows[1], ok))


def _mlp_env(g, mlp: Block, h1: fx.Node, idx, ok, rows) -> dict[fx.Node, fx.Node]:
    """Inputs of the MLP's compacted copy: the kept rows of the stream it reads. A parallel-residual MLP
    reads the layer input h0 (kept rows: the attention's gathered rows when given), possibly through the
    h0.detach() the attention's backward rewrite put into their shared norm."""
    if mlp.reads is None:
        return {h1: _kept_rows(g, h1, idx, ok, rows)}
    h0 = mlp.reads
    x_c = rows[0] if rows is not None else g.call_function(traced.gather_seq, (h0, idx, 1))
    env = {h0: x_c}
    for node in mlp.nodes:
        for a in node.all_input_nodes:
            if is_call(a, "detach") and a.args[0] is h0:
                env[a] = x_c
    return env


def _mlp_reads(mlp: Block, h1: fx.Node) -> fx.Node:
    """What the MLP body reads, given its residual add's stream operand h1: h1, or x of h1 = gain * x."""
    return stream_base(h1) if mlp.stream is not None else h1


def _mlp_tokens(g, mlp: Block, idx, ok, m, rows=None) -> None:
    h1 = _mlp_input(mlp)
    _reroot(mlp, _mlp_reads(mlp, h1))
    with g.inserting_before(mlp.residual_add):
        env = _mlp_env(g, mlp, mlp.residual_in, idx, ok, rows)
        out_c = _clone(g, mlp, mlp.nodes, env, m)[mlp.output]
        h2 = _like(g.call_function(traced.scatter_add_rows, (h1, out_c, idx, ok)), mlp.residual_add)
    mlp.residual_add.replace_all_uses_with(h2)
    return h2


def _mlp_backward(g, mlp: Block, idx, ok, m, rows=None) -> None:
    h1 = _mlp_reads(mlp, _mlp_input(mlp))
    _reroot(mlp, h1)
    with g.inserting_before(mlp.residual_add):
        env = _mlp_env(g, mlp, h1, idx, ok, rows)
        out_c = _clone(g, mlp, mlp.nodes, env, m)[mlp.output]
        m_st = _like(g.call_function(traced.straight_through_rows, (mlp.output, out_c, idx, ok)), mlp.output)
    _detach_block_input(g, mlp, mlp.reads if mlp.reads is not None else h1)
    mlp.residual_add.replace_input_with(mlp.output, m_st)


def _mlp_whole(g, mlp: Block, idx, ok, mode: MlpMode) -> fx.Node | None:
    """An MLP the kept rows cannot be followed through (mlp.whole says why) runs on every row, as written,
    and only its output is cut to the mode's semantics (docs/design.md §2): in tokens mode the residual stream gets
    its update at the kept rows only (returned: the new residual add); in backward mode the forward is
    unchanged and gradient enters the MLP at the kept rows only. Exact to the reference; it saves neither
    MLP compute nor MLP activations, only the attention's."""
    with g.inserting_before(mlp.residual_add):  # after every in-place update inside the MLP
        out_c = g.call_function(traced.gather_seq, (mlp.output, idx, 1))
        if mode is MlpMode.TOKENS:
            h2 = _like(g.call_function(traced.scatter_add_rows, (_mlp_input(mlp), out_c, idx, ok)), mlp.residual_add)
        else:
            m_st = _like(g.call_function(traced.straight_through_rows, (mlp.output, out_c, idx, ok)), mlp.output)
    if mode is MlpMode.TOKENS:
        mlp.residual_add.replace_all_uses_with(h2)
        return h2
    mlp.residual_add.replace_input_with(mlp.output, m_st)
    return None


def _detach_block_input(g: fx.Graph, blk: Block, h: fx.Node) -> None:
    """Make the original (dense, forward-exact) copy of a block read h.detach(): it keeps nothing for backward."""
    with g.inserting_before(blk.nodes[0]):
        h_det = _like(g.call_method("detach", (h,)), h)
    for node in blk.nodes:
        node.replace_input_with(h, h_det)


def _tag_new_nodes(g: fx.Graph, before: set, stack: Any) -> set:
    """Give nodes inserted since `before` the module stack of the block they serve, so backward
    nodes and saved activations stay attributed to their layer. Returns the new snapshot."""
    now = set(g.nodes)
    if stack is not None:
        for n in now - before:
            n.meta.setdefault("nn_module_stack", stack)
    return now


def _like(new: fx.Node, old: fx.Node) -> fx.Node:
    """Give a full-length replacement node the fake value of the node it stands for (same shape)."""
    if "example_value" in old.meta:
        new.meta["example_value"] = old.meta["example_value"]
    return new


def _reroot(blk: Block, h: fx.Node) -> None:
    blk.externals = [h if e is blk.residual_in else e for e in blk.externals]
    blk.residual_in = h


# -------------------------------------------------------------------------------------------------
# cloning a block onto the compacted rows
# -------------------------------------------------------------------------------------------------

def _clone(g: fx.Graph, blk: Block, nodes: list[fx.Node], env: dict[fx.Node, fx.Node], m: fx.Node,
           sdpa_patch=None, replace: dict | None = None, check_output: bool = True,
           seq_ext: dict[fx.Node, int] | None = None) -> dict[fx.Node, fx.Node]:
    """Copy `nodes` (graph order) at the insertion point with env applied (env maps the inputs that
    live on the compacted rows, sequence on axis 1, or on seq_ext's axis for those externals),
    rewriting sizes on the sequence axis to m.
    `replace` maps a node to a factory of its replacement (its output keeps the sequence on axis 2,
    like an attention output). Returns env, original -> copy."""
    axes: dict[fx.Node, Any] = {k: (seq_ext or {}).get(k, 1) for k in env}  # originals on the compacted rows
    replace = replace or {}
    for node in nodes:
        if node in replace:
            env[node] = replace[node](node)
            axes[node] = 2
            if ("global", node.args[0]) in axes:  # attention over every rank's rows (sequence parallelism)
                axes[("global", node)] = axes[("global", node.args[0])]
            continue
        ax, args, kwargs = propagate(node, axes, m)
        new = g.node_copy(node, lambda a: env.get(a, a))
        for key in ("example_value", "val", "tensor_meta"):  # the copy has other shapes: no stale fakes
            new.meta.pop(key, None)
        new.meta["lemo_like"] = node  # same dtype and rank as the original (passes.fuse reads it)
        new.args = fx.map_arg(args, lambda a: env.get(a, a))
        new.kwargs = fx.map_arg(kwargs, lambda a: env.get(a, a))
        if sdpa_patch is not None and is_call(node, *SDPA_TARGETS):
            sdpa_patch(new)
        env[node] = new
        if ax is not None:
            axes[node] = ax
    if check_output and axes.get(blk.output) != 1:
        raise CantRewrite("sequence_axis", f"block output {blk.output.name} does not keep the sequence on axis 1")
    return env
