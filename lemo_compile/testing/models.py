"""Tiny Hugging Face decoder LLMs for tests: fp32, CPU, seeded, SDPA attention, no KV cache.

Every architecture the project supports has a builder with the same small sizes (hidden 64, 4 query
heads, 2 KV heads of dim 16, MLP 128, vocab 256); the comments give a real checkpoint's size. The
weights are drawn with a larger `initializer_range` than real checkpoints so that attention is not
close to uniform, which would hide the difference between dense and sparse layers.

    model = tiny_model("qwen3", lora=True)
    batch = random_batch(256, b=2, n=200, seed=0, pad_right=[0, 37])
    model(**batch).loss.backward()
    grads = trainable_grads(model)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")

# Projections the LoRA adapters wrap: the attention's q/k/v/o (Phi-3 fuses q, k, v into one).
LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
}

# Gemma3's sliding window in the tiny model: shorter than the test lengths (128-256), so the sliding
# layers really drop keys.
GEMMA3_SLIDING_WINDOW = 96

_COMMON: dict[str, Any] = dict(
    attn_implementation="sdpa",
    use_cache=False,
    initializer_range=0.1,  # 0.02: larger so that tiny attention is not uniform
    attention_dropout=0.0,
)


def _llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(  # Llama-3.1-8B
        vocab_size=256,  # 128256
        hidden_size=64,  # 4096
        intermediate_size=128,  # 14336
        num_hidden_layers=layers,  # 32
        num_attention_heads=4,  # 32
        num_key_value_heads=2,  # 8
        head_dim=16,  # 128
        max_position_embeddings=1024,  # 131072
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **_COMMON,
    )


def _mistral_config(layers: int):
    from transformers import MistralConfig

    return MistralConfig(  # Mistral-7B-v0.3
        vocab_size=256,  # 32768
        hidden_size=64,  # 4096
        intermediate_size=128,  # 14336
        num_hidden_layers=layers,  # 32
        num_attention_heads=4,  # 32
        num_key_value_heads=2,  # 8
        head_dim=16,  # 128
        max_position_embeddings=1024,  # 32768
        sliding_window=None,  # None (v0.1 had 4096)
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **_COMMON,
    )


def _qwen2_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(  # Qwen2.5-7B; q/k/v projections have a bias, o_proj has none
        vocab_size=256,  # 152064
        hidden_size=64,  # 3584
        intermediate_size=128,  # 18944
        num_hidden_layers=layers,  # 28
        num_attention_heads=4,  # 28
        num_key_value_heads=2,  # 4
        max_position_embeddings=1024,  # 32768
        use_sliding_window=False,  # False
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **_COMMON,
    )


def _qwen3_config(layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(  # Qwen3-8B; RMSNorm on q and k per head
        vocab_size=256,  # 151936
        hidden_size=64,  # 4096
        intermediate_size=128,  # 12288
        num_hidden_layers=layers,  # 36
        num_attention_heads=4,  # 32
        num_key_value_heads=2,  # 8
        head_dim=16,  # 128
        max_position_embeddings=1024,  # 40960
        use_sliding_window=False,  # False
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **_COMMON,
    )


def _gemma3_config(layers: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(  # Gemma-3-4B text tower; q/k norms, sandwich norms, scaled embeddings
        vocab_size=256,  # 262208
        hidden_size=64,  # 2560
        intermediate_size=128,  # 10240
        num_hidden_layers=layers,  # 34
        num_attention_heads=4,  # 8
        num_key_value_heads=2,  # 4
        head_dim=16,  # 256
        query_pre_attn_scalar=16,  # 256
        max_position_embeddings=1024,  # 131072
        sliding_window=GEMMA3_SLIDING_WINDOW,  # 1024
        sliding_window_pattern=2,  # 6: layers alternate sliding, full, sliding, full, ...
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,  # True
        **_COMMON,
    )


def _phi3_config(layers: int):
    from transformers import Phi3Config

    return Phi3Config(  # Phi-3-mini-4k; fused qkv_proj and gate_up_proj
        vocab_size=256,  # 32064
        hidden_size=64,  # 3072
        intermediate_size=128,  # 8192
        num_hidden_layers=layers,  # 32
        num_attention_heads=4,  # 32
        num_key_value_heads=2,  # 32 (Phi-3-medium: 10 of 40)
        max_position_embeddings=1024,  # 4096
        original_max_position_embeddings=1024,  # 4096
        pad_token_id=0,  # 32000
        bos_token_id=1,
        eos_token_id=2,  # 32000
        tie_word_embeddings=False,
        **_COMMON,
    )


_BUILDERS: dict[str, tuple[Callable[[int], Any], str]] = {
    "llama": (_llama_config, "LlamaForCausalLM"),
    "mistral": (_mistral_config, "MistralForCausalLM"),
    "qwen2": (_qwen2_config, "Qwen2ForCausalLM"),
    "qwen3": (_qwen3_config, "Qwen3ForCausalLM"),
    "gemma3": (_gemma3_config, "Gemma3ForCausalLM"),
    "phi3": (_phi3_config, "Phi3ForCausalLM"),
}


def tiny_config(arch: str, layers: int = 4):
    """The tiny config of `arch` (one of ARCHS)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return _BUILDERS[arch][0](layers)


