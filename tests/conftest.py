"""Shared fixtures: an isolated kernel cache per session, GPU skipping, per-test random generators.

Input builders live in ``tests/helpers.py`` (``from helpers import ...``); this directory is put on
sys.path here so that works whatever the import mode.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import HAS_CUDA, make_generator, requires_gpu, seed_for  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """Skip every test marked ``gpu`` when there is no CUDA device."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def xqa_cache_dir(tmp_path_factory):
    """Point XQA_JIT_CACHE_DIR at a fresh temporary directory for the session.

    Left alone when the variable is already set (e.g. to reuse a warmed cache across GPU runs). All tests
    of a session share it, so each kernel spec is compiled once per session.
    """
    preset = os.environ.get("XQA_JIT_CACHE_DIR")
    if preset:
        yield Path(preset)
        return
    path = tmp_path_factory.mktemp("xqa_jit_cache")
    os.environ["XQA_JIT_CACHE_DIR"] = str(path)
    try:
        yield path
    finally:
        if os.environ.get("XQA_JIT_CACHE_DIR") == str(path):
            del os.environ["XQA_JIT_CACHE_DIR"]


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's node id: fresh per test, reproducible across runs."""
    return make_generator(seed_for(request.node.nodeid))


@pytest.fixture
def cuda_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty kernel cache for one test (builds allowed)."""
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("XQA_JIT_NO_BUILD", raising=False)
    return tmp_path / "cache"
