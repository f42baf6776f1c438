"""CPU tests of the latent MLA kernel (templates/mla.cu.jinja): every variant renders, two really
compile through the cache (nvcc, no GPU needed) and report the geometry xqa_jit.mla_latent relies
on; the split planner keeps its invariants."""
from __future__ import annotations

import pytest

import xqa_jit.build as xb
from xqa_jit import mla_latent
from xqa_jit.render import render
from xqa_jit.spec import MlaSpec

ALL = [MlaSpec(q_dtype=q, kv_dtype=kv, num_heads=h)
       for q, kv in (("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "e4m3"), ("bf16", "e4m3"))
       for h in (16, 32, 64, 128)]

SMEM_LIMIT = 232448  # 227 KiB, the most one block may have on sm_90


def test_all_variants_render():
    for spec in ALL + [MlaSpec(debug=True)]:
        src = render(spec)
        assert f"xqa_jit generated source: {spec.name}" in src
        assert "xqa_launch" in src and "xqa_info" in src and "xqa_occupancy" in src
        assert "{{" not in src and "{%" not in src


def test_params_layout():
    # struct Params: 11 pointers + 14 int64 + 2 doubles, all 8 bytes wide, no padding.
    assert mla_latent._PARAMS.size == 27 * 8
    src = render(MlaSpec())
    body = src[src.index("struct Params {"):src.index("};", src.index("struct Params {"))]
    assert body.count("*") == 11
    assert "double sm_scale, kv_scale;" in body


@pytest.mark.build
@pytest.mark.parametrize("spec, threads, heads_per_block, head_groups", [
    (MlaSpec(q_dtype="bf16", kv_dtype="bf16", num_heads=128), 256, 64, 2),
    (MlaSpec(q_dtype="fp16", kv_dtype="e4m3", num_heads=16), 128, 16, 1),
], ids=lambda v: v.name if isinstance(v, MlaSpec) else None)
def test_build_and_info(cache_dir, spec, threads, heads_per_block, head_groups):
    mod = xb.get_module(spec, "9.0a")
    info = mod.info
    assert info["threads"] == threads
    assert info["rows_per_block"] == heads_per_block
    assert info["row_chunks"] == head_groups
    assert info["tile_tokens"] == 32
    assert info["max_splits"] == 64
    assert 0 < info["smem_bytes"] <= SMEM_LIMIT
    # the result tile (heads x 512 fp32) and the merge must fit the block's shared memory
    assert info["smem_bytes"] >= heads_per_block * 512 * 4
    meta = mod.meta
    assert meta["name"] == spec.name and meta["arch"] == "9.0a"
    assert (mod.path / "kernel.so").is_file() and str(mod.path).startswith(str(cache_dir))


class _FakeMod:
    def __init__(self, tile=32, max_splits=64):
        self.info = {"tile_tokens": tile, "max_splits": max_splits}


@pytest.mark.parametrize("units, span", [(1, 1), (2, 4096), (2, 16000), (2, 64), (16, 3000),
                                         (64, 4096), (200, 8192), (1, 2**20), (32, 8192), (64, 32768),
                                         (4, 32768), (100, 4096)])
def test_split_plan(monkeypatch, units, span):
    monkeypatch.setattr(mla_latent, "_sm_count", lambda dev: 132)
    monkeypatch.setattr(mla_latent, "_occupancy", lambda mod, dev: 1)
    mla_latent._PLANS.clear()
    splits, chunk = mla_latent._split_plan(_FakeMod(), 0, units, span)
    assert 1 <= splits <= 64
    assert chunk % 32 == 0
    assert splits * chunk >= span  # every token of every request is covered
    assert (splits - 1) * chunk < span  # no split that is always empty
    if units >= 0.8 * 132:
        assert splits == 1
    if splits > 1:
        assert chunk >= mla_latent.MIN_CHUNK
    if splits > 1 and span <= 2 * mla_latent.MAX_CHUNK:
        # no fewer splits would give the busiest SM fewer tiles (waves x tiles per block): e.g.
        # 32 units of 8192 tokens take 4 splits (one wave of 64 tiles), not 5 (two waves of 52)
        def busiest(s):
            return -(-units * s // 132) * -(-span // (32 * s))
        assert all(busiest(s) >= busiest(splits) for s in range(1, splits)), (splits, chunk)
    if (units, span) == (32, 8192):
        assert splits == 4
    if span > 2 * mla_latent.MAX_CHUNK and units < 0.8 * 132:
        assert chunk <= mla_latent.MAX_CHUNK or splits == 64
