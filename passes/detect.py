"""passes.detect — find decoder layers and their attention and MLP blocks in a Dynamo FX graph.

Read-only. Blocks are found by module metadata first (`nn_module_stack`, matched by the tail of the
module path because prefixes differ across torch and PEFT versions), then confirmed by structure:

    h0 ──► [attention block: input norm, q/k/v (+LoRA, biases, q/k norms), rotary, SDPA, o_proj, ...] ──► a
    h1 = h0 + a                                   # first residual add, in the decoder-layer scope
    h1 ──► [MLP block: post-attention norm, gate/up/down (+LoRA) or fused variants] ──► m
    h2 = h1 + m                                   # second residual add

A block is every node of the layer on a path from the residual input to the block output, so
sandwich norms (Gemma3) and fused projections (Phi-3) need no special case. Decoder layers inside
activation-checkpoint bodies (`tag_activation_checkpoint(wrap_body_N, ...)`) are found by recursing
into the body graphs; a graph holding a single decoder layer (per-layer compile, FSDP2) works too.
Anything it cannot classify becomes a SkipReason, never an exception.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F

from .common import (EAGER_REFUSAL, LINEAR_TARGETS, MOVES, SDPA_TARGETS, CantRewrite, PassResult, attention_dropout,
                     closure_back, is_add, is_call, layer_index, layer_of, module_stack, rel_path, same_size, shape_of,
                     stream_base, subgraph_modules, value_of)

# Attention implementations lemo can rewrite; others (eager matmul+softmax, flex, flash kernels
# outside the graph) are reported and left alone.
KNOWN_ATTENTION = "sdpa"

@dataclasses.dataclass
class Block:
    kind: str  # "attn" or "mlp"
    residual_in: fx.Node  # h: the residual stream entering the block
    output: fx.Node  # the block's contribution (second operand of the residual add)
    residual_add: fx.Node  # h + output
    nodes: list[fx.Node]  # graph order, excluding the residual add
    externals: list[fx.Node]  # inputs from outside the block (weights, cos/sin, mask, h)
    linears: dict[str, fx.Node]  # role (e.g. "q_proj", "q_proj.lora_A") -> linear node
    lora: int = 0  # number of LoRA branches (A/B pairs)
    sdpa: fx.Node | None = None
    mask: fx.Node | None = None  # external attention mask (None: is_causal or no mask)
    # parallel-residual MLP (Cohere: h + attn(norm(h)) + mlp(norm(h))): the stream it reads, which is
    # the layer input, not the other operand of its residual add. None: it reads residual_in.
    reads: fx.Node | None = None
    # the residual add's stream operand when it is a gain times residual_in (MiniMax: alpha * h + beta *
    # attn; Doge: a learned per-channel gain; passes.common.stream_base), None when it is residual_in
    stream: fx.Node | None = None
    # an MLP whose rows the rewrites cannot follow (mixture-of-experts dispatch, in-place updates): why.
    # It then runs whole, on every row as written; sparsify cuts only its output to the mode's semantics.
    whole: str | None = None

    def describe(self) -> str:
        roles = sorted(r for r in self.linears if ".lora_" not in r)
        s = f"{self.kind}: {len(self.nodes)} nodes, linears {roles}, lora {self.lora}"
        if self.reads is not None:
            s += ", parallel (reads the layer input)"
        if self.whole is not None:
            s += f", runs whole ({self.whole})"
        if self.kind == "attn":
            s += ", mask " + ("4-D tensor" if self.mask is not None else "none (is_causal)")
        return s


@dataclasses.dataclass
class Layer:
    path: str  # module path of the decoder layer (the compiled root's name for a one-layer graph)
    cls: str
    index: int | None
    gm: fx.GraphModule  # the graph module whose graph holds the layer's nodes
    attn: Block | None = None
    mlp: Block | None = None
    # post-norm (BART, BERT, GPT-1): the MLP block reads a norm of the attention's residual sum, not the sum
    post_norm: bool = False

    def rel(self, node: fx.Node) -> str | None:
        """The node's module path relative to this layer ("self_attn.q_proj", "" for layer scope)."""
        return rel_path(node, self.path)

    @property
    def name(self) -> str:
        return f"layers.{self.index}" if self.index is not None else self.path or self.cls


