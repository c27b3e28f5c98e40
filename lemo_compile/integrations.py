"""Integration with the Hugging Face stack.

The HF Trainer hands `torch_compile_backend` to accelerate, whose backend enum rejects names it does
not know ("lemo"). The supported path is to compile the model in place before building the Trainer:

    from lemo_compile.integrations import compile_for_training
    compile_for_training(model, LemoConfig(keep_ratio=0.4))      # model.compile(backend=lemo)
    Trainer(model=model, args=TrainingArguments(...), ...).train()   # torch_compile left False

Checkpoints saved from such a run are plain PEFT adapters: lemo changes how the training step is
computed, not the parameters or their names.
"""

from __future__ import annotations

from typing import Any

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
