"""Integration with the Hugging Face stack.

The HF Trainer hands `torch_compile_backend` to accelerate, whose backend enum rejects names it does
not know ("lemo"). The supported path is to compile the model in place before building the Trainer:

    from lemo_compile.integrations import compile_for_training
    compile_for_training(model, LemoConfig(keep_ratio=0.4))      # model.compile(backend=lemo)
    Trainer(model=model, args=TrainingArguments(...), ...).train()   # torch_compile left False

Checkpoints saved from such a run are plain PEFT adapters: lemo changes how the training step is
computed, not the parameters or their names.

Data collators of the HF stack add an `attention_mask` to every batch, all ones when nothing is
padded. The compiled graph then builds its n x n mask from that input, and lemo cannot prove it
causal (`passes.causal`), so attention runs the masked kernel (2x slower at 16K on an H200). Wrap the
collator so unpadded batches go without it:

    Trainer(..., data_collator=drop_all_ones_attention_mask(DataCollatorForLanguageModeling(tok, mlm=False)))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .backend import make_backend
from .config import LemoConfig


def compile_for_training(model: torch.nn.Module, cfg: LemoConfig | None = None, **compile_kwargs: Any) -> torch.nn.Module:
    """Compile `model` in place with the lemo backend (nn.Module.compile keeps state_dict keys
    unprefixed) and turn off the KV cache, which training graphs do not need. Returns the model."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    model.compile(backend=make_backend(cfg), **compile_kwargs)
    return model


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
