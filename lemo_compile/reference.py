"""Plain eager PyTorch reference of the sparse-layer semantics (docs/design.md §2), the oracle of every test.

No model source is patched. For the duration of one call, `reference_forward`

- switches the model's attention implementation to `"lemo_reference"`: an attention function
  registered with transformers' `AttentionInterface` (dense layers: exactly HF's SDPA function;
  sparse layers: `sparse_attention`), with `sdpa_mask` registered under the same name in
  `AttentionMaskInterface` so the model builds the same 4-D boolean masks as under `"sdpa"`
  (causal, sliding window, padding; `None` where SDPA would use `is_causal`);
- hooks every sparse decoder layer: `input_layernorm` (its output `x` is scored, under no-grad, and the
  keep set chosen), `self_attn` and `mlp` or `feed_forward` (their outputs on eliminated rows are zeroed or detached).

Dense layers are never touched, and with no sparse layer at all (every layer in `dense_layers`, or `enabled=False`)
the model is called as is, so the result is bit-identical to the plain model.

    out = reference_forward(model, LemoConfig(keep_ratio=0.5, attn_mode="backward"), **batch)
    out.output.loss.backward()
    out.keep_sets[2]  # (token_index (b, m), in_range (b, m)) of layer 2

Not supported: gradient checkpointing (the recompute would run outside the call), attention dropout in
a sparse layer, and 4-D or packed attention masks passed by the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
from fractions import Fraction
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .config import AttnMode, LemoConfig, MlpMode
from .predictors import random_scores
from .selection import keep_set, num_blocks

ATTN_IMPLEMENTATION = "lemo_reference"

# scorer(layer, x (b, n, d) normalized hidden states, token_valid (b, n) bool) -> scores (b, nb)
Scorer = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
KeepSet = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class ReferenceOutput:
    output: Any  # the HF model output (loss, logits)
    keep_sets: dict[int, KeepSet]  # layer -> (token_index (b, m), in_range (b, m)); sparse layers only


def dense_forward(model: nn.Module, **model_kwargs: Any) -> Any:
    """The plain model call, the dense baseline."""
    return model(**model_kwargs)


def scorer_for(model: nn.Module, cfg: LemoConfig) -> Scorer | None:
    """The scorer the compiled graph uses for `cfg.predictor` on this model, for reference runs:
    None for "random" (reference_forward's default), the layer's frozen W_q/W_k on block means for
    "pooled", a predictor file's low-rank factors otherwise. Models with fused qkv projections
    get None for "pooled" (use the random scorer)."""
    from .predictors import pooled_qk_scores

    if cfg.predictor == "random":
        return None
    layers = decoder_layers(model)
    if cfg.predictor != "pooled":
        from .calibrate import load

        meta, factors = load(cfg.predictor)

        def calibrated(layer: int, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            q, k = (t.to(x.device) for t in factors[layer])
            return pooled_qk_scores(x.float(), valid, q, None, k, None, meta["heads"], meta["heads"], cfg.block_size)

        return calibrated
    first = next(attn_of(layer) for layer in layers if attention_layer(layer))
    if not all(hasattr(first, p) for p in ("q_proj", "k_proj")):
        return None
    heads = getattr(first, "num_heads", None) or getattr(getattr(first, "config", None), "num_attention_heads", None)
    q_out = getattr(first.q_proj, "base_layer", first.q_proj).weight.shape[0]
    if heads and getattr(first, "head_dim", None) and q_out != heads * first.head_dim:
        return None  # q_proj also projects a gate (Qwen3-Next): lemo probes the query rows, this does not

    def pooled(layer: int, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        attn = attn_of(layers[layer])
        q = getattr(attn.q_proj, "base_layer", attn.q_proj)  # the frozen projection under PEFT
        k = getattr(attn.k_proj, "base_layer", attn.k_proj)
        hd = attn.head_dim
        return pooled_qk_scores(x, valid, q.weight, q.bias, k.weight, k.bias, q.weight.shape[0] // hd,
                                k.weight.shape[0] // hd, cfg.block_size)

    return pooled


def reference_forward(model: nn.Module, cfg: LemoConfig, scorer: Scorer | None = None,
                      keep_sets: dict[int, KeepSet] | None = None, **model_kwargs: Any) -> ReferenceOutput:
    """Run `model(**model_kwargs)` with the sparse layers of `cfg` (docs/design.md §2).

    scorer: block scores of a sparse layer; default: `random_scores(layer, cfg.seed, ...)` whatever
    `cfg.predictor` says. keep_sets: layer -> (token_index, in_range) to use instead of scoring (for
    sparse layers only). Autograd runs through the returned output after the call as usual."""
    layers = decoder_layers(model)
    num_layers = len(layers)
    cfg.check_layers(num_layers)
    fractions: dict[int, Fraction] = {}
    if cfg.enabled:
        for i in range(num_layers):
            keep = cfg.keep_fraction(i, num_layers)
            if keep is not None and attention_layer(layers[i]):
                fractions[i] = keep
    keep_sets = dict(keep_sets or {})
    extra = sorted(set(keep_sets) - set(fractions))
    if extra:
        raise ValueError(f"keep_sets given for layers {extra}, which are dense under this config "
                         f"(sparse layers: {sorted(fractions)})")
    if not fractions:
        return ReferenceOutput(model(**model_kwargs), {})

    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True and m.training:
            raise ValueError("reference_forward does not support gradient checkpointing: its recompute runs "
                             "after the call, without the reference's hooks; disable it for the reference")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
        raise ValueError("reference_forward supports only a 2-D (batch, tokens) attention_mask")
    token_valid = mask.bool() if mask is not None else None
    segments = _segments(mask, model_kwargs.get("position_ids"))

    if scorer is None:
        def scorer(layer: int, x: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
            return random_scores(layer, cfg.seed, x.shape[0], num_blocks(x.shape[1], cfg.block_size), x.device)

    run = _Run(cfg=cfg, scorer=scorer, token_valid=token_valid, given=keep_sets, fractions=fractions,
               segments=segments, explicit_mask=getattr(model.config, "_attn_implementation", None) != "sdpa",
               sliding={i: getattr(attn_of(layers[i]), "sliding_window", None) or _model_window(model)
                        for i in fractions})
    _register()
    ends, post_norm = _block_ends(model, layers, sorted(fractions), model_kwargs)
    with contextlib.ExitStack() as stack:
        for i, keep in fractions.items():
            layer = layers[i]
            run.attn_layer.update({id(m): i for m in attn_of(layer).modules()})  # BERT: attention.self calls it
            norm = _child(layer, NORM_NAMES) if i not in post_norm else None
            if norm is not None:
                stack.callback(norm.register_forward_hook(run.norm_hook(i)).remove)
            else:  # no input norm (or a post-norm layer): lemo scores the layer's input
                stack.callback(layer.register_forward_pre_hook(_input_hook(run.norm_hook(i)), with_kwargs=True).remove)
            for module, hook in ((ends[i][0], run.attn_hook(i)), (ends[i][1], run.mlp_hook(i))):
                stack.callback(module.register_forward_hook(hook).remove)
        stack.enter_context(_attn_implementation(model, ATTN_IMPLEMENTATION))
        _ACTIVE.append(run)
        stack.callback(_ACTIVE.pop)
        output = model(**model_kwargs)
    silent = sorted(set(fractions) - run.attn_ran)
    if silent:  # its attention is written into the model (eager-only architectures): it ran dense
        raise NotImplementedError(f"the attention of sparse layer(s) {silent} does not go through transformers' "
                                  f"attention interface, so reference_forward cannot make it sparse")
    return ReferenceOutput(output, dict(sorted(run.keep_sets.items())))


def _input_hook(norm_hook: Callable) -> Callable:
    """A forward pre-hook (with kwargs) that hands the layer's hidden states to `norm_hook`."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        norm_hook(module, args, args[0] if args else kwargs["hidden_states"])
    return hook


def _segments(mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Segment ids (docs/design.md §2.1) of a padded batch (from its 2-D attention_mask) or of packed
    documents (position_ids without an attention_mask), as passes.masks derives them; None otherwise.
    Sparse layers of full (not sliding-window) attention choose keep sets per document from them."""
    from .traced import segments_from_padding, segments_from_positions

    if mask is not None:
        return segments_from_padding(mask)
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
        return segments_from_positions(position_ids)
    return None


def _model_window(model: nn.Module) -> int | None:
    """A sliding window set for every layer by the config (Mistral v0.1), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "layer_types", None) is not None:
        return None  # per-layer: the attention modules carry theirs
    return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None


# What a decoder layer calls its blocks, across transformers' families (Llama: self_attn / mlp; GPT-2,
# GPT-J, CodeGen: attn; GPT-NeoX: attention; Llama 4, LFM: feed_forward). The input norm lemo's
# predictor reads has the names of passes.sparsify._norm_output; a layer without one is scored on its input.
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward")
NORM_NAMES = ("input_layernorm", "ln_1", "input_norm", "attention_norm")


def _child(layer: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(layer, a) for a in names if isinstance(getattr(layer, a, None), nn.Module)), None)


