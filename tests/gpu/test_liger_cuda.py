"""A model with Liger's kernels (RMSNorm, SwiGLU, RoPE: each a torch.autograd.Function over Triton kernels)
under lemo on CUDA: every layer is found, the sparse layer is rewritten through the Functions (Dynamo's
autograd_function_apply, probed on the GPU), and the step equals lemo_compile.reference run on the same
Liger model. Needs liger-kernel (carried as a wheel to the GPU machine; see BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from lemo_compile import LemoConfig
from lemo_compile.reference import reference_forward
from lemo_compile.testing.models import assert_step_close, lemo_step_grads, random_batch, step_grads, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
liger = pytest.importorskip("liger_kernel.transformers")


@pytest.fixture(scope="module")
def model():
    """Tiny Llama (fp32, LoRA) patched by apply_liger_kernel_to_llama; transformers' module-level
    names it replaces are restored afterwards."""
    from transformers.models.llama import modeling_llama

    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    saved = {n: getattr(modeling_llama, n) for n in names}
    model = tiny_model("llama", lora=True).to("cuda")
    liger.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=False, model=model.get_base_model())
    yield model
    for n, v in saved.items():
        setattr(modeling_llama, n, v)


@pytest.mark.parametrize("attn_mode,mlp_mode", [("backward", "backward"), ("tokens", "tokens")])
def test_liger_layers_are_sparse_and_equal_the_reference(model, attn_mode, mlp_mode):
    batch = {k: v.to("cuda") for k, v in random_batch(256, 2, 200, seed=3, pad_right=[0, 29]).items()}
    cfg = LemoConfig(keep_ratio=0.5, predictor="random", attn_mode=attn_mode, mlp_mode=mlp_mode)
    want = step_grads(model, lambda **b: reference_forward(model, cfg, **b).output, batch)
    *got, recs = lemo_step_grads(model, cfg, batch, sparsified_only=True)
    (rec,) = recs
    assert len(rec.detect.layers) == 4 and not rec.detect.skips, [str(s) for s in rec.detect.skips]
    assert [d["layer"] for d in rec.sparsify.layers] == [2], [str(s) for s in rec.sparsify.skips]
    assert_step_close(tuple(got), want, rtol=1e-4)
