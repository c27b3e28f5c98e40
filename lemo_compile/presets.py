"""Named configurations for the two trade-offs users ask for (README "Presets").

    torch.compile(model, backend=lemo_compile.backend(lemo_compile.presets.get("memory")))

- "memory": spends compute to save memory. Token elimination (keep 0.4, attention on kept tokens,
  MLP activations kept for kept rows only), the segmented loss with the logits dropped, sparse
  checkpointing for layers the user checkpoints, and AOT autograd's min-cut partitioner allowed to
  keep half of what it would (it recomputes the rest in backward).
- "speed": saves memory and time without recomputation: the same token elimination and segmented
  loss with dropped logits, no activation budget.

Neither changes the model: gradient checkpointing stays the user's choice
(`model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`).
Measured cost and savings are in BENCHMARKS.md once the end-to-end benchmark has run.
"""

from __future__ import annotations

from .config import LemoConfig

_PRESETS = {
    "memory": dict(keep_ratio=0.4, attn_mode="tokens", mlp_mode="backward", peak_cut=True, logits="drop",
                   sparse_checkpoint=True, activation_memory_budget=0.5),
    "speed": dict(keep_ratio=0.4, attn_mode="tokens", mlp_mode="backward", peak_cut=True, logits="drop",
                  sparse_checkpoint=True),
}

NAMES = tuple(_PRESETS)


def get(name: str, **overrides) -> LemoConfig:
    """The preset's LemoConfig, with any field overridden."""
    if name not in _PRESETS:
        raise ValueError(f"unknown lemo preset {name!r}; presets: {', '.join(NAMES)}")
    return LemoConfig(**{**_PRESETS[name], **overrides})