def tiny_model(arch: str, *, lora: bool = False, layers: int = 4, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised causal LM of `arch` in eval mode (every dropout is 0 anyway).

    With `lora=True` it is wrapped by PEFT with rank-4 adapters on the attention projections
    (LORA_TARGETS); lora_B is drawn at random instead of PEFT's zeros, so adapters change the output
    and every adapter gets a non-zero gradient. Only adapters are trainable then; without LoRA every
    parameter is. The global RNG is left untouched."""
    import transformers

    config = tiny_config(arch, layers)
    cls = getattr(transformers, _BUILDERS[arch][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS[arch])))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.1)
    return model.eval()


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> a copy of the gradient of every trainable parameter (zeros where it has none)."""
    return {name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters() if p.requires_grad}


def random_batch(vocab: int, b: int, n: int, seed: int,
                 pad_right: list[int] | None = None) -> dict[str, torch.Tensor]:
    """input_ids (b, n) int64, attention_mask (b, n) int64 and labels (b, n) int64.

    With `pad_right`, the last pad_right[i] tokens of row i are padding: id 0, mask 0, label -100."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (b, n), generator=g)  # 0-2 are pad/bos/eos
    attention_mask = torch.ones(b, n, dtype=torch.int64)
    if pad_right is not None:
        if len(pad_right) != b or any(not 0 <= p < n for p in pad_right):
            raise ValueError(f"pad_right must hold {b} counts in [0, {n}), got {pad_right}")
        for i, p in enumerate(pad_right):
            if p:
                attention_mask[i, n - p:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def step_grads(model: nn.Module, run: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """(loss, trainable gradients) of one run(**batch) and backward over model's parameters; the model's
    gradients are cleared before and after."""
    model.zero_grad(set_to_none=True)
    out = run(**batch)
    out.loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def lemo_step_grads(model: nn.Module, cfg: Any, batch: dict[str, torch.Tensor],
                    sparsified_only: bool = False) -> tuple[torch.Tensor, dict, list]:
    """step_grads of torch.compile(model) with lemo under cfg, from a fresh Dynamo state, and the compile
    records it made (only those with sparse layers if sparsified_only)."""
    import lemo_compile
    from lemo_compile.backend import clear_records

    torch._dynamo.reset()
    clear_records()
    loss, grads = step_grads(model, torch.compile(model, backend=lemo_compile.backend(cfg)), batch)
    recs = lemo_compile.records()
    return loss, grads, [r for r in recs if r.sparsified] if sparsified_only else recs


def assert_step_close(got: tuple, want: tuple, rtol: float = 1e-5) -> None:
    """Loss to 1e-6 (relative); each gradient to rtol of its largest entry, or of 1e-2 of the model's largest
    gradient where that is more: a gradient that is 0 in exact arithmetic (a key bias: softmax ignores a
    shift of every score) holds only rounding noise."""
    (l1, g1), (l0, g0) = got, want
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    assert g1.keys() == g0.keys()
    floor = 1e-2 * max(g.abs().max().item() for g in g0.values())
    for k in g0:
        scale = max(g0[k].abs().max().item(), floor)
        torch.testing.assert_close(g1[k], g0[k], rtol=rtol, atol=rtol * scale, msg=k)
