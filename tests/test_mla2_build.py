"""CPU tests of the wgmma latent MLA kernel (templates/mla2.cu.jinja, XQA_JIT_MLA_IMPL=v2): every
variant renders, two compile through the cache and report the geometry xqa_jit.mla_latent relies
on, and the implementation switch is read at call time."""
from __future__ import annotations

import pytest

import xqa_jit.build as xb
from xqa_jit import mla_latent
from xqa_jit.render import render
from xqa_jit.spec import MlaSpec

ALL = [MlaSpec(q_dtype=q, kv_dtype=kv, num_heads=h, impl="v2")
       for q, kv in (("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "e4m3"), ("bf16", "e4m3"))
       for h in (16, 32, 64, 128)]


def test_all_variants_render():
    for spec in ALL + [MlaSpec(debug=True, impl="v2")]:
        src = render(spec)
        assert f"xqa_jit generated source: {spec.name}" in src
        assert "xqa_launch" in src and "xqa_info" in src and "xqa_occupancy" in src
        assert "{{" not in src and "{%" not in src
        assert "wgmma.mma_async" in src


def test_distinct_from_v1():
    v1, v2 = MlaSpec(), MlaSpec(impl="v2")
    assert v1 != v2 and v1.name != v2.name and v2.name.endswith("_v2")
    assert render(v1) != render(v2)
    assert mla_latent._PARAMS.size == 27 * 8  # one Params layout for both templates
    body = render(v2)[render(v2).index("struct Params {"):]
    assert "double sm_scale, kv_scale;" in body[:body.index("};")]


def test_impl_switch(monkeypatch):
    monkeypatch.delenv("XQA_JIT_MLA_IMPL", raising=False)
    mla_latent.set_impl(None)
    assert mla_latent.current_impl() == "auto"
    monkeypatch.setenv("XQA_JIT_MLA_IMPL", "v2")
    assert mla_latent.current_impl() == "v2"
    mla_latent.set_impl("v1")
    try:
        assert mla_latent.current_impl() == "v1"
        with pytest.raises(ValueError):
            mla_latent.set_impl("v3")
    finally:
        mla_latent.set_impl(None)
    monkeypatch.setenv("XQA_JIT_MLA_IMPL", "nope")
    with pytest.raises(ValueError):
        mla_latent.current_impl()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("XQA_JIT_NO_BUILD", raising=False)
    return tmp_path / "cache"


@pytest.mark.build
@pytest.mark.parametrize("spec, rows, groups", [
    (MlaSpec(q_dtype="bf16", kv_dtype="bf16", num_heads=128, impl="v2"), 64, 2),
    (MlaSpec(q_dtype="fp16", kv_dtype="e4m3", num_heads=16, impl="v2"), 16, 1),
], ids=lambda v: v.name if isinstance(v, MlaSpec) else None)
def test_build_and_info(cache_dir, spec, rows, groups):
    mod = xb.get_module(spec, "9.0a")
    info = mod.info
    assert info["threads"] == 256
    assert info["rows_per_block"] == rows and info["row_chunks"] == groups
    assert info["tile_tokens"] == 64 and info["max_splits"] == 64
    assert 64 * 512 * 4 <= info["smem_bytes"] <= 232448
    assert mod.meta["name"] == spec.name and str(mod.path).startswith(str(cache_dir))
