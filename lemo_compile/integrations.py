"""Integration with the Hugging Face stack.

The HF Trainer hands `torch_compile_backend` to accelerate, whose backend enum rejects names it does
not know ("lemo"). The supported path is to compile the model in place before building the Trainer:

    from lemo_compile.integrations import compile_for_training
    compile_for_training(model, LemoConfig(keep_ratio=0.4))      # model.compile(backend=lemo)
    Trainer(model=model, args=TrainingArguments(...), ...).train()   # torch_compile left False

Checkpoints saved from such a run are plain PEFT adapters: lemo changes how the training step is
computed, not the parameters or their names.

Data collators of the HF stack add an `attention_mask` to every batch, all ones when nothing is
padded; packing collators pass `position_ids`. lemo carries the mask HF builds from either as segment
ids (`passes.masks`), so no collator needs wrapping. `drop_all_ones_attention_mask` remains for
graphs lemo leaves alone (then an unpadded batch without its mask lets `passes.causal` prove the
causal pattern): it is no longer needed with lemo's default passes.

Per-layer compilation (FSDP2, or any setup that compiles decoder layers one by one) goes through
`compile_layers`: a graph of one decoder layer does not say which layer it is, so each layer is
compiled with a config that names it (`layer_index`, `num_layers`):

    compile_layers(model, LemoConfig(keep_ratio=0.4))
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch

from . import _compat
from .backend import make_backend
from .config import LemoConfig, get_default
from .reference import decoder_layers

log = logging.getLogger("lemo_compile")


def compile_for_training(model: torch.nn.Module, cfg: LemoConfig | None = None, **compile_kwargs: Any) -> torch.nn.Module:
    """Compile `model` in place with the lemo backend (nn.Module.compile keeps state_dict keys
    unprefixed) and turn off the KV cache, which training graphs do not need. Returns the model."""
    _no_kv_cache(model)
    model.compile(backend=make_backend(cfg), **compile_kwargs)
    if not _compat.wrap_compiled_call(model, _packed_metadata_dynamic):
        log.warning("lemo: this torch has no nn.Module._compiled_call_impl; packed batches whose document "
                    "count changes (cu_seq_lens_q/k) will recompile once")
    return model


# Packing collators (HF DataCollatorWithFlattening(return_flash_attn_kwargs=True), TRL padding_free) pass
# the document boundaries as 1-D tensors whose length is the row's document count + 1. SDPA models never
# read them, but once a graph break splits the forward (PEFT's input-require-grads hook under gradient
# checkpointing does), they become inputs of the resumed graph, and Dynamo compiles that graph again the
# first time the document count changes: minutes at 8B. Marked dynamic before the first call, the first
# graph already serves every document count.
PACKED_METADATA = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")


def _packed_metadata_dynamic(compiled: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        for name in PACKED_METADATA:
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(*args, **kwargs)

    return call


def compile_layers(model: torch.nn.Module, cfg: LemoConfig | None = None, **compile_kwargs: Any) -> torch.nn.Module:
    """Compile every decoder layer of `model` in place (`nn.Module.compile`), each with the lemo
    config of its position: dense layers as the config says, sparse layers with their keep ratio.

    Layers whose compiled graph does not depend on their index (same keep ratio, pooled predictor:
    its weights are the layer's own, graph inputs) share one backend, so Dynamo compiles one graph
    for them; with a random or calibrated predictor every layer gets its own. Dynamo counts each
    layer's graph against `recompile_limit` of the shared `forward` code, and past the limit it
    would run the remaining layers uncompiled, silently dense; the limit is raised to fit.
    The rest of the model (embeddings, final norm, LM head and loss) stays eager unless compiled
    separately. Returns the model."""
    base = cfg if cfg is not None else get_default()
    _no_kv_cache(model)
    layers = decoder_layers(model)
    n = len(layers)
    backends: dict[Any, Callable] = {}
    for i, layer in enumerate(layers):
        keep = base.keep_fraction(i, n)
        group = ("keep", keep) if base.predictor == "pooled" else ("layer", i)
        if group not in backends:
            backends[group] = make_backend(base.replace(layer_index=i, num_layers=n))
        layer.compile(backend=backends[group], **compile_kwargs)
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    need = 2 * len(backends) + 8  # a static and a dynamic-length graph per backend, and room for the user's
    if getattr(dynamo, name) < need:
        log.info("lemo: torch._dynamo.config.%s %d -> %d for %d per-layer backends",
                 name, getattr(dynamo, name), need, len(backends))
        setattr(dynamo, name, need)
    return model


def _no_kv_cache(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False


def strip_all_ones_attention_mask(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The batch without its `attention_mask` when that mask is all ones (nothing padded): the
    model then computes the same causal attention without a mask input. Padded batches are
    returned unchanged."""
    mask = batch.get("attention_mask")
    if mask is None or not bool(torch.as_tensor(mask).all()):
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def drop_all_ones_attention_mask(collator: Callable[[list], Mapping[str, Any]]) -> Callable[[list], Mapping[str, Any]]:
    """Wrap a data collator with `strip_all_ones_attention_mask`."""

    def collate(features: list) -> Mapping[str, Any]:
        return strip_all_ones_attention_mask(collator(features))

    return collate
