"""Configuration of the lemo backend.

`LemoConfig` is a frozen, validated, hashable dataclass (it feeds compile-cache keys). A process-wide
default can be replaced with `set_default()` or temporarily with `patch()`, the convention of
`torch._inductor.config`; `torch.compile(..., options={...})` overrides single fields per compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
from fractions import Fraction
from typing import Any, Iterator


class AttnMode(str, enum.Enum):
    TOKENS = "tokens"  # kept tokens only, as queries and as keys/values (the paper's semantics)
    KEYS = "keys"  # every token a query, keys/values restricted to the kept blocks
    BACKWARD = "backward"  # dense forward, backward over kept queries x kept keys only


class MlpMode(str, enum.Enum):
    BACKWARD = "backward"  # dense forward, only kept rows keep activations and get MLP gradient
    TOKENS = "tokens"  # MLP runs on kept rows only (ablation; bad fidelity)
    DENSE = "dense"  # MLP unchanged


class Inner(str, enum.Enum):
    INDUCTOR = "inductor"
    EAGER = "eager"  # AOT autograd with the ATen graphs run eagerly (CPU tests, debugging)


BUILTIN_PREDICTORS = ("pooled", "random")
LOGITS_MODES = ("keep", "drop")


@dataclasses.dataclass(frozen=True)
class LemoConfig:
    # Master switch: False turns every rewrite off; the backend then compiles like its inner compiler.
    enabled: bool = True
    # Tokens per block: the unit of selection. Must be a power of two.
    block_size: int = 64
    # Fraction of blocks kept in every sparse layer, in (0, 1]. k = ceil(keep_ratio * num_blocks).
    # 1.0 still rewrites the sparse layers (keeping every block: numerically the dense model);
    # list a layer in dense_layers to leave it untouched.
    keep_ratio: float = 0.4
    # Per-layer overrides of keep_ratio, as ((layer, ratio), ...).
    layer_keep_ratios: tuple[tuple[int, float], ...] = ()
    # Layers left dense. None: the released paper code's schedule (first half and the last layer).
    dense_layers: tuple[int, ...] | None = None
    # Blocks every keep set contains (negative counts from the end); block 0 is the attention sink.
    forced_blocks: tuple[int, ...] = (0,)
    # How attention treats eliminated tokens in sparse layers (see AttnMode).
    attn_mode: AttnMode = AttnMode.BACKWARD
    # How the MLP treats eliminated tokens in sparse layers (see MlpMode).
    mlp_mode: MlpMode = MlpMode.BACKWARD
    # Block scorer: "pooled" (training-free, the layer's own W_q/W_k on block means), "random"
    # (seeded, for tests and ablations), or the path of a predictor file written by
    # lemo_compile.calibrate (low-rank factors per layer; the file's sizes must match the model).
    predictor: str = "pooled"
    # Seed of the "random" scorer.
    seed: int = 0
    # Which layer a single-decoder-layer graph is (per-layer compile, FSDP2); None when unknown.
    layer_index: int | None = None
    # Number of decoder layers of the model, for single-layer graphs (None: counted in the graph).
    num_layers: int | None = None
    # Compiler the rewritten graphs are handed to.
    inner: Inner = Inner.INDUCTOR
    # Replace an attention mask that is provably the causal pattern (built from constants only, static
    # length) by SDPA's is_causal=True, in every layer (passes.causal): HF materializes the n x n mask
    # under torch.compile, which keeps SDPA off its causal flash kernel (H200, Llama-3.2-1B, 16K: a
    # dense compiled step 0.66 -> 0.33 s, benchmarks/results/causal_1b_16k.json). Also carry a mask built
    # from one input (a 2-D attention_mask: padding; packed position_ids: documents) as segment ids, with
    # attention per segment and no n x n mask (passes.masks). False leaves every mask as HF builds it.
    causal_mask: bool = True
    # Attention written out as tensor ops (q @ k^T, scale, additive mask, softmax, p @ v: models with no
    # SDPA path, or loaded with attn_implementation="eager") becomes one SDPA call where that is the same
    # function (passes.eager_attention), so its layers can be sparse and lose their n x n temporaries.
    # False leaves such attention as written (and its layers dense, with the reason in the record).
    eager_attention: bool = True
    # Fused row kernels (passes.fuse, kernels/rows.py) at both ends of each kept-row block copy:
    # gather + RMSNorm, and GEMM + residual scatter-add. Triton on CUDA, PyTorch twins elsewhere.
    # None (default): only with inner="eager", where they measured 0.977x the step; under Inductor they
    # measured 1.001x (Inductor fuses these ends itself; benchmarks/results/fused_1b_16k_v3.json).
    fused_kernels: bool | None = None
    # Sparse activation checkpointing: a sparse layer inside an activation-checkpoint region keeps
    # only its kept rows and keep set for the recompute (attn_mode tokens or backward, the latter
    # also the dense attention's output and log-sum-exp at the kept queries; see docs/design.md §2.2).
    sparse_checkpoint: bool = True
    # Fraction of the activations AOT autograd's min-cut partitioner may keep for backward; below
    # 1.0 it recomputes the rest (torch._functorch.config.activation_memory_budget, applied to lemo's
    # compiles only; used by the Inductor inner compiler). None leaves torch's setting alone.
    activation_memory_budget: float | None = None
    # Compute the LM head + cross-entropy loss in row segments (exact; never holds the full fp32
    # logits or their gradient). See passes.peak_cut.
    peak_cut: bool = True
    # Bytes of temporaries one loss segment may hold; sets the loss's rows per segment.
    segment_bytes: int = 1 << 27
    # The same for one MLP segment (segment_mlp). Larger than the loss's: an MLP segment runs some 40
    # eager kernels (60 with LoRA), and small segments are bound by launches and small GEMMs
    # (benchmarks/diag/mlp_segment_speed.py).
    mlp_segment_bytes: int = 1 << 30
    # Compute SwiGLU MLPs (Llama, Mistral, Qwen) in row segments: the backward keeps only the MLP's
    # input and recomputes its intermediates a segment at a time (exact; costs the gate and up GEMMs
    # once more). See passes.mlp_segment.
    segment_mlp: bool = False
    # Logits a training graph returns when its loss is segmented: "keep" (the model's logits, as
    # without lemo) or "drop" (an empty (batch, seq, 0) tensor: saves the head's full matmul and
    # its n x vocab output; any use of the logits then fails loudly).
    logits: str = "keep"
    # Activation offload: the tensors a training graph saves for its backward (each of at least
    # offload_min_bytes: under checkpointing the layer inputs, a sparse layer's kept rows and what its
    # backward mode keeps) go to pinned host memory in the forward and come back ahead of their use in
    # the backward, copied on a side stream on CUDA (AOT autograd's activation offloading, driven by
    # lemo's tags). Exact. Composes with HF's gradient_checkpointing_kwargs={"offload": True}.
    offload: bool = False
    offload_min_bytes: int = 1 << 20
    # Host bytes one graph's offloaded activations may take (None: no limit); a graph that needs more
    # is refused at compile time, before its step runs, with both figures.
    host_memory_budget: int | None = None
    # Regional compilation (passes.regions), opt-in until measured on the GPU: checkpointed decoder layers
    # whose rewritten graphs are identical call one shared body (invoke_subgraph inside each layer's
    # checkpoint), so AOT autograd and Inductor compile each layer kind once, not each layer. Exact
    # (tests/passes/test_regions.py); the backward still recomputes each layer. No memory estimate in
    # the record (explain() compiles whole-model). Inductor inner compiler only; never with offload.
    regional: bool = False

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("attn_mode", _enum("attn_mode", AttnMode, self.attn_mode))
        fix("mlp_mode", _enum("mlp_mode", MlpMode, self.mlp_mode))
        fix("inner", _enum("inner", Inner, self.inner))
        for name in ("enabled", "peak_cut", "sparse_checkpoint", "causal_mask", "eager_attention", "segment_mlp",
                     "regional"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LemoConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.fused_kernels is not None and not isinstance(self.fused_kernels, bool):
            raise ValueError(f"LemoConfig.fused_kernels must be a bool or None, got {self.fused_kernels!r}")
        b = self.block_size
        if not isinstance(b, int) or isinstance(b, bool) or b < 1 or b & (b - 1):
            raise ValueError(f"LemoConfig.block_size must be a power of two (e.g. 64), got {b!r}")
        _check_ratio("keep_ratio", self.keep_ratio)
        lkr = self.layer_keep_ratios
        lkr = lkr.items() if isinstance(lkr, dict) else _sequence("layer_keep_ratios", lkr,
                                                                   "((layer, ratio), ...) or {layer: ratio}")
        pairs = []
        for p in lkr:
            p = _sequence("layer_keep_ratios", p, "((layer, ratio), ...) or {layer: ratio}")
            if len(p) != 2:
                raise ValueError(f"LemoConfig.layer_keep_ratios must hold (layer, ratio) pairs, got {p!r}")
            pairs.append(tuple(p))
        for layer, ratio in pairs:
            _check_layer("layer_keep_ratios", layer)
            _check_ratio(f"layer_keep_ratios[{layer}]", ratio)
        fix("layer_keep_ratios", tuple((int(l), float(r)) for l, r in pairs))
        if self.dense_layers is not None:
            for layer in _sequence("dense_layers", self.dense_layers, "None or a tuple of layer indices"):
                _check_layer("dense_layers", layer)
            fix("dense_layers", tuple(int(x) for x in self.dense_layers))
        for fb in _sequence("forced_blocks", self.forced_blocks, "a tuple of block indices"):
            if not isinstance(fb, int) or isinstance(fb, bool):
                raise ValueError(f"LemoConfig.forced_blocks must be ints, got {fb!r}")
        fix("forced_blocks", tuple(self.forced_blocks))
        if not isinstance(self.predictor, str):
            raise ValueError(f"LemoConfig.predictor must be one of {BUILTIN_PREDICTORS} or the path of a "
                             f"predictor file, got {self.predictor!r}")
        if self.predictor not in BUILTIN_PREDICTORS:
            import os

            if not os.path.isfile(self.predictor):
                raise ValueError(f"LemoConfig.predictor must be one of {BUILTIN_PREDICTORS} or the path of a "
                                 f"predictor file (lemo_compile.calibrate), got {self.predictor!r}: no such file")
            from .calibrate import read_metadata

            read_metadata(self.predictor)  # a clear error now for a file that is not one of ours
        amb = self.activation_memory_budget
        if amb is not None and (isinstance(amb, bool) or not isinstance(amb, (int, float)) or not 0.0 <= amb <= 1.0):
            raise ValueError(f"LemoConfig.activation_memory_budget must be None or a number in [0, 1], got {amb!r}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"LemoConfig.offload must be a bool, got {self.offload!r}")
        hb = self.host_memory_budget
        if hb is not None and (isinstance(hb, bool) or not isinstance(hb, int) or hb < 0):
            raise ValueError(f"LemoConfig.host_memory_budget must be None or a number of bytes >= 0, got {hb!r}")
        for name in ("segment_bytes", "mlp_segment_bytes", "offload_min_bytes"):
            sb = getattr(self, name)
            if isinstance(sb, bool) or not isinstance(sb, int) or sb < 1:
                raise ValueError(f"LemoConfig.{name} must be a positive int, got {sb!r}")
        if self.logits not in LOGITS_MODES:
            raise ValueError(f"LemoConfig.logits must be one of {LOGITS_MODES}, got {self.logits!r}")
        if self.layer_index is not None:
            _check_layer("layer_index", self.layer_index)
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ValueError(f"LemoConfig.num_layers must be a positive int, got {self.num_layers!r}")

    # -- derived ----------------------------------------------------------------------------
    def keep_fraction(self, layer: int | None, num_layers: int | None) -> Fraction | None:
        """Keep ratio of `layer` as an exact fraction, or None when the layer stays dense."""
        if layer is None:
            layer = self.layer_index
        if num_layers is None:
            num_layers = self.num_layers
        if layer is None or num_layers is None:
            return None
        overrides = dict(self.layer_keep_ratios)
        if layer in overrides:
            ratio = overrides[layer]
        elif layer in self.dense_layer_set(num_layers):
            return None
        else:
            ratio = self.keep_ratio
        return Fraction(ratio).limit_denominator(4096)

    def check_layers(self, num_layers: int) -> None:
        """ValueError when dense_layers, layer_keep_ratios or layer_index name a layer the model (of
        `num_layers` decoder layers) does not have: a typo there would silently leave layers sparse."""
        for name, layers in (("dense_layers", self.dense_layers or ()),
                             ("layer_keep_ratios", [layer for layer, _ in self.layer_keep_ratios]),
                             ("layer_index", () if self.layer_index is None else (self.layer_index,))):
            bad = sorted(layer for layer in layers if layer >= num_layers)
            if bad:
                raise ValueError(f"LemoConfig.{name} names layers {bad}, but the model has {num_layers} decoder "
                                 f"layers (indices 0-{num_layers - 1})")

    def dense_layer_set(self, num_layers: int) -> frozenset[int]:
        if self.dense_layers is not None:
            return frozenset(self.dense_layers)
        return frozenset(range(num_layers // 2)) | {num_layers - 1}

    @property
    def use_fused_kernels(self) -> bool:
        """fused_kernels, its None (default) resolved: on with the eager inner compiler only."""
        return self.inner is Inner.EAGER if self.fused_kernels is None else self.fused_kernels

    def replace(self, **changes: Any) -> "LemoConfig":
        fields = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in fields:
                raise ValueError(
                    f"unknown lemo option {key!r}; accepted options: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({k: (v.value if isinstance(v, enum.Enum) else v) for k, v in d.items()},
                          sort_keys=True)


def _enum(name: str, cls: type[enum.Enum], value: Any) -> enum.Enum:
    try:
        return cls(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"LemoConfig.{name} must be one of {accepted}, got {value!r}") from None


def _sequence(name: str, value: Any, expected: str) -> tuple:
    """value as a tuple when it is a list or tuple (a string or a lone number is a mistake)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"LemoConfig.{name} must be {expected}, got {value!r}")
    return tuple(value)


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"LemoConfig.{name} must be a number in (0, 1], got {value!r}")


def _check_layer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"LemoConfig.{name} must hold non-negative layer indices, got {value!r}")


_default = LemoConfig()


def get_default() -> LemoConfig:
    return _default


def set_default(cfg: LemoConfig) -> None:
    global _default
    if not isinstance(cfg, LemoConfig):
        raise TypeError(f"expected a LemoConfig, got {type(cfg).__name__}")
    _default = cfg


@contextlib.contextmanager
def patch(**changes: Any) -> Iterator[LemoConfig]:
    """Temporarily change the process default: `with lemo_compile.config.patch(keep_ratio=0.5): ...`."""
    global _default
    old = _default
    _default = old.replace(**changes)
    try:
        yield _default
    finally:
        _default = old


def resolve(options: dict[str, Any] | None) -> LemoConfig:
    """The config for one compile: the process default, a LemoConfig under options["config"], and the
    remaining `options` as field overrides. Bad keys or values raise ValueError naming them."""
    cfg = _default
    if not options:
        return cfg
    options = dict(options)
    if "config" in options:
        cfg = options.pop("config")
        if not isinstance(cfg, LemoConfig):
            raise ValueError(f"options['config'] must be a LemoConfig, got {type(cfg).__name__}")
    return cfg.replace(**options) if options else cfg