def mlp_of(layer: nn.Module) -> nn.Module | None:
    return _child(layer, MLP_NAMES)


def attn_of(layer: nn.Module) -> nn.Module | None:
    return _child(layer, ATTN_NAMES)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM, PEFT-wrapped or not: the first ModuleList (in the model's
    decoder, `get_decoder()`, if it has one, else anywhere) whose entries all have an MLP (MLP_NAMES) and
    some an attention module (ATTN_NAMES), else the first whose entries all have one of the two and some
    an attention module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # a multimodal model's language model first: its vision tower's layers come earlier in module order
    decoder = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else None
    roots = [decoder, base] if isinstance(decoder, nn.Module) else [base]
    lists = [m for root in roots for m in root.modules() if isinstance(m, nn.ModuleList) and len(m)
             and any(attention_layer(layer) for layer in m)]
    for module in lists:
        if all(mlp_of(layer) is not None for layer in module):
            return module
    for module in lists:  # layers whose MLP is no child module of these names (BART: fc1, fc2; BERT)
        if all(mlp_of(layer) is not None or attention_layer(layer) for layer in module):
            return module
    raise ValueError(f"no decoder layers (a ModuleList of modules with an attention ({', '.join(ATTN_NAMES)}) and "
                     f"an MLP ({', '.join(MLP_NAMES)})) found in {type(base).__name__}")


