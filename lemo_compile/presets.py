"""Named configurations for the trade-offs users ask for (README "Presets").

    torch.compile(model, backend=lemo_compile.backend(lemo_compile.presets.get("memory")))

- "memory": spends compute to save memory. Token elimination (keep 0.4, attention on kept tokens,
  MLP activations kept for kept rows only), the segmented loss with the logits dropped, sparse
  checkpointing for layers the user checkpoints, and AOT autograd's min-cut partitioner allowed to
  keep half of what it would (it recomputes the rest in backward).
- "speed": saves memory and time without recomputation: the same token elimination and segmented
  loss with dropped logits, no activation budget.
- "fidelity": the forward stays exact (attention and MLP in "backward" mode: only the backward is
  restricted to the kept tokens), with the segmented loss and sparse checkpointing. Measured on
  SmolLM2 at 8K: +0.43% held-out loss against dense fine-tuning, where "memory"/"speed"'s attention
  mode costs +28%. Its attention backward is plain PyTorch: slower than the other two.

Neither changes the model: gradient checkpointing stays the user's choice
(`model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`).
Measured cost and savings: BENCHMARKS.md ("Presets", "Training fidelity").
"""

from __future__ import annotations

from .config import LemoConfig

_PRESETS = {
    "memory": dict(keep_ratio=0.4, attn_mode="tokens", mlp_mode="backward", peak_cut=True, logits="drop",
                   sparse_checkpoint=True, activation_memory_budget=0.5),
    "speed": dict(keep_ratio=0.4, attn_mode="tokens", mlp_mode="backward", peak_cut=True, logits="drop",
                  sparse_checkpoint=True),
    "fidelity": dict(keep_ratio=0.4, attn_mode="backward", mlp_mode="backward", peak_cut=True, logits="drop",
                     sparse_checkpoint=True),
}

NAMES = tuple(_PRESETS)


def get(name: str, **overrides) -> LemoConfig:
    """The preset's LemoConfig, with any field overridden."""
    if name not in _PRESETS:
        raise ValueError(f"unknown lemo preset {name!r}; presets: {', '.join(NAMES)}")
    return LemoConfig(**{**_PRESETS[name], **overrides})
