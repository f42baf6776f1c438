"""xqa_jit: JIT-compiled CUDA kernels for batched decode attention over a paged KV cache.

Importing this package does no I/O and touches no GPU: kernels are rendered, built and
loaded on first use (or ahead of time with ``cache_tool.py warmup``).
"""
from .api import xqa, xqa_mla
from .spec import DecodeSpec, MlaSpec, SpecError
from .build import XqaBuildError, XqaNoBuildError, cache_root, get_module, warmup

__version__ = "0.1.0"

__all__ = [
    "xqa", "xqa_mla", "DecodeSpec", "MlaSpec", "SpecError", "XqaBuildError",
    "XqaNoBuildError", "cache_root", "get_module", "warmup", "__version__",
]