def attention_layer(layer: nn.Module) -> bool:
    """Whether a decoder layer has softmax attention (self_attn). A hybrid model's linear-attention or
    state-space layers (Qwen3-Next's linear_attn, LFM's conv) have none: they stay dense, as lemo leaves
    them."""
    return attn_of(layer) is not None


def kept_rows(token_index: torch.Tensor, in_range: torch.Tensor, n: int) -> torch.Tensor:
    """Keep set -> (b, n) bool row mask of the kept tokens (clamped out-of-range entries excluded)."""
    counts = torch.zeros(token_index.shape[0], n, dtype=torch.int32, device=token_index.device)
    return counts.scatter_add_(1, token_index, in_range.to(torch.int32)) > 0


def sparse_attention(mode: AttnMode | str, module: Any, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, kept: torch.Tensor,
                     scaling: float | None = None, **kwargs: Any) -> torch.Tensor:
    """Attention of one sparse layer, as the HF attention interface sees it.

    query (b, h, n, d); key, value (b, h_kv, n, d), KV heads not repeated; attention_mask: what the
    model passes (4-D bool (b, 1, n, n) where True = may attend, or None for plain causal); kept (b, n)
    bool. Returns (b, n, h, d), like HF attention functions.

    - tokens: query i sees key j iff both are kept and the mask allows (i, j); eliminated query rows
      are exactly 0.
    - keys: every query; keys restricted to kept tokens. A query with no visible key (possible only in a
      sliding-window layer whose window holds no kept token) outputs 0.
    - backward: forward = HF's dense SDPA output, bit for bit; gradient = the dropped-term gradient
      over kept queries x kept keys with the dense softmax statistics (see `_backward_only`).
    """
    mode = AttnMode(mode)
    b, h, n, d = query.shape
    groups = h // key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    cdtype = torch.promote_types(query.dtype, torch.float32)  # at least fp32 arithmetic
    q = query.to(cdtype)
    k = key.to(cdtype).repeat_interleave(groups, dim=1)  # head i uses KV head i // groups, as repeat_kv
    v = value.to(cdtype).repeat_interleave(groups, dim=1)
    allowed = _bool_mask(module, attention_mask, n, k.shape[2], query.device, kwargs.get("is_causal"))
    kq, kk = kept[:, None, :, None], kept[:, None, None, :]
    if mode is AttnMode.TOKENS:
        out = _masked_attention(q, k, v, allowed & kq & kk, scale)
    elif mode is AttnMode.KEYS:
        out = _masked_attention(q, k, v, allowed & kk, scale)
    else:
        return _backward_only(module, query, key, value, attention_mask, q, k, v, allowed, kept, scaling,
                              scale, **kwargs)
    return out.to(query.dtype).transpose(1, 2).contiguous()


