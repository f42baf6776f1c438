"""The seed doc's examples (examples/*.py) run on the GPU and agree with the PyTorch reference.

Each example is imported from its file and its ``main(check=True)`` called: it runs the doc's snippet
with xqa_jit and returns max |out.float() - reference| (the reference sees the same fp16 inputs and
computes in float32 or better).

Tolerance: 5e-3 absolute for every example (all are fp16). The output is rounded to fp16 (11
significant bits) and its entries are averages of unit-normal values over 100-4096 tokens (|out| < 1),
so rounding contributes < 5e-4; the bound leaves room for the fp16 P.V product and for exp/rotary
evaluated in fp32 on the GPU, and is far below any masking, paging or position error (~1e-1).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU")]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FP16_ATOL = 5e-3


def load_example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"xqa_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["standard", "rope", "sliding_window", "sinks", "mla"])
def test_example(name):
    err = load_example(name).main(check=True)
    print(f"{name}: max |out - reference| = {err:.3e}")
    assert err <= FP16_ATOL, f"{name}: max |out - reference| = {err:.3e} > {FP16_ATOL}"


@pytest.mark.parametrize("random_cache", [False, True], ids=["doc-zero-cache", "random-cache"])
def test_batch_engine(random_cache):
    # The doc's engine starts from zero caches (every output is exactly 0); the random-cache variant
    # makes the per-layer comparison mean something.
    err = load_example("batch_engine").main(check=True, random_cache=random_cache)
    print(f"batch_engine random_cache={random_cache}: max |out - reference| = {err:.3e}")
    assert err <= FP16_ATOL
