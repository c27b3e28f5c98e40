"""lemo_compile: a torch.compile backend ("lemo") for contextual token sparsity in long-context fine-tuning.

    compiled = torch.compile(model, backend="lemo")                       # process default config
    compiled = torch.compile(model, backend="lemo", options={"keep_ratio": 0.5})
    compiled = torch.compile(model, backend=lemo_compile.backend(LemoConfig(attn_mode="keys")))
"""

from . import config, presets
from .config import AttnMode, LemoConfig, MlpMode
from .backend import make_backend as backend  # noqa: F811  (the factory shadows the submodule name)
from .backend import records
from .inspect import explain

__all__ = ["AttnMode", "LemoConfig", "MlpMode", "backend", "config", "explain", "presets", "records"]
