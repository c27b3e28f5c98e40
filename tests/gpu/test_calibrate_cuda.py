"""Calibration of a model that lives on the GPU (needs CUDA; run with TRITON_INTERPRET=0).

`calibrate.run` on a CUDA model once crashed: the training-free factors were computed on the model's
device while the captured oracle statistics live on the CPU. The file written from a CUDA model must
equal the one written from the same model on the CPU (same capture, same training), up to the oracle
kernels' fp32 rounding."""

import pytest
import torch

from lemo_compile import calibrate
from lemo_compile.kernels import oracle
from lemo_compile.testing.models import tiny_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or oracle.triton is None or oracle.triton_interpreted(),
    reason="needs CUDA and compiled Triton kernels (TRITON_INTERPRET=0)")


def _chunks(count, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, n), generator=g) for _ in range(count)]


def test_calibrate_a_cuda_model_matches_cpu(tmp_path):
    cpu_model = tiny_model("llama", lora=True).eval()
    cuda_model = tiny_model("llama", lora=True).eval().cuda()  # same seed: the same weights
    chunks, held = _chunks(2, 150, 1), _chunks(1, 150, 2)
    rep_gpu = calibrate.run(cuda_model, [c.cuda() for c in chunks], str(tmp_path / "gpu.safetensors"), block=16,
                            keep=0.5, steps=5, held_out=[c.cuda() for c in held], progress=False)
    rep_cpu = calibrate.run(cpu_model, chunks, str(tmp_path / "cpu.safetensors"), block=16, keep=0.5, steps=5,
                            held_out=held, progress=False)
    assert len(rep_gpu["held_out"]) == len(rep_cpu["held_out"]) > 0
    meta_g, fac_g = calibrate.load(str(tmp_path / "gpu.safetensors"))
    meta_c, fac_c = calibrate.load(str(tmp_path / "cpu.safetensors"))
    assert meta_g["model"] == meta_c["model"]
    for i in fac_c:
        for a, b in zip(fac_g[i], fac_c[i]):
            assert a.device.type == "cpu"
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
