"""CPU tests of the wgmma latent MLA kernels (templates/mla2.cu.jinja, mla3.cu.jinja and the
experimental mla4.cu.jinja, XQA_JIT_MLA_IMPL=v2/v3/v4): every variant renders, some compile through
the cache and report the
geometry xqa_jit.mla_latent relies on, the automatic choice, and the implementation switch is read
at call time."""
from __future__ import annotations

import pytest

import xqa_jit.build as xb
from xqa_jit import mla_latent
from xqa_jit.render import render
from xqa_jit.spec import MlaSpec, SpecError, mla_impl_for

ALL = [MlaSpec(q_dtype=q, kv_dtype=kv, num_heads=h, impl="v2")
       for q, kv in (("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "e4m3"), ("bf16", "e4m3"))
       for h in (16, 32, 64, 128)]
ALL_V3 = [MlaSpec(q_dtype=q, kv_dtype=kv, num_heads=h, impl="v3")
          for q, kv in (("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "e4m3"), ("bf16", "e4m3"))
          for h in (16, 32, 64, 128)]
ALL_V4 = [MlaSpec(q_dtype=q, kv_dtype=q, num_heads=128, impl="v4") for q in ("fp16", "bf16")]


def test_all_variants_render():
    for spec in ALL + ALL_V3 + ALL_V4 + [MlaSpec(debug=True, impl=i) for i in ("v2", "v3", "v4")]:
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


def test_v3_spec():
    v3 = MlaSpec(impl="v3")
    assert v3.name.endswith("_v3") and v3.template == "mla3.cu.jinja"
    assert MlaSpec.parse(v3.name) == v3 and MlaSpec.parse(MlaSpec(impl="v2").name).impl == "v2"
    src = render(v3)
    assert "cp.async.bulk.tensor.3d" in src and "mbarrier.try_wait.parity" in src
    for bad in (dict(kv_dtype="fp16"), dict(num_heads=48)):  # (bf16 q: a 16-bit cache must match it)
        with pytest.raises(SpecError):
            MlaSpec(impl="v3", **bad)
    fp8 = render(MlaSpec(impl="v3", kv_dtype="e4m3"))  # FP8: f16 MMAs, groups expanded in place
    assert "CU_TENSOR_MAP_DATA_TYPE_UINT8" in fp8 and ".f32.f16.f16" in fp8 and "KV_FP8 = 1" in fp8


def test_v4_spec():
    v4 = MlaSpec(impl="v4")
    assert v4.name.endswith("_v4") and v4.template == "mla4.cu.jinja" and MlaSpec.parse(v4.name) == v4
    src = render(v4)
    assert "__cluster_dims__(2, 1, 1)" in src and "st.async.shared::cluster" in src
    for bad in (dict(kv_dtype="e4m3"), dict(num_heads=64), dict(num_heads=16)):
        with pytest.raises(SpecError):
            MlaSpec(impl="v4", **bad)


def test_auto_choice():
    assert mla_impl_for(128, "bf16", "9.0a", 64) == "v3"
    assert mla_impl_for(64, "fp16", "9.0a", 8) == "v3"
    assert mla_impl_for(128, "bf16", "9.0a", 4) == "v2"   # TMA boxes need 8+ rows
    assert mla_impl_for(128, "e4m3", "9.0a", 64) == "v3"  # FP8 expanded in smem (NOTES v16)
    assert mla_impl_for(16, "e4m3", "9.0a", 8) == "v3"
    assert mla_impl_for(128, "e4m3", "9.0a", 4) == "v2"   # pages under 8 tokens: no v3
    assert mla_impl_for(16, "e4m3", "9.0a", 1) == "v1"    # measured faster than v2 (NOTES v15)
    assert mla_impl_for(32, "e4m3", "9.0a", 2) == "v2"
    assert mla_impl_for(16, "bf16", "9.0a", 64) == "v3"   # one head group padded to 64 rows
    assert mla_impl_for(32, "fp16", "9.0a", 8) == "v3"
    assert mla_impl_for(16, "bf16", "9.0a", 4) == "v1"
    assert mla_impl_for(128, "bf16", "9.0", 64) == "v1"   # no wgmma without sm_90a
    assert mla_impl_for(128, "bf16", "8.0", 64) == "v1"


def test_impl_switch(monkeypatch):
    monkeypatch.delenv("XQA_JIT_MLA_IMPL", raising=False)
    mla_latent.set_impl(None)
    assert mla_latent.current_impl() == "auto"
    monkeypatch.setenv("XQA_JIT_MLA_IMPL", "v2")
    assert mla_latent.current_impl() == "v2"
    mla_latent.set_impl("v1")
    try:
        assert mla_latent.current_impl() == "v1"
        mla_latent.set_impl("v3")
        assert mla_latent.current_impl() == "v3"
        mla_latent.set_impl("v4")
        assert mla_latent.current_impl() == "v4"
        with pytest.raises(ValueError):
            mla_latent.set_impl("v5")
    finally:
        mla_latent.set_impl(None)
    monkeypatch.setenv("XQA_JIT_MLA_IMPL", "nope")
    with pytest.raises(ValueError):
        mla_latent.current_impl()


@pytest.mark.build
@pytest.mark.parametrize("spec, rows, groups, splits", [
    (MlaSpec(q_dtype="bf16", kv_dtype="bf16", num_heads=128, impl="v2"), 64, 2, 64),
    (MlaSpec(q_dtype="fp16", kv_dtype="e4m3", num_heads=16, impl="v2"), 16, 1, 64),
    (MlaSpec(q_dtype="bf16", kv_dtype="bf16", num_heads=128, impl="v3"), 64, 2, 64),
    (MlaSpec(q_dtype="bf16", kv_dtype="bf16", num_heads=128, impl="v4"), 64, 2, 1),  # the pair
], ids=lambda v: v.name if isinstance(v, MlaSpec) else None)
def test_build_and_info(cache_dir, spec, rows, groups, splits):
    mod = xb.get_module(spec, "9.0a")
    info = mod.info
    assert info["threads"] == 256
    assert info["rows_per_block"] == rows and info["row_chunks"] == groups
    assert info["tile_tokens"] == 64 and info["max_splits"] == splits
    assert 64 * 512 * 4 <= info["smem_bytes"] <= 232448
    assert mod.meta["name"] == spec.name and str(mod.path).startswith(str(cache_dir))
