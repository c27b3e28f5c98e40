"""The `lemo` torch.compile backend.

    Dynamo FX graph ─► passes.detect ─► passes.sparsify ─► inner compiler ("inductor" or "eager")

Registered through the `torch_dynamo_backends` entry point (`lemo = lemo_compile.backend:lemo_backend`),
so `torch.compile(model, backend="lemo")` works without importing lemo_compile first. Nothing here
registers the name at import time (a second registration raises "duplicate name").

AOT-level passes run from one composite `CustomGraphPass` per Inductor slot whose `uuid()` hashes
lemo's source files and the options, so Inductor's and AOT autograd's caches can never reuse a graph
compiled with other lemo code or options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import itertools
import logging
import os
import re
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _compat, config as _config
from . import ops as _ops  # noqa: F401  (registers the lemo:: ops)
from .config import Inner, LemoConfig

log = logging.getLogger(__name__)
_compat.register_torch_log()

_ids = itertools.count()


@dataclasses.dataclass
class CompileRecord:
    """What lemo did to one Dynamo graph."""

    graph_id: int
    config: LemoConfig
    detect: Any = None  # passes.detect.DetectResult
    sparsify: Any = None  # passes.sparsify.SparsifyResult
    peak_cut: Any = None  # passes.peak_cut.PeakCutResult
    fuse: Any = None  # passes.fuse.FuseResult
    causal: Any = None  # passes.causal.CausalResult
    eager_attention: Any = None  # passes.common.PassResult of passes.eager_attention
    masks: Any = None  # passes.masks.MasksResult
    mlp_segment: Any = None  # passes.mlp_segment.MlpSegmentResult
    regions: Any = None  # passes.regions.RegionsResult (regional compilation)
    left_alone: str | None = None  # why nothing was rewritten
    recompile_reason: str | None = None  # why Dynamo compiled this frame again (its first failed guard)
    metadata_skipped: str | None = None  # why the inserted nodes got no fake values (AOT's cache then bypassed)
    before: str = ""  # readable graph before the rewrite
    after: str = ""  # ... and after
    aot_graphs: list[str] = dataclasses.field(default_factory=list)  # "forward"/"backward" passes ran on
    saved: list = dataclasses.field(default_factory=list)  # memory.SavedValue: what the backward keeps
    saved_for_recompute: int = 0  # values tagged MUST_SAVE for sparse checkpointing
    offloaded: list = dataclasses.field(default_factory=list)  # memory.SavedValue moved to host (offload)
    host_formula: Any = None  # their bytes as a formula in the graph's size symbols (int when static)
    # bytes this rank hands to all-to-all exchanges per step (sequence parallelism), per AOT graph
    exchanged: dict = dataclasses.field(default_factory=dict)
    _fw_values: dict = dataclasses.field(default_factory=dict, repr=False)
    # (forward graph, backward graph or None, fusion_aware) for the memory estimate, made on first use
    _graphs: tuple | None = dataclasses.field(default=None, repr=False)
    _memory: Any = dataclasses.field(default=None, repr=False)

    @property
    def memory(self) -> Any:
        """passes.memory.MemoryEstimate of this graph's forward (+ backward once compiled), computed on
        first access (it is a report: compiling does not pay for it); None if unavailable (e.g. the graph
        came from a compile cache, which skips lemo's AOT pass). Under regional compilation it walks the
        shared layer bodies the root graphs call as if inline."""
        if self._memory is None and self._graphs is not None:
            from .passes import memory as peak_memory
            fw, bw, fusion_aware = self._graphs
            try:
                self._memory = peak_memory.estimate(fw, bw, fusion_aware=fusion_aware)
            except Exception as e:  # a bug in a report must not break training
                log.warning("lemo: memory estimate of graph %d failed: %s: %s", self.graph_id, type(e).__name__, e)
                self._graphs = None
        return self._memory

    @property
    def attention_path(self) -> str:
        """How this graph's attention ran: masks carried as segments (lemo::segment_attention), made
        is_causal, or kept as tensors (SDPA's masked kernel)."""
        parts = []
        ea = self.eager_attention
        if ea and (ea.counters["attention_rewritten"] or ea.skips):
            parts.append(f"eager attention: {ea.counters['attention_rewritten']} chains made SDPA"
                         + (f", {len(ea.skips)} left as written ({ea.skips[0].detail})" if ea.skips else ""))
        if self.masks and self.masks.structured:
            kinds = "/".join(sorted(set(self.masks.structured.values())))
            parts.append(f"segments ({kinds}): {self.masks.counters['segment_attention']} segment_attention calls")
        if self.causal and self.causal.counters["sdpa_made_causal"]:
            parts.append(f"is_causal: {self.causal.counters['sdpa_made_causal']} calls")
        if self.masks and self.masks.counters["causal_attention"]:
            parts.append(f"{self.masks.counters['causal_attention']} causal calls in checkpointed layers run "
                         "lemo::attention_lse")
        if self.masks and self.masks.skips:
            parts.append(f"mask tensor: {len(self.masks.skips)} masks ({self.masks.skips[0].detail})")
        return "; ".join(parts) or "no mask (is_causal or no attention)"

    @property
    def loss_path(self) -> str:
        """How this graph's loss ran: lemo's segmented loss, the model's own (with why), or none in this graph
        (e.g. TRL's fused LM head computes its chunked loss outside the graph that holds the layers)."""
        pc = self.peak_cut
        if pc and pc.losses:
            return f"segmented ({len(pc.losses)} losses, logits {pc.losses[0]['logits']})"
        if pc and pc.skips:
            return f"model's own: {pc.skips[0].detail}"
        return "no cross-entropy in this graph (the caller computes the loss)"

    @property
    def host_bytes(self) -> int:
        """Bytes of activations this graph's forward moves to host memory (LemoConfig.offload), at the
        traced length."""
        return sum(v.nbytes for v in self.offloaded)

    @property
    def sparsified(self) -> bool:
        return bool(self.sparsify and self.sparsify.layers)

    def __repr__(self) -> str:
        """A one-line summary (the graph texts, .before/.after, run to megabytes; lemo_compile.explain()
        and inspect.format_record give the whole report)."""
        if self.left_alone:
            what = f"left alone: {self.left_alone}"
        elif self.sparsified:
            layers = self.sparsify.layers
            modes = sorted({f"{d['attn_mode']}/{d['mlp_mode']}" for d in layers})
            what = (f"{len(layers)} sparse layers ({', '.join(str(d['layer']) for d in layers)}; "
                    f"keep {layers[0]['keep']:g}, {', '.join(modes)})")
        else:
            what = "no sparse layer"
        shared = f", {self.regions.layers_shared} layers shared" if self.regions and self.regions.regions else ""
        return (f"CompileRecord(graph {self.graph_id}: {what}{shared}; attention: {self.attention_path}; "
                f"loss: {self.loss_path}; {len(self.skips)} skips; .before/.after hold the graph texts)")

    @property
    def skips(self) -> list:
        """Every pass's SkipReasons (what was left alone, and why)."""
        return [s for res in vars(self).values() for s in getattr(res, "skips", None) or ()]

    @property
    def rewritten(self) -> bool:
        return (self.sparsified or bool(self.peak_cut and self.peak_cut.losses)
                or bool(self.mlp_segment and self.mlp_segment.mlps)
                or bool(self.causal and self.causal.counters["sdpa_made_causal"])
                or bool(self.eager_attention and self.eager_attention.counters["attention_rewritten"])
                or bool(self.masks and self.masks.structured))


RECORDS: list[CompileRecord] = []  # the most recent compiles, oldest first
_MAX_RECORDS = 256


def records() -> list[CompileRecord]:
    return list(RECORDS)


def clear_records() -> None:
    RECORDS.clear()


def _fill_example_values(gm: fx.GraphModule, rec: CompileRecord) -> None:
    """Give the nodes lemo's rewrites inserted the fake values Dynamo's own nodes carry
    (meta["example_value"]), by fake propagation from the placeholders' values: AOT autograd's cache
    refuses a graph in which a method is called on a value without one (and then compiles it afresh
    in every process)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    if all("example_value" in n.meta for n in gm.graph.nodes if n.op == "call_function"):
        return
    args = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    mode = next((a.fake_mode for a in args if isinstance(a, torch.Tensor) and hasattr(a, "fake_mode")), None)
    if mode is None or any(a is None for a in args):
        return
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*args)
    except Exception as e:  # a report-level loss only: the graph then bypasses AOT autograd's cache
        rec.metadata_skipped = f"{type(e).__name__}: {e}"[:300]
        log.info("lemo: fake propagation for cache metadata failed: %s", rec.metadata_skipped)
        return
    for n in gm.graph.nodes:
        if "example_value" not in n.meta and "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]


@functools.cache
def _source_hash() -> str:
    return _compat.hash_for_files(_source_files(), extra="").hex()


def _own_functions(gm: fx.GraphModule) -> dict[str, str]:
    """The plain Python functions of lemo_compile that the rewritten graph calls (qualified name ->
    a hash of lemo's sources): AOT autograd's cache may key the graph by their names, since a change
    to their code changes the hash."""
    from .passes.common import graph_modules

    names = {}
    for mod in graph_modules(gm):
        for node in mod.graph.nodes:
            fn = node.target
            if (node.op == "call_function" and callable(fn) and not isinstance(fn, torch._ops.OpOverload)
                    and getattr(fn, "__module__", "").startswith("lemo_compile")):
                names[f"{fn.__module__}.{fn.__name__}"] = _source_hash()
    return names


def _source_files() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))
    files = glob.glob(os.path.join(here, "*.py"))
    for sub in ("passes", "kernels"):
        files += glob.glob(os.path.join(here, sub, "*.py"))
        files += glob.glob(os.path.join(os.path.dirname(here), sub, "*.py"))
    return tuple(sorted(set(files)))


class HostMemoryBudgetError(ValueError):
    """A graph's offloaded activations do not fit LemoConfig.host_memory_budget."""


def _host_budget_error(rec: CompileRecord, need: int, budget: int, where: str) -> HostMemoryBudgetError:
    device = ""
    if torch.cuda.is_available():
        device = f"; the device holds {torch.cuda.get_device_properties(0).total_memory / 2**30:.2f} GiB"
    return HostMemoryBudgetError(
        f"lemo: graph {rec.graph_id} offloads {need / 2**30:.3f} GiB of activations ({len(rec.offloaded)} "
        f"tensors) to host memory {where}, over LemoConfig.host_memory_budget={budget / 2**30:.3f} GiB{device}. "
        f"Raise host_memory_budget, shorten the sequence, or set offload=False to keep the activations on "
        f"the device.")


def _host_checked(compiled: Callable, example_inputs: list, rec: CompileRecord, budget: int) -> Callable:
    """`compiled` refusing, before it runs, a call whose offloaded bytes at the actual sizes exceed
    `budget` (a dynamic-length graph serves lengths longer than the one it was traced and checked at).
    The formula comes from lemo's AOT pass, which a graph loaded from the compile caches skips: graphs
    with a host budget are compiled with those caches off (_inner)."""
    import sympy

    where: dict[str, tuple[int, int | None]] = {}  # size symbol -> (input index, dim or None for an int)
    for i, t in enumerate(example_inputs):
        sizes = [(None, t)] if isinstance(t, torch.SymInt) else (
            enumerate(t.shape) if isinstance(t, torch.Tensor) else ())
        for d, s in sizes:
            expr = getattr(getattr(s, "node", None), "expr", None)
            if isinstance(expr, sympy.Symbol):
                where.setdefault(expr.name, (i, d))

    def check(args) -> None:
        f = rec.host_formula
        if not isinstance(f, sympy.Expr) or not f.free_symbols:
            return  # static: checked at compile time
        subs = {}
        for sym in f.free_symbols:
            if sym.name not in where:
                return  # a size no input names (unbacked): the compile-time check stands
            i, d = where[sym.name]
            subs[sym] = int(args[i]) if d is None else args[i].shape[d]
        need = int(f.subs(subs))
        if need > budget:
            raise _host_budget_error(rec, need, budget, f"at sizes {({k.name: v for k, v in subs.items()})}")

    def run(*args):  # Dynamo calls a backend's result with the graph's inputs, unboxed
        check(args)
        return compiled(*args)
    return run


class AotPasses(_compat.custom_graph_pass_base()):
    """The composite AOT-level pass (one object per Inductor slot: torch 2.11 takes no lists).

    It runs on each forward/backward graph after Inductor's own post-grad passes and rewrites nothing
    (every rewrite happens on the Dynamo graph); it records which graphs it saw, what the backward
    keeps, and the static peak-memory estimate (passes.memory), so tests can prove it runs whenever
    the options change."""

    def __init__(self, cfg: LemoConfig, record: CompileRecord | None = None, fusion_aware: bool = True):
        self.cfg = cfg
        self.record = record
        self.fusion_aware = fusion_aware  # Inductor fuses pointwise chains; the eager inner does not
        self._fw_graph: fx.Graph | None = None

    def __call__(self, graph: fx.Graph) -> None:
        from . import memory
        is_bw = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        if self.record is not None and not _shared_body(self.record, graph):
            self.record.aot_graphs.append("backward" if is_bw else "forward")
            self.record.exchanged["backward" if is_bw else "forward"] = memory.exchanged_bytes(graph)
            if is_bw:
                self.record.saved = memory.saved_values(self.record._fw_values, graph)
            else:
                self.record._fw_values = memory.forward_values(graph.owning_module)
                self._fw_graph = graph
                if self.cfg.offload:
                    from .passes.memory import offloaded_bytes
                    self.record.offloaded = memory.offloaded_values(graph)
                    self.record.host_formula = offloaded_bytes(graph)
                    self._check_host_budget()
            self._estimate(graph if is_bw else None)
        log.debug("lemo AOT pass on %s graph (%d nodes)", "backward" if is_bw else "forward", len(graph.nodes))

    def _check_host_budget(self) -> None:
        """Refuse a graph whose offloaded activations exceed LemoConfig.host_memory_budget (at compile
        time: before its step runs)."""
        budget, rec = self.cfg.host_memory_budget, self.record
        if budget is not None and rec.host_bytes > budget:
            raise _host_budget_error(rec, rec.host_bytes, budget, "at the traced length")

    def _estimate(self, bw: fx.Graph | None) -> None:
        """Keep the graphs for the record's lazily computed memory estimate (forward-only until the
        backward is compiled); the estimate walks the shared layer bodies (passes.regions) the root
        graphs call as if inline."""
        if self._fw_graph is not None:
            self.record._graphs = (self._fw_graph, bw, self.fusion_aware)
            self.record._memory = None

    def uuid(self) -> bytes:
        return _compat.hash_for_files(_source_files(), extra=self.cfg.to_json())


class JointPasses(_compat.custom_graph_pass_base()):
    """Joint forward+backward graph pass, before the partitioner (Inductor's joint_custom_pre_pass).

    Sparse checkpointing: values passed through `lemo::saved` inside an activation-checkpoint region
    (the keep set and the kept rows of a sparse layer) are tagged MUST_SAVE, so the partitioner saves
    them and recomputes the layer from them rather than from its full input."""

    def __init__(self, cfg: LemoConfig, record: CompileRecord | None = None):
        self.cfg = cfg
        self.record = record

    def __call__(self, graph: fx.Graph) -> None:
        from .memory import storage_bytes
        must_save = _compat.must_save_policy()
        tagged = offload = 0
        if _shared_body(self.record, graph):
            _drop_recompute_tags(graph)
        for node in graph.nodes:
            if node.target is torch.ops.lemo.saved.default and node.meta.get("recompute") is not None:
                node.meta["recompute"] = must_save
                tagged += 1
            # activation offload: the partitioner moves the tagged values it saves (forward outputs)
            if (self.cfg.offload and node.op == "call_function"
                    and storage_bytes(node.meta.get("val")) >= self.cfg.offload_min_bytes):
                node.meta["should_offload"] = True
                offload += 1
        if self.record is not None:
            self.record.saved_for_recompute += tagged  # one joint graph per shared layer body, then the root
        log.debug("lemo joint pass: %d values kept for recompute, %d tagged for offload", tagged, offload)

    def uuid(self) -> bytes:
        return _compat.hash_for_files(_source_files(), extra="joint" + self.cfg.to_json())


def _shared_body(record: CompileRecord | None, graph: fx.Graph) -> bool:
    """Whether `graph` (joint, forward or backward) belongs to a shared layer body (passes.regions): in a
    compile with shared bodies, the graphs without an invoke_subgraph call are those bodies'; the root's
    graphs call them."""
    regions = record.regions if record is not None else None
    return bool(regions is not None and regions.regions and not graph.find_nodes(
        op="call_function", target=torch.ops.higher_order.invoke_subgraph))


def _drop_recompute_tags(graph: fx.Graph) -> None:
    """Drop the activation-checkpoint tags (PREFER_RECOMPUTE) torch 2.11 copies from the checkpoint that
    calls a shared body onto the body's own joint graph. With them, the body's partition saved only its
    inputs and its backward ran the body's forward again, after the outer backward had already recomputed
    that forward for it (two forward recomputes per layer; torch 2.13 leaves these graphs untagged). The
    outer checkpoint still recomputes the body; what lemo tagged MUST_SAVE stays."""
    for node in graph.nodes:
        if getattr(node.meta.get("recompute"), "name", None) == "PREFER_RECOMPUTE":
            node.meta.pop("recompute", None)
            node.meta.pop("ac_graph_id", None)


def lemo_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                 mode: str | None = None, **kwargs: Any):
    """torch.compile backend entry point. `options` are LemoConfig fields (or {"config": LemoConfig})."""
    cfg = _config.resolve(options)
    return compile_graph(gm, example_inputs, cfg)


def _log_masks_left(rec: CompileRecord) -> None:
    """One line when attention keeps an explicit mask: a warning when that mask is large (n^2 memory and
    SDPA's masked kernel), info otherwise (e.g. a padded batch's mask, which has to stay)."""
    from .passes.causal import LARGE_MASK_BYTES

    res = rec.masks  # masks passes.causal did not make causal and passes.masks could not read
    if not res.skips:
        return
    why = res.skips[0].detail
    if rec.causal is not None and rec.causal.skips:
        why = f"{rec.causal.skips[0].detail}; as segments: {why}"
    level = logging.WARNING if res.largest_mask_left >= LARGE_MASK_BYTES else logging.INFO
    log.log(level, "lemo: graph %d: %d attention mask(s) keep an explicit mask tensor (largest %.2f GiB), so SDPA "
            "runs its masked kernel: %s", rec.graph_id, len(res.skips), res.largest_mask_left / 2**30, why)


_warned_dense: set[tuple[str, str]] = set()  # (model, reason) pairs already warned about


def _asks_for_sparsity(cfg: LemoConfig) -> bool:
    return cfg.keep_ratio < 1 or any(ratio < 1 for _, ratio in cfg.layer_keep_ratios)


def _layer_index(where: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)$", where)
    return int(m.group(1)) if m else None


def _sdpa_calls(gm: fx.GraphModule) -> int:
    """scaled_dot_product_attention calls in `gm` and its higher-order-op bodies."""
    from .passes.common import graph_modules, is_call
    from .passes.common import SDPA_TARGETS

    return sum(is_call(n, *SDPA_TARGETS) for m in graph_modules(gm) for n in m.graph.nodes)


def _dense_reason(rec: CompileRecord, gm: fx.GraphModule) -> str | None:
    """Why a graph that the config asks to make sparse got no sparse layer, unless it is the config's
    own dense schedule: the first skip of a decoder layer the schedule makes sparse (or whose index is
    unknown), or attention outside any decoder layer detect recognises. None when nothing is amiss."""
    cfg = rec.config
    if rec.sparsified or not _asks_for_sparsity(cfg):
        return None
    skips = [s for s in rec.detect.skips + (rec.sparsify.skips if rec.sparsify else [])
             if s.kind != "no_decoder_layers"]
    indices = {layer.index for layer in rec.detect.layers} | {_layer_index(s.where) for s in skips}
    indices.discard(None)
    n = cfg.num_layers or (max(indices) + 1 if indices else None)
    for s in skips:
        i = _layer_index(s.where)
        if i is None or n is None or cfg.keep_fraction(i, n) is not None:
            return str(s)
    if not rec.detect.layers and not skips:
        calls = _sdpa_calls(gm)
        if calls:
            return f"{calls} scaled_dot_product_attention calls, but {rec.detect.skips[0].detail}"
    return None


def _warn_if_dense(rec: CompileRecord, gm: fx.GraphModule) -> None:
    """"Never silently dense": one UserWarning per model and reason when a graph that should have
    sparse layers trains dense (the log line alone is easy to miss)."""
    why = _dense_reason(rec, gm)
    if why is not None:
        _warn_once(gm, why, lambda model: f"lemo: {model} (graph {rec.graph_id}) trains dense: no sparse layer "
                   f"although keep_ratio={rec.config.keep_ratio}: {why}. lemo_compile.explain() shows every skip.")


def _warn_if_mlp_whole(rec: CompileRecord, gm: fx.GraphModule) -> None:
    """Sparse layers whose MLP runs whole (mixture of experts, in-place updates) save only in attention:
    one UserWarning per model and reason, so a user does not expect the MLP's share too."""
    whole = [d for d in (rec.sparsify.layers if rec.sparsify else []) if d.get("mlp_whole")]
    if whole:
        why = whole[0]["mlp_whole"]
        _warn_once(gm, why, lambda model: f"lemo: {model} (graph {rec.graph_id}): the MLP of {len(whole)} sparse "
                   f"layer(s) runs on every row, as written ({why}); only attention saves memory and time there, "
                   "the MLP's gradient still follows the kept rows. lemo_compile.explain() shows every layer.")


def _warn_once(gm: fx.GraphModule, why: str, message: Callable[[str], str]) -> None:
    """A UserWarning message(model) unless this model (the graph's outermost module class) was warned
    about `why` already in this process."""
    from .passes.common import module_stack

    model = next((st[0][1] for n in gm.graph.nodes if (st := module_stack(n))), "graph")
    if (model, why) in _warned_dense:
        return
    _warned_dense.add((model, why))
    warnings.warn(message(model), UserWarning, stacklevel=3)


def compile_graph(gm: fx.GraphModule, example_inputs: list, cfg: LemoConfig):
    from .passes.detect import detect
    from .passes.peak_cut import peak_cut
    from .passes.sparsify import sparsify

    rec = CompileRecord(graph_id=next(_ids), config=cfg, recompile_reason=_compat.recompile_reason())
    RECORDS.append(rec)
    del RECORDS[:-_MAX_RECORDS]
    if cfg.enabled:
        rec.before = gm.print_readable(print_output=False)
        if cfg.eager_attention:
            from .passes.eager_attention import sdpa_from_eager
            rec.eager_attention = sdpa_from_eager(gm, example_inputs)
        if cfg.causal_mask:
            from .passes.causal import make_causal
            from .passes.masks import structure_masks
            rec.causal = make_causal(gm)
            rec.masks = structure_masks(gm)
            _log_masks_left(rec)
        rec.detect = detect(gm)
        if rec.detect.layers:
            rec.sparsify = sparsify(gm, rec.detect, cfg)
        if rec.masks and rec.masks.structured:
            from .passes.masks import lower_segment_attention
            rec.masks.counters["segment_attention"] = lower_segment_attention(gm)
        if rec.masks:
            from .passes.masks import lower_causal_attention
            rec.masks.counters["causal_attention"] = lower_causal_attention(gm)
        if cfg.peak_cut:
            rec.peak_cut = peak_cut(gm, cfg)
        if cfg.segment_mlp:  # before fuse: the down projection becomes part of the segmented op
            from .passes.mlp_segment import segment_mlps
            rec.mlp_segment = segment_mlps(gm, cfg)
        if rec.sparsified and cfg.use_fused_kernels:
            from .passes.fuse import fuse
            rec.fuse = fuse(gm)
        if rec.rewritten:
            rec.after = gm.print_readable(print_output=False)
            n_sparse = len(rec.sparsify.layers) if rec.sparsify else 0
            log.info("lemo: graph %d: %d sparse layers rewritten (attn=%s, mlp=%s), %d dense, %d skipped; "
                     "%d losses segmented, %d MLPs segmented", rec.graph_id, n_sparse, cfg.attn_mode.value,
                     cfg.mlp_mode.value, rec.sparsify.counters["dense_layers"] if rec.sparsify else 0,
                     len(rec.sparsify.skips) if rec.sparsify else 0, len(rec.peak_cut.losses) if rec.peak_cut else 0,
                     len(rec.mlp_segment.mlps) if rec.mlp_segment else 0)
        else:
            skips = (rec.detect.skips + (rec.sparsify.skips if rec.sparsify else [])
                     + (rec.peak_cut.skips if rec.peak_cut else [])
                     + (rec.mlp_segment.skips if rec.mlp_segment else []))
            if rec.sparsify is not None and not rec.sparsify.skips:
                rec.left_alone = "every detected decoder layer is dense under the configuration"
            else:
                rec.left_alone = "; ".join(str(s) for s in skips[:3]) or "nothing to rewrite"
            log.info("lemo: left graph %d alone (%s); compiling it as %s would", rec.graph_id,
                     rec.left_alone, cfg.inner.value)
        _warn_if_dense(rec, gm)
        _warn_if_mlp_whole(rec, gm)
        _compat.trace_structured("lemo_compile_record", lambda: _record_text(rec))
    else:
        rec.left_alone = "rewrites disabled (LemoConfig.enabled=False)"
        log.info("lemo: rewrites disabled; compiling graph %d as %s would", rec.graph_id, cfg.inner.value)
    return _inner(gm, example_inputs, cfg, rec)


def _record_text(rec: CompileRecord) -> str:
    from .inspect import format_record
    return format_record(rec)


def _inner(gm: fx.GraphModule, example_inputs: list, cfg: LemoConfig, rec: CompileRecord):
    passes = AotPasses(cfg, rec, fusion_aware=cfg.inner is Inner.INDUCTOR)
    joint = JointPasses(cfg, rec)
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if cfg.inner is Inner.INDUCTOR and rec.rewritten:
        _fill_example_values(gm, rec)  # before share_layers: fake propagation through a shared body rewrites its metadata
        if cfg.regional and not cfg.offload:
            from .passes.regions import share_layers
            rec.regions = share_layers(gm)
            if not rec.regions.regions and rec.detect.layers:  # graphs without decoder layers: nothing to share
                log.warning("lemo: LemoConfig.regional=True shared no layer of graph %d: %s; it compiles "
                            "whole-model", rec.graph_id, rec.regions.unshared_reason)
    if cfg.regional and (cfg.inner is not Inner.INDUCTOR or cfg.offload):
        log.warning("lemo: LemoConfig.regional=True has no effect with inner=%r, offload=%r (it needs the "
                    "Inductor inner compiler and no offload); graph %d compiles whole-model",
                    cfg.inner.value, cfg.offload, rec.graph_id)
    # a host budget is checked from what lemo's AOT pass records, which a graph loaded from the compile
    # caches skips: with one, compile afresh rather than leave the budget unchecked
    host_checked = cfg.offload and cfg.host_memory_budget is not None
    with _explained_upstream_failure(gm), _compat.activation_offload(cfg.offload, cuda), \
            _compat.no_autograd_cache(host_checked):
        if cfg.inner is Inner.EAGER:
            compiled = _compat.aot_eager(lambda g: passes(g.graph), lambda g: passes(g.graph), joint)(
                gm, example_inputs)
        else:
            with _compat.activation_memory_budget(cfg.activation_memory_budget):
                compiled = _compat.compile_fx(gm, example_inputs, config_patches={
                    "post_grad_custom_post_pass": passes, "joint_custom_pre_pass": joint,
                    **_compat.cacheable_functions(_own_functions(gm)),
                    **({"fx_graph_cache": False} if host_checked else {}),
                    **(_compat.NO_BUFFER_REUSE if rec.regions is not None and rec.regions.regions else {})})
    if host_checked:
        compiled = _host_checked(compiled, example_inputs, rec, cfg.host_memory_budget)
    return compiled


@contextlib.contextmanager
def _explained_upstream_failure(gm: fx.GraphModule):
    """A compile failure whose cause is upstream gets a UserWarning naming it before it propagates
    (Dynamo then breaks the graph, as it does for Inductor itself; the user's log would otherwise say
    "backend compiler lemo failed"). Known: transformers' fp32 mixture-of-experts fallback, whose
    backward cannot be traced (`_compat.untraceable_moe_backward`)."""
    try:
        yield
    except Exception:
        from .passes.common import graph_modules
        key = ("transformers", "grouped_mm_fallback")  # once per process: every graph fragment fails alike
        if key not in _warned_dense and _compat.untraceable_moe_backward() and any(
                str(n.target).startswith(_compat.GROUPED_MM_FALLBACK) for m in graph_modules(gm) for n in m.graph.nodes):
            _warned_dense.add(key)
            warnings.warn(
                "lemo: the installed transformers' `grouped_mm_fallback` (mixture-of-experts matmuls when the "
                "expert weights are not bf16) has a backward that torch.compile cannot trace, so the graph breaks "
                "at every experts call, with Inductor as with lemo, and the broken-up graphs get few or no sparse "
                "layers. Train in bf16 (transformers then calls torch's grouped_mm) or use a transformers release "
                "whose fallback registers `grouped_mm_fallback_backward`.", UserWarning, stacklevel=3)
        raise


def make_backend(cfg: LemoConfig | None = None, **options: Any):
    """A backend callable bound to a config: torch.compile(model, backend=make_backend(LemoConfig(...)))."""
    base = cfg if cfg is not None else _config.get_default()
    bound = base.replace(**options) if options else base

    def lemo(gm: fx.GraphModule, example_inputs: list, **kwargs: Any):
        opts = kwargs.get("options")
        return compile_graph(gm, example_inputs, bound.replace(**opts) if opts else bound)

    return lemo