# -- internals ---------------------------------------------------------------------------------------

_ACTIVE: list["_Run"] = []  # the reference_forward calls in progress, innermost last
_registered = False


@dataclasses.dataclass
class _Run:
    """State of one reference_forward call, shared by its hooks and the attention function."""
    cfg: LemoConfig
    scorer: Scorer
    token_valid: torch.Tensor | None
    given: dict[int, KeepSet]
    fractions: dict[int, Fraction]
    segments: torch.Tensor | None = None  # (b, n) segment ids of a padded or packed batch
    sliding: dict[int, int | None] = dataclasses.field(default_factory=dict)  # layer -> its sliding window
    attn_layer: dict[int, int] = dataclasses.field(default_factory=dict)  # id(self_attn) -> layer
    kept: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (b, n) bool
    keep_sets: dict[int, KeepSet] = dataclasses.field(default_factory=dict)
    attn_ran: set[int] = dataclasses.field(default_factory=set)  # sparse layers whose attention came through here
    explicit_mask: bool = False  # the model's own attention is not SDPA: build every mask as a tensor

    def norm_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, x: torch.Tensor) -> None:
            b, n = x.shape[:2]
            if layer in self.given:
                token_index, in_range = self.given[layer]
                if token_index.shape != in_range.shape or token_index.shape[0] != b:
                    raise ValueError(f"keep_sets[{layer}] must be two (b, m) tensors with b={b}, got "
                                     f"{tuple(token_index.shape)} and {tuple(in_range.shape)}")
                token_index, in_range = token_index.to(x.device), in_range.to(x.device)
            else:
                tv = self.token_valid
                if tv is None:
                    tv = torch.ones(b, n, dtype=torch.bool, device=x.device)
                with torch.no_grad():
                    scores = self.scorer(layer, x.detach(), tv)
                nb = num_blocks(n, self.cfg.block_size)
                if tuple(scores.shape) != (b, nb):
                    raise ValueError(f"scorer returned shape {tuple(scores.shape)} for layer {layer}, "
                                     f"expected (b, nb) = {(b, nb)}")
                window = self.sliding.get(layer)
                seg = self.segments if window is None or window >= n else None  # as passes.masks reads masks
                token_index, in_range = keep_set(scores, tv.to(x.device), self.cfg.block_size,
                                                 self.fractions[layer], self.cfg.forced_blocks,
                                                 None if seg is None else seg.to(x.device))
            self.keep_sets[layer] = (token_index, in_range)
            self.kept[layer] = kept_rows(token_index, in_range, n)
        return hook

    def attn_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            mode = self.cfg.attn_mode
            if mode is AttnMode.KEYS:
                return None  # every row is a query: the whole output is real
            out, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
            kept = self.kept[layer][..., None]
            if mode is AttnMode.TOKENS:
                # Already 0 (no o_proj bias in supported archs); made exact and gradient-free here.
                out = torch.where(kept, out, 0.0)
            else:
                # Forward exact; o_proj and its adapters get gradient from kept rows only.
                out = torch.where(kept, out, out.detach())
            return out if rest is None else (out, *rest)
        return hook

    def mlp_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            mode = self.cfg.mlp_mode
            if mode is MlpMode.DENSE:
                return None
            # a mixture-of-experts MLP may return (out, router_logits): only out enters the residual stream
            out, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
            kept = self.kept[layer][..., None]
            out = torch.where(kept, out, 0.0) if mode is MlpMode.TOKENS else torch.where(kept, out, out.detach())
            return out if rest is None else (out, *rest)
        return hook


