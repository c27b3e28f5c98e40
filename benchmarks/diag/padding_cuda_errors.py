"""Diagnostic (GPU): run the default modes on padded tiny models on CUDA and print the full traceback of
any failure (the GPU test only shows its first line)."""
import traceback, torch, lemo_compile
from lemo_compile import LemoConfig
from lemo_compile.testing.models import tiny_model
from lemo_compile.testing.padding import padded_batch
for arch, kind, inner in [("gemma3", "left", "eager"), ("llama", "left", "inductor")]:
    torch._dynamo.reset()
    m = tiny_model(arch, lora=True).cuda()
    b = {k: v.cuda() for k, v in padded_batch(kind).items()}
    cfg = LemoConfig(inner=inner, keep_ratio=0.5, dense_layers=(0,), predictor="random")
    try:
        out = torch.compile(m, backend=lemo_compile.backend(cfg))(**b)
        out.loss.backward()
        print(arch, kind, inner, "OK", out.loss.item())
    except Exception:
        tb = traceback.format_exc()
        print(arch, kind, inner, "FAILED\n", tb[-5000:])