@dataclasses.dataclass
class DetectResult(PassResult):
    layers: list[Layer] = dataclasses.field(default_factory=list)
    num_layers: int | None = None

    def summary(self) -> dict[str, int]:
        return {
            "layers": len(self.layers),
            "attn": sum(l.attn is not None for l in self.layers),
            "mlp": sum(l.mlp is not None for l in self.layers),
            "lora": sum((l.attn.lora if l.attn else 0) + (l.mlp.lora if l.mlp else 0) for l in self.layers),
            "skips": len(self.skips),
        }


def detect(gm: fx.GraphModule) -> DetectResult:
    """Find every decoder layer of `gm` (recursing into HOP bodies) and classify its blocks."""
    res = DetectResult("detect")
    _detect_in(gm, res, where="")
    # layers skipped here count too: the schedule (dense_layer_set) is over the model's depth, and a hybrid
    # model's last layers may be linear-attention ones that get no Layer
    idx = [i for i in [l.index for l in res.layers] + [layer_index(s.where) for s in res.skips] if i is not None]
    res.num_layers = max(idx) + 1 if idx else None
    res.counters["layers"] = len(res.layers)
    res.counters["attn_blocks"] = sum(l.attn is not None for l in res.layers)
    res.counters["mlp_blocks"] = sum(l.mlp is not None for l in res.layers)
    res.counters["lora_branches"] = res.summary()["lora"]
    if not res.layers and not res.skips:
        res.skip("no_decoder_layers", "graph", "no node belongs to a module named like a decoder layer "
                 "(class *DecoderLayer, path layers.N, or a *Layer / *Block entry of a module list)")
    return res


def _detect_in(gm: fx.GraphModule, res: DetectResult, where: str) -> None:
    groups: dict[str, list[fx.Node]] = collections.OrderedDict()
    classes: dict[str, str] = {}
    hops: dict[str, list[fx.Node]] = {}  # layer path -> its higher-order op calls here
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        lo = layer_of(node)
        if lo is None:
            continue
        path, cls, _ = lo
        if is_call(node, torch.ops.higher_order.tag_activation_checkpoint) or node.op == "call_function" and \
                isinstance(node.target, torch._ops.HigherOrderOperator):
            hops.setdefault(path, []).append(node)
            continue
        groups.setdefault(path, []).append(node)
        classes[path] = cls
    # a layer whose attention or projections run in this graph holds any higher-order op it calls (Bloom's
    # GELU is an autograd.Function: Dynamo traces it as a HOP with forward/backward bodies); only a layer
    # with no such compute here lives inside its HOP's body (an activation checkpoint)
    inline = {path for path, nodes in groups.items()
              if any(is_call(n, *SDPA_TARGETS, *LINEAR_TARGETS) for n in nodes)}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for path in inline & set(hops):
        groups[path] = sorted(groups[path] + hops[path], key=order.__getitem__)
    for path, nodes in groups.items():
        if path in hops and path not in inline:
            continue  # only the call of a checkpointed layer lives here; its body is a subgraph
        _add_layer(res, Layer(path=path, cls=classes[path], index=layer_index(path), gm=gm), nodes)
    if not groups and not hops:
        _detect_root_layer(gm, res)
    for name, sub, get_attr in subgraph_modules(gm):
        lo = next((layer_of(u) for u in get_attr.users), None)
        if lo is not None and lo[0] in inline:
            continue  # the body of an op inside an inline layer (part of one of its blocks)
        _detect_in(sub, res, where=f"{where}{name}.")
    # HOP nodes for layers whose body we did not find as a subgraph
    found = {l.path for l in res.layers} | {s.where for s in res.skips}
    for path in set(hops) - set(groups):
        if path not in found and not any(l.path == path for l in res.layers):
            res.skip("opaque_layer", path, "decoder layer hidden inside a higher-order op whose body "
                     "could not be inspected")