def _block_ends(model: nn.Module, layers: nn.ModuleList, indices: list[int], model_kwargs: dict[str, Any]
                ) -> tuple[dict[int, tuple[nn.Module, nn.Module]], set[int]]:
    """(attention end, MLP end) of each layer in `indices`: the module whose output is the block's
    contribution to the residual stream, read from one forward (no grad) of the model; and the layers
    that are post-norm (BART, BERT: x1 = norm(h + attn(h)); out = norm(x1 + mlp(x1))).

    Which adds are the residual ones is read from the torch calls the layer makes (`_residual_sums`); in
    a post-norm layer, or one without an MLP module of MLP_NAMES, the ends are the modules whose outputs
    those adds take (through dropout or a cast).
    In a pre-norm layer the attention end is the first module called between the attention and the MLP
    whose output is not the MLP's input (a post-attention norm: Gemma's post_attention_layernorm before
    its pre_feedforward_layernorm, OLMo 2's post_attention_layernorm, GLM-4's post_self_attn_layernorm),
    else the attention itself (Llama's post_attention_layernorm is the MLP's input norm); the MLP end is
    the MLP, or the module called after it (post_feedforward_layernorm, post_mlp_layernorm, post_norm2).
    A module the layer calls more than once (Phi's resid_dropout, after both blocks) is never an end."""
    calls: dict[int, list[nn.Module]] = {i: [] for i in indices}
    outputs: dict[int, Any] = {}  # id(module) -> its output in this forward
    mlp_inputs: dict[int, Any] = {}  # layer -> the MLP's first input
    log = _CallLog()
    made_by: dict[int, dict[int, nn.Module]] = {i: {} for i in indices}  # id(tensor) -> outermost module

    def record(i: int, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if mod in children[i]:
            calls[i].append(mod)
            outputs[id(mod)] = out
        if mod is mlp_of(layers[i]):
            mlp_inputs[i] = args[0] if args else next(iter(kwargs.values()), None)
        t = out[0] if isinstance(out, tuple) and out else out
        if isinstance(t, torch.Tensor):
            made_by[i][id(t)] = mod  # inner modules' hooks run first: the outermost one stays
            log.keep.append(t)

    def enter(i: int, args: tuple, kwargs: dict) -> None:
        log.layer, log.inputs[i] = i, args[0] if args else kwargs.get("hidden_states")

    children = {i: set(layers[i].children()) for i in indices}
    handles = [mod.register_forward_hook(lambda mod, args, kwargs, out, i=i: record(i, mod, args, kwargs, out),
                                         with_kwargs=True)
               for i in indices for mod in layers[i].modules() if mod is not layers[i]]
    handles += [layers[i].register_forward_pre_hook(lambda mod, args, kwargs, i=i: enter(i, args, kwargs),
                                                    with_kwargs=True) for i in indices]
    handles += [layers[i].register_forward_hook(lambda *_: setattr(log, "layer", None)) for i in indices]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), log:  # leave dropout's stream as it was
            model(**model_kwargs)
    finally:
        for h in handles:
            h.remove()
    ends, post_norm = {}, set()
    for i, seq in calls.items():
        layer = layers[i]
        attn, mlp = attn_of(layer), mlp_of(layer)
        layer_calls = [c for c in log.calls if c[0] == i]
        parent = _pass_through(layer_calls)
        sums = _residual_sums(layer_calls, log.inputs.get(i), parent)
        if sums is not None and (sums[2] or mlp is None):  # post-norm, or no MLP module (BERT-style layers)
            owner = made_by[i]  # the outermost module whose output t is, or becomes through dropout or a cast
            a, m = (owner.get(id(_back(t, parent, lambda x: id(x) in owner))) for t in sums[:2])
            if a is None or m is None:
                raise ValueError(f"layer {i}: the attention's or the MLP's residual contribution is no module's "
                                 f"output")
            ends[i] = (a, m)
            if sums[2]:
                post_norm.add(i)
            continue
        if mlp is None:
            raise ValueError(f"layer {i} ({type(layer).__name__}): no MLP module ({', '.join(MLP_NAMES)}) and no "
                             f"residual adds found")
        once = [c for c in seq if sum(c is d for d in seq) == 1]
        a, m = once.index(attn), once.index(mlp)
        between = [c for c in once[a + 1:m] if outputs[id(c)] is not mlp_inputs.get(i)]
        after = once[m + 1:]
        ends[i] = (between[0] if between else attn, after[0] if after else mlp)
    return ends, post_norm


