import os

# Triton kernels run in the interpreter on CPU machines; the variable is read when kernels are defined.
# On a GPU machine they are compiled (set TRITON_INTERPRET=1 to force the interpreter there too).
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