def _detect_root_layer(gm: fx.GraphModule, res: DetectResult) -> None:
    """A graph compiled from one decoder layer (per-layer compile, FSDP2): module paths start at the
    compiled module itself, so no path names a decoder layer, but its children (an attention and an
    MLP module) are there."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    tops = {}
    for n in nodes:
        st = module_stack(n)
        if st:
            tops.setdefault(st[0][0], st[0][1])
    roots = {p.rsplit(".", 1)[0] for p in tops if "." in p}
    has_attn = any(c.endswith("Attention") for c in tops.values())
    has_mlp = any(c.endswith("MLP") or p.endswith(".mlp") for p, c in tops.items())
    if len(roots) != 1 or not (has_attn and has_mlp):
        return
    _add_layer(res, Layer(path=roots.pop(), cls="(compiled module)", index=None, gm=gm), nodes)


def _add_layer(res: DetectResult, layer: Layer, nodes: list[fx.Node]) -> None:
    """Classify the layer's blocks; a layer that does not fit becomes a SkipReason."""
    try:
        _classify_layer(layer, nodes)
    except CantRewrite as e:
        res.skip(e.kind, layer.name, e.detail)
        return
    res.layers.append(layer)


def _classify_layer(layer: Layer, nodes: list[fx.Node]) -> None:
    in_layer = set(nodes)
    add1, add2 = _residual_adds(layer, nodes)
    if not any(a not in in_layer for a in add1.args) and add1 in add2.args:
        _classify_parallel_sum(layer, add1, add2, in_layer)
        return
    try:
        h0 = s0 = _residual_operand(add1, in_layer, external=True)
    except CantRewrite:
        h0, s0 = _scaled_stream(add1, in_layer)
    a = add1.args[1] if add1.args[0] is s0 else add1.args[0]
    layer.attn = _make_block(layer, "attn", h0, a, add1, in_layer, stop={h0})
    layer.attn.stream = s0 if s0 is not h0 else None
    try:
        s1 = _stream_after(add1, add2, in_layer)
        m = add2.args[1] if add2.args[0] is s1 else add2.args[0]
        layer.post_norm = s1 is not add1
        try:
            layer.mlp = _make_block(layer, "mlp", s1, m, add2, in_layer, stop={s1, add1, h0})
        except CantRewrite as e:
            if e.kind != "residual_structure" or layer.post_norm:
                raise
            # parallel residual: the MLP reads the layer input (through its own or the shared norm)
            layer.mlp = _make_block(layer, "mlp", add1, m, add2, in_layer, stop={add1, h0}, reads=h0)
    except CantRewrite as e:  # the stream may enter the second add times a gain
        scaled = _scaled_stream_after(add1, add2, in_layer) if e.kind == "residual_structure" else None
        if scaled is None:
            raise
        s1, stream = scaled
        m = add2.args[1] if add2.args[0] is stream else add2.args[0]
        layer.post_norm = s1 is not add1
        layer.mlp = _make_block(layer, "mlp", s1, m, add2, in_layer, stop={s1, stream, add1, h0})
        layer.mlp.stream = stream
    _check_attention(layer.attn)
    _check_mlp(layer.mlp)