class _CallLog(torch.overrides.TorchFunctionMode):
    """The torch calls made inside the decoder layer being run (`layer`): (layer, func, tensor arguments,
    output) in call order; `keep` holds every tensor whose id is a key somewhere, so no id is reused."""

    def __init__(self) -> None:
        super().__init__()
        self.layer: int | None = None
        self.inputs: dict[int, Any] = {}
        self.calls: list[tuple[int, Any, tuple, torch.Tensor]] = []
        self.keep: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.layer is not None and isinstance(out, torch.Tensor):
            tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
            if tensors:
                self.calls.append((self.layer, func, tensors, out))
                self.keep.append(out)
        return out


_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
_PASS_THROUGH = ("dropout", "to", "contiguous", "clone", "type_as", "float")  # same values or a cast
_NOT_STREAM = ("linear", "scaled_dot_product_attention")  # a block's work, not the residual stream's


def _residual_sums(calls: list, h: Any, parent: dict[int, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """(attention's residual contribution, MLP's residual contribution, post-norm) of a layer, from its
    torch calls (`_CallLog.calls` of that layer; h its input; parent `_pass_through(calls)`): the first add
    of two same-shape tensors one of which is h (or a cast of it) is the attention's residual sum s; the
    stream grows from s through calls whose first argument is in it and which are no linear or attention;
    the next such add of a stream tensor and one that is not is the MLP's. Post-norm: that stream tensor
    is not s itself. None: not found."""
    def from_h(t: torch.Tensor) -> bool:
        return _back(t, parent, lambda x: x is h) is h

    def add_of(f: Any, ts: tuple, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        ok = f in _ADDS and len(ts) == 2 and ts[0].shape == ts[1].shape == out.shape and out.ndim == 3
        return ts if ok else None

    for k, (_, f, ts, s) in enumerate(calls):
        ts = add_of(f, ts, s)
        if ts is None or not any(from_h(t) for t in ts):
            continue
        a = ts[1] if from_h(ts[0]) else ts[0]
        stream = {id(s)}
        for _, f2, ts2, out in calls[k + 1:]:
            pair = add_of(f2, ts2, out)
            if pair is not None and sum(id(t) in stream for t in pair) == 1:
                x = pair[0] if id(pair[0]) in stream else pair[1]
                return a, (pair[1] if x is pair[0] else pair[0]), x is not s
            if id(ts2[0]) in stream and out.shape == s.shape and _name(f2) not in _NOT_STREAM:
                stream.add(id(out))
        return None
    return None


def _pass_through(calls: list) -> dict[int, torch.Tensor]:
    """id(output) -> input of the dropout and cast calls (a call returning its input, x.to(x.dtype), is none)."""
    return {id(out): ts[0] for _, f, ts, out in calls if len(ts) == 1 and _name(f) in _PASS_THROUGH
            and out is not ts[0]}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _back(t: torch.Tensor, parent: dict[int, torch.Tensor], found: Callable[[torch.Tensor], bool]) -> torch.Tensor:
    """Follow t back through dropout and casts (`parent`) until `found` holds or no call made it."""
    while not found(t) and id(t) in parent:
        t = parent[id(t)]
    return t


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _reference_attention)
    # Without a mask function under the same name, the model would build no mask at all.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
    _registered = True


def _mask(*args: Any, **kwargs: Any):
    """SDPA's mask; always a tensor for a model that does not run SDPA itself: a None mask leaves causality
    to the module's is_causal flag, which some eager-only models never set (BigBird-Pegasus's decoder
    attention: False) while their own eager mask is causal. SDPA models keep HF's None (bit-exact runs)."""
    from transformers.masking_utils import sdpa_mask

    if _ACTIVE and _ACTIVE[-1].explicit_mask:
        kwargs = {**kwargs, "allow_is_causal_skip": False}
    return sdpa_mask(*args, **kwargs)


def _sdpa(*args: Any, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def _reference_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any):
    """The function registered as "lemo_reference": SDPA in dense layers, `sparse_attention` in sparse ones."""
    run = _ACTIVE[-1] if _ACTIVE else None
    layer = run.attn_layer.get(id(module)) if run is not None else None
    if layer is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise NotImplementedError(f"attention dropout ({dropout}) in sparse layer {layer} is not supported")
    if layer not in run.kept:
        raise RuntimeError(f"layer {layer}'s attention ran before its input_layernorm chose a keep set")
    run.attn_ran.add(layer)
    return sparse_attention(run.cfg.attn_mode, module, query, key, value, attention_mask, run.kept[layer],
                            scaling=scaling, **kwargs), None


def _bool_mask(module: Any, attention_mask: torch.Tensor | None, q_len: int, kv_len: int,
               device: torch.device, is_causal: bool | None) -> torch.Tensor:
    """(b or 1, 1, q, kv) bool, True where query i may attend key j."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive float mask
    # No mask: what HF's SDPA function does then -- is_causal (upper-left aligned) for q_len > 1,
    # no masking for a single query or a non-causal module.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    full = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    return (full.tril() if causal and q_len > 1 else full)[None, None]


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softmax(scale q k^T | allowed) v with all-masked rows giving 0 (and zero gradient), not NaN."""
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    return (p @ v) / torch.where(denom > 0, denom, 1.0)


def _backward_only(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   allowed: torch.Tensor, kept: torch.Tensor, scaling: float | None, scale: float,
                   **kwargs: Any) -> torch.Tensor:
    """attn_mode="backward". O is HF's dense SDPA output (no grad), lse the dense log-sum-exp, and
    P_ij = exp(S_ij - lse_i) for kept i, j (0 elsewhere). With f = P v - rowsum(P) O, the output
    O + (f - f.detach()) equals O exactly, and its gradient is the dropped-term one:
        dv_j = sum_i P_ij dO_i,  dS_ij = P_ij (dO_i . v_j - dO_i . O_i),
        dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i   (i, j kept)."""
    with torch.no_grad():
        dense, _ = _sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
    o = dense.transpose(1, 2).to(q.dtype)  # (b, h, n, d)
    kq = kept[:, None, :, None]
    s = q @ k.transpose(-1, -2) * scale
    with torch.no_grad():
        lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1, keepdim=True)
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
    # Mask before exp: exp(-inf) = 0 keeps masked entries (and their gradients) at exactly 0.
    p = torch.exp(s.masked_fill(~(allowed & kq & kept[:, None, None, :]), float("-inf")) - lse)
    f = p @ v - p.sum(-1, keepdim=True) * o
    delta = (f - f.detach()).to(query.dtype)  # exactly 0 in value
    out = torch.where(kq, dense.transpose(1, 2) + delta, dense.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


@contextlib.contextmanager
def _attn_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Set `name` as the attention implementation of every config in `model`, restore on exit."""
    from transformers import PretrainedConfig

    configs: list[Any] = []

    def add(c: Any) -> None:
        if isinstance(c, PretrainedConfig) and not any(c is x for x in configs):
            configs.append(c)
            for key in getattr(c, "sub_configs", {}) or {}:
                add(getattr(c, key, None))

    for m in model.modules():
        add(getattr(m, "config", None))
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        # Parents come before their sub-configs, so each sub-config's own value is restored last.
        for c, value in zip(configs, saved):
            c._attn_implementation = value
