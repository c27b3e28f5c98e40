"""Every touchpoint with private or version-dependent torch APIs, in one place (STYLE 17)."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("lemo_compile")


def register_torch_log() -> None:
    """Let TORCH_LOGS="+lemo_compile" set our loggers' level."""
    try:
        from torch._logging._internal import register_log
        register_log("lemo_compile", ["lemo_compile"])
    except Exception:  # pragma: no cover - API moved
        log.debug("could not register lemo_compile with torch._logging")


def activation_memory_budget(budget: float | None):
    """Context for the min-cut partitioner's activation budget (a functorch config; it is part of
    AOT autograd's cache key). The backward is partitioned inside compile_fx's first call."""
    import contextlib
    if budget is None:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config
    return functorch_config.patch(activation_memory_budget=float(budget))


def must_save_policy():
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE


def aot_eager(fw_pass, bw_pass, joint_pass=None):
    """AOT autograd whose forward/backward ATen graphs run eagerly after our passes; `joint_pass`
    sees the joint graph before the (default) partitioner splits it."""
    from functorch.compile import default_partition, make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def partition(joint: torch.fx.GraphModule, joint_inputs, **kwargs):
        if joint_pass is not None:
            joint_pass(joint.graph)
        return default_partition(joint, joint_inputs, **kwargs)

    def fw(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        fw_pass(gm)
        return make_boxed_func(gm.forward)

    def bw(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        bw_pass(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=fw, bw_compiler=bw, partition_fn=partition)


# Inductor options for a graph that calls shared (invoke_subgraph) bodies. AOT autograd's partition of
# such a body returns some of its inputs (parameters) as the values it saves for the backward, and
# Inductor (torch 2.11, 2.13) treats those outputs as buffers of its own: after their last use it
# reused one's storage for a later result, so a regional backward wrote sparse layers' LoRA gradients
# into another layer's weights. No buffer reuse and no in-place reuse of dead buffers: the CUDA caching
# allocator still recycles the memory, a little later.
NO_BUFFER_REUSE = {"allow_buffer_reuse": False, "inplace_buffers": False}


def compile_fx(gm, example_inputs, config_patches: dict):
    from torch._inductor.compile_fx import compile_fx as _compile_fx
    return _compile_fx(gm, example_inputs, config_patches=config_patches)


def custom_graph_pass_base():
    from torch._inductor.custom_graph_pass import CustomGraphPass
    return CustomGraphPass


def hash_for_files(paths: tuple[str, ...], extra: str) -> bytes:
    from torch._inductor.custom_graph_pass import get_hash_for_files
    return get_hash_for_files(paths, extra)


def trace_structured(name: str, payload_fn) -> None:
    try:
        torch._logging.trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"},
                                        payload_fn=payload_fn)
    except Exception:  # pragma: no cover
        log.debug("trace_structured unavailable")


def recompile_reason() -> str | None:
    """Why Dynamo is compiling this frame again (its first failed guard), read inside a backend call;
    None on a frame's first compile or where this torch does not say."""
    try:
        from torch._dynamo.utils import get_metrics_context
        ctx = get_metrics_context()
        return ctx._metrics.get("recompile_reason") if ctx.in_progress() else None
    except Exception:  # pragma: no cover - private API moved
        return None


OFFLOAD_PREFIX = "cpu_offload_"  # AOT autograd names each offloaded forward output so (sync and async paths)


def activation_offload(enabled: bool, cuda: bool):
    """Context enabling AOT autograd's activation offloading for one compile: the partitioner moves
    saved forward outputs whose joint-graph node carries meta["should_offload"] to host memory and
    reloads them in the backward; on CUDA the copies run on a side stream, the forward's waits sink to
    the end and the backward's reloads are prefetched. A functorch config: part of AOT's cache key."""
    import contextlib
    if not enabled:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config
    if not hasattr(functorch_config, "enable_activation_offloading"):
        raise RuntimeError(f"LemoConfig.offload needs AOT autograd's activation offloading, which torch "
                           f"{torch.__version__} does not have (torch._functorch.config.enable_activation_offloading)")
    patch = {"enable_activation_offloading": True}
    if cuda and side_stream_offload():
        mend_record_stream_fake()
        for key in ("activation_offload_separate_stream", "activation_offload_sink_wait",
                    "activation_reload_prefetch"):
            if hasattr(functorch_config, key):
                patch[key] = True
    return functorch_config.patch(**patch)


def _version() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def side_stream_offload() -> bool:
    """Whether offload copies may run on a side stream. Not on torch < 2.13: torch 2.11's stream ops
    look up the side stream by an index Dynamo never registered for AOT autograd's offload pass
    ("Index not registered in index_to_user_object_weakref" at the first step, after a wrong fake of
    streams::record_stream, mended below, broke its lowering); the copies then run on the compute
    stream, synchronously."""
    return _version() >= (2, 13)


def mend_record_stream_fake() -> bool:
    """torch 2.11 registers the fake of `streams::record_stream(tensor, stream_index)` with the three
    parameters of `streams::sync_dealloc`, so Inductor fails lowering the side-stream activation offload
    ("missing 1 required positional argument: 'to_dealloc'"). Where the registered fake does not accept
    the op's own arguments, register one that does (the op returns nothing). True when it mended."""
    import inspect
    try:
        import torch._dynamo.variables.streams  # noqa: F401  (registers the streams:: ops)
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - a torch without stream ops has no side-stream offload
        return False
    opdef = OPDEFS.get("streams::record_stream")
    fake = getattr(opdef, "_abstract_fn", None)
    if fake is None:
        return False
    try:
        inspect.signature(fake).bind(None, 0)
        return False
    except TypeError:
        pass

    def record_stream_fake(tensor: torch.Tensor, stream_index: int) -> None:
        return None

    opdef.register_fake(record_stream_fake)
    return True


def compiled_entries(code) -> int | None:
    """How many compiled entries Dynamo holds for a code object; None where this torch does not say."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        return len(_debug_get_cache_entry_list(code))
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - private API moved
        return None


def drop_compiled(code) -> None:
    """Drop Dynamo's compiled entries for one code object (the next call compiles it again)."""
    from torch._dynamo.eval_frame import remove_from_cache
    remove_from_cache(code)


def no_autograd_cache(enabled: bool):
    """Context turning AOT autograd's cache off for one compile (when `enabled`)."""
    import contextlib
    import torch._functorch.config as functorch_config
    if not enabled or not hasattr(functorch_config, "enable_autograd_cache"):
        return contextlib.nullcontext()
    return functorch_config.patch(enable_autograd_cache=False)


def cacheable_functions(names: dict[str, str]) -> dict[str, str]:
    """Inductor's unsafe_marked_cacheable_functions with `names` (qualified name -> key) added: the
    plain Python functions lemo's rewrites call in a graph, which AOT autograd's cache otherwise refuses
    (it bypasses the whole graph). {} where this torch has no such option."""
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config, "unsafe_marked_cacheable_functions"):
        return {}
    return {"unsafe_marked_cacheable_functions": {**inductor_config.unsafe_marked_cacheable_functions, **names}}