def _residual_adds(layer: Layer, nodes: list[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """The layer's two residual adds: the tensor adds in the layer's own scope (the first two where each
    later one adds to the one before), or, where it has none (BERT-style layers add the residual inside
    their attention-output and output modules, then normalize), the adds anywhere in the layer of two
    same-shape (b, n, d) tensors."""
    adds = [n for n in nodes if is_add(n) and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args)]
    scoped = [n for n in adds if layer.rel(n) == ""]
    if not scoped:
        deep = [n for n in adds if _same_bnd(*n.args)]
        # of the residual stream's width: the layer's last such add (BigBird's tanh GELU adds at MLP width)
        deep = [n for n in deep if _same_bnd(n, deep[-1])] if deep else deep
        if len(deep) == 2:
            return deep[0], deep[1]
    if len(scoped) > 2 and all(prev in nxt.args for prev, nxt in zip(scoped[1:], scoped[2:])):
        # later residual blocks, each adding to the previous sum (Gemma 4's per-layer-input gate after
        # the MLP), stay dense as written: the attention and the MLP are the first two
        return scoped[0], scoped[1]
    if len(scoped) != 2:
        raise CantRewrite("residual_structure", f"expected 2 residual adds in the decoder layer scope, found "
                          f"{len(scoped)}")
    return scoped[0], scoped[1]


def _scaled_stream(add1: fx.Node, in_layer: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """(h, g * h) where the first residual add takes the stream times a gain (stream_base): h from outside the
    layer (Doge), or computed from outside by ops without a linear or attention (MiniMax's stream is the
    input norm's output: alpha * norm(x) + beta * attn(norm(x)))."""
    found = []
    for s in add1.args:
        h = stream_base(s)
        if h is s:
            continue
        chain = closure_back(h, in_layer)
        if h not in in_layer or (not any(is_call(n, *LINEAR_TARGETS, *SDPA_TARGETS) for n in chain)
                                 and any(a not in in_layer for n in chain for a in n.all_input_nodes)):
            found.append((h, s))
    if len(found) != 1:
        raise CantRewrite("residual_structure", f"cannot tell the residual input of {add1.name}")
    return found[0]


def _scaled_stream_after(add1: fx.Node, add2: fx.Node, in_layer: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """(what the MLP reads, add2's stream operand) where that operand is a gain times add1 (Doge) or times a
    norm of it (MiniMax); None if neither operand is."""
    for p in add2.args:
        base = stream_base(p)
        if base is p:
            continue
        if base is add1:
            return add1, p
        if _norm_of(base, add1, in_layer):
            return base, p
    return None


def _norm_of(p: fx.Node, add1: fx.Node, in_layer: set[fx.Node]) -> bool:
    """Whether p is computed from add1 by ops without a linear or attention (a norm), same (b, n, d) size."""
    chain = closure_back(p, in_layer, stop={add1})
    return (bool(chain) and any(add1 in n.all_input_nodes for n in chain) and _same_bnd(p, add1)
            and not any(is_call(n, *LINEAR_TARGETS, *SDPA_TARGETS) for n in chain))


def _stream_after(add1: fx.Node, add2: fx.Node, in_layer: set[fx.Node]) -> fx.Node:
    """The residual stream the MLP block reads and adds to: add1 itself (pre-norm), or, in a post-norm
    layer (BART, BERT, GPT-1: x1 = norm(h + attn(h)); out = norm(x1 + mlp(x1))), the operand of add2
    computed from add1 by a chain of ops without linears or attention (the norm). The chain stays dense
    as written; only the blocks are rewritten."""
    if add1 in add2.args:
        return add1
    for p in add2.args:
        if _norm_of(p, add1, in_layer):
            return p
    raise CantRewrite("residual_structure", "second residual add takes neither the first one's result nor a "
                      "norm of it")


def _same_bnd(x: fx.Node, y: fx.Node) -> bool:
    """Whether x and y are (b, n, d) tensors of the same size."""
    sx, sy = shape_of(x), shape_of(y)
    return sx is not None and sy is not None and len(sx) == len(sy) == 3 and all(map(same_size, sx, sy))


def _classify_parallel_sum(layer: Layer, add1: fx.Node, add2: fx.Node, in_layer: set[fx.Node]) -> None:
    """Parallel residual summed first (GPT-NeoX, Phi: h + (attn(x) + mlp(x)), or (mlp + attn) + h): both
    blocks end in add1, which add2 adds to the layer input. The MLP reads the layer input."""
    h0 = _residual_operand(add2, in_layer, external=True)
    x, y = add1.args
    has_sdpa = [any(is_call(n, *SDPA_TARGETS) for n in closure_back(o, in_layer, stop={h0})) for o in (x, y)]
    if has_sdpa.count(True) != 1:
        raise CantRewrite("residual_structure", f"cannot tell the residual input of {add1.name}")
    a, m = (x, y) if has_sdpa[0] else (y, x)
    layer.attn = _make_block(layer, "attn", h0, a, add1, in_layer, stop={h0})
    layer.mlp = _make_block(layer, "mlp", a, m, add1, in_layer, stop={h0}, reads=h0)
    _check_attention(layer.attn)
    _check_mlp(layer.mlp)


def _residual_operand(add: fx.Node, in_layer: set[fx.Node], external: bool) -> fx.Node:
    outside = [a for a in add.args if a not in in_layer]
    if len(outside) != 1:
        raise CantRewrite("residual_structure", f"cannot tell the residual input of {add.name}")
    shp, other = shape_of(outside[0]), shape_of(add)
    if shp is None or other is None or len(shp) != 3:
        raise CantRewrite("residual_structure", f"residual input {outside[0].name} is not a (b, n, d) tensor")
    return outside[0]


def _make_block(layer: Layer, kind: str, h: fx.Node, out: fx.Node, add: fx.Node, in_layer: set[fx.Node],
                stop: set[fx.Node], reads: fx.Node | None = None) -> Block:
    allowed = in_layer - {add}
    body = _with_view_writes(closure_back(out, allowed, stop=stop), allowed, stop)
    if not body:
        raise CantRewrite("empty_block", f"{kind} block output {out.name} is not computed inside the layer")
    whole = None
    try:
        _check_no_hidden_updates(kind, body)
    except CantRewrite as e:
        if kind != "mlp":
            raise
        whole = f"{e.kind}: {e.detail}"
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    nodes = sorted(body, key=order.__getitem__)
    ext: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in body and a not in ext:
                ext.append(a)
    if (reads if reads is not None else h) not in ext:
        raise CantRewrite("residual_structure", f"{kind} block does not read the residual stream")
    if reads is not None and h in ext:
        raise CantRewrite("residual_structure", f"{kind} block reads both the layer input and the attention's sum")
    linears: dict[str, fx.Node] = {}
    for n in nodes:
        if is_call(n, *LINEAR_TARGETS):
            role = layer.rel(n) or n.name
            role = role.split(".", 1)[1] if role.startswith(("self_attn.", "mlp.")) else role
            role = role.replace(".default", "").replace(".base_layer", "")
            linears[role] = n
    lora = sum(1 for r in linears if r.endswith(".lora_A"))
    return Block(kind=kind, residual_in=h, output=out, residual_add=add, nodes=nodes, externals=ext,
                 linears=linears, lora=lora, reads=reads, whole=whole)


def _with_view_writes(body: set[fx.Node], allowed: set[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """`body` plus the in-place writes into its values through views, and what they write: a block that
    fills a buffer slice by slice (DeepSeek's MLA: key = kv.new_empty(...); key[..., :d].copy_(k_nope);
    key[..., d:].copy_(k_rot)) has those writes outside the output's backward closure, because their
    results are unused. Cloning the block must copy them too."""
    body = set(body)
    unseen = list(body)  # values whose views have not been searched for writes yet
    while unseen:
        chain, views = set(), [unseen.pop()]
        while views:  # the value and its views, inside the layer
            v = views.pop()
            for u in v.users:
                if u in allowed and u not in body and u.args and u.args[0] is v:
                    if _in_place(u):
                        added = (closure_back(u, allowed, stop=stop) | chain | {v}) - body
                        body |= added
                        unseen += added
                    elif is_call(u, *MOVES):
                        chain.add(u)
                        views.append(u)
    return body


def _in_place(node: fx.Node) -> bool:
    """A call that writes into its first argument (x.add_(y), torch.Tensor.mul_, operator.iadd on a tensor)."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if node.op == "call_method" or node.op == "call_function" and getattr(t, "__module__", None) in (None, "torch"):
        return name.endswith("_") and not name.startswith("_") or name.startswith("__i") and name.endswith("__")
    return node.op == "call_function" and t in _INPLACE_OPERATORS


_INPLACE_OPERATORS = {getattr(__import__("operator"), n) for n in ("iadd", "isub", "imul", "itruediv", "ipow")}


def _check_no_hidden_updates(kind: str, body: set[fx.Node]) -> None:
    """A block is its output's backward closure; an in-place update is invisible there when it writes into
    a block value from outside the closure (Llama 4's MoE: shared_out.add_(routed_out), the routed experts
    never reach the residual add's inputs) or writes from inside the block into a value outside it. The
    rewrites would then drop or duplicate the update: refused."""
    for n in body:
        if _in_place(n) and n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in body:
            raise CantRewrite("in_place_update", f"{kind} block updates {n.args[0].name}, computed outside "
                              f"it, in place ({n.name})")
        for u in n.users:
            if u not in body and _in_place(u) and u.args and u.args[0] is n:
                raise CantRewrite("in_place_update", f"{kind} block value {n.name} is updated in place by "
                                  f"{u.name}, which does not feed the block's output")


def _check_attention(blk: Block) -> None:
    sdpas = [n for n in blk.nodes if is_call(n, *SDPA_TARGETS)]
    if len(sdpas) != 1:
        others = sorted({str(getattr(n.target, "__name__", n.target)) for n in blk.nodes
                         if is_call(n, torch.matmul, torch.bmm, F.softmax, torch.softmax, "softmax")})
        eager = next((n.meta[EAGER_REFUSAL] for n in blk.nodes if EAGER_REFUSAL in n.meta), None)
        if eager is not None:
            raise CantRewrite("unknown_attention", f"eager attention ({', '.join(others)}) that SDPA cannot "
                                                   f"express: {eager}")
        raise CantRewrite("unknown_attention",
                          f"attention block has {len(sdpas)} scaled_dot_product_attention calls "
                          f"(ops seen: {others or 'none'}); only SDPA attention, or eager attention that "
                          f"equals it, is supported")
    sdpa = sdpas[0]
    blk.sdpa = sdpa
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    if mask is not None:
        src = mask
        while isinstance(src, fx.Node) and src in blk.nodes:
            if is_call(src, "__getitem__", __import__("operator").getitem) or is_call(src, "to", "bool"):
                src = src.args[0]
            else:
                raise CantRewrite("mask_structure", f"attention mask is computed inside the block ({src.name})")
        if not isinstance(src, fx.Node):
            raise CantRewrite("mask_structure", "attention mask is not a graph tensor")
        mshape = shape_of(src)
        if mshape is None or len(mshape) != 4:
            raise CantRewrite("mask_structure", f"attention mask {src.name} is not 4-D: {mshape}")
        blk.mask = src
    if attention_dropout(sdpa) not in (0.0, 0):
        raise CantRewrite("attention_dropout", "attention dropout > 0 is not supported")
    h = shape_of(blk.residual_in)
    if value_of(sdpa) is None or h is None:
        raise CantRewrite("no_fake_values", "nodes carry no fake values")


def _check_mlp(blk: Block) -> None:
    if not blk.linears and blk.whole is None:
        blk.whole = "mlp_structure: MLP block has no linear layers"