def specialize_float(value: Any) -> Any:
    """The concrete value of a symbolic float (torch.compile(dynamic=True) passes module floats such as
    attention dropout as graph inputs), guarded: Dynamo reuses the compiled graph only while the input
    keeps this value. None when it cannot be specialized; other values are returned as they are."""
    if not isinstance(value, torch.SymFloat):
        return value
    from torch.fx.experimental.symbolic_shapes import guard_float

    try:
        return guard_float(value)
    except Exception:  # unbacked (data-dependent) or a torch without the helper: unknown
        return None


def wrap_compiled_call(module: torch.nn.Module, wrap) -> bool:
    """Replace the callable `nn.Module.compile` installed on `module` by `wrap(callable)`, so code runs
    before Dynamo sees each call's arguments (marking inputs dynamic cannot happen inside the traced
    call). False when this torch keeps the compiled call elsewhere."""
    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is None:
        return False
    module._compiled_call_impl = wrap(compiled)
    return True


GROUPED_MM_FALLBACK = "transformers.grouped_mm_fallback"  # the custom op's FX target name


def untraceable_moe_backward() -> bool:
    """True where transformers' `grouped_mm_fallback` op (the experts' matmuls of mixture-of-experts
    models when weights are not bf16 under torch.compile) has a backward that AOT autograd cannot
    trace: transformers up to 5.17 loops over `offs.tolist()` in the autograd formula itself, which
    raises on fake tensors, so any compiler but `eager` breaks the graph at every experts call. Later
    versions route the backward through a second custom op (`grouped_mm_fallback_backward`)."""
    try:
        import transformers.integrations.moe  # noqa: F401  (registers the ops)
    except Exception:  # pragma: no cover - no transformers, or no MoE integration
        return False
    ops = torch.ops.transformers
    return hasattr(ops, "grouped_mm_fallback") and not hasattr(ops, "grouped_mm_fallback_backward")
