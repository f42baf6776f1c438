"""GPU correctness of xqa_jit.xqa features: sliding window, sinks (both forms), RoPE, FP8 KV caches, and
the combinations window+sinks+FP8, RoPE+FP8, window+RoPE, RoPE+sink keys.

Tolerances (out.float() against the float64 reference on the same inputs):
  fp16 q: torch.testing.assert_close atol=rtol=5e-3, and ||out - ref|| / ||ref|| <= 2e-3
  bf16 q: torch.testing.assert_close atol=rtol=3e-2, and ||out - ref|| / ||ref|| <= 1e-2
  FP8 cache: the reference runs on the dequantised cache (stored.float() * scale); the norm bound is
    2e-3 with fp16 q (as the issue requires) and 5e-3 with bf16 q, whose output rounding to bf16 alone
    is ~1.7e-3 (RMS relative); elementwise bounds as for q's dtype.
  lse: atol 1e-3 (fp16) / 5e-3 (bf16) on finite entries; -inf exactly where the reference has it.
RoPE: angles are pos * inv_freq (float32 table) and positions here stay below ~5000, where a float32
angle is within ~3e-4 rad of the float64 one.

Each Kernel below compiles once; window size, sink values, scales (float, (1,), (Hkv,), kv_scale=),
rope_theta / rope_scale, page size, layout and lengths are run-time and vary inside the tests.
"""
from __future__ import annotations

import pytest
import torch

from helpers import (
    BF16, E4M3, E5M2, F16, GPU_MARKS, Kernel, check_xqa, edge_lens, kernel_ids, make_paged_kv,
    make_q, make_sink_keys, make_sinks_per_head, rand_uniform,
    TOL, FP8_MAX_REL,
)

pytestmark = GPU_MARKS

DEV = "cuda"
HKV = {1: 8, 4: 4, 8: 2, 16: 2}


def tol(k: Kernel) -> dict:
    t = dict(TOL[k.q])
    if k.kv in (E4M3, E5M2):
        t["max_rel"] = FP8_MAX_REL[k.q]
    return t


WINDOW = [Kernel(F16, F16, 128, 4, window=True), Kernel(BF16, BF16, 256, 8, window=True)]
SINKS_PER_HEAD = [Kernel(F16, F16, 128, 4, sinks="per_head"), Kernel(BF16, BF16, 128, 8, sinks="per_head")]
SINK_KEYS = [Kernel(F16, F16, 128, 4, sinks="keys"), Kernel(BF16, BF16, 64, 8, sinks="keys")]
ROPE = [Kernel(F16, F16, 128, 4, rope=True), Kernel(BF16, BF16, 128, 8, rope=True),
        Kernel(F16, F16, 64, 1, rope=True), Kernel(BF16, BF16, 256, 4, rope=True)]
FP8 = [Kernel(F16, E4M3, 128, 4), Kernel(BF16, E4M3, 128, 8), Kernel(F16, E5M2, 128, 4),
       Kernel(BF16, E5M2, 128, 8), Kernel(F16, E4M3, 64, 1), Kernel(BF16, E4M3, 256, 16)]
WINDOW_SINKS_FP8 = [Kernel(BF16, E4M3, 128, 8, window=True, sinks="per_head"),
                    Kernel(F16, E5M2, 128, 4, window=True, sinks="keys")]
ROPE_FP8 = [Kernel(F16, E4M3, 128, 4, rope=True)]
WINDOW_ROPE = [Kernel(BF16, BF16, 128, 8, window=True, rope=True)]
ROPE_SINK_KEYS = [Kernel(F16, F16, 128, 4, sinks="keys", rope=True)]
SPECS = set(WINDOW + SINKS_PER_HEAD + SINK_KEYS + ROPE + FP8 + WINDOW_SINKS_FP8 + ROPE_FP8 + WINDOW_ROPE
            + ROPE_SINK_KEYS)


def inputs(k: Kernel, gen, layout, P, lens, **kw):
    hkv = HKV[k.group]
    kv = make_paged_kv(len(lens), hkv, k.d, P, lens, k.kv, layout, DEV, gen=gen, **kw)
    q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, device=DEV)
    return q, kv, hkv


def fp8_scales(kind: str, hkv: int, gen) -> dict:
    """The accepted scale forms; values far enough from 1 that an ignored scale fails loudly."""
    if kind == "float":
        return dict(k_scale=0.7, v_scale=1.8)
    if kind == "tensor1":
        return dict(k_scale=torch.tensor([1.3], device=DEV), v_scale=torch.tensor([0.45], device=DEV))
    if kind == "per_head":
        return dict(k_scale=rand_uniform((hkv,), gen, 0.4, 1.6, DEV), v_scale=rand_uniform((hkv,), gen, 0.4, 2.5, DEV))
    if kind == "kv_float":
        return dict(kv_scale=0.55)
    if kind == "kv_tensor":
        return dict(kv_scale=rand_uniform((hkv,), gen, 0.5, 1.5, DEV))
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------
# Single features
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", WINDOW, ids=kernel_ids)
def test_window(gen, k):
    for layout, P in [("NHD", 16), ("HND", 64), ("NHD", 1), ("HND", 256)]:
        for W in (1, 7, 128, 1000, 100000):
            lens = edge_lens(P, gen)
            q, kv, _ = inputs(k, gen, layout, P, lens)
            check_xqa(q, kv, layout=layout, sliding_window_size=W, msg=f"{k.name} {layout} P={P} W={W} lens={lens}",
                      **tol(k))
    # long sequences: the kernel must start at the window, and split what is left
    for W, lens in [(128, [20000]), (4096, [20000, 5, 0]), (257, [16000, 300])]:
        q, kv, _ = inputs(k, gen, "NHD", 16, lens)
        check_xqa(q, kv, sliding_window_size=W, msg=f"{k.name} W={W} lens={lens}", **tol(k))


@pytest.mark.parametrize("k", SINKS_PER_HEAD, ids=kernel_ids)
def test_sinks_per_head(gen, k):
    hq = HKV[k.group] * k.group
    for (layout, P), sink_dtype in zip([("NHD", 16), ("HND", 64), ("NHD", 1)], [torch.float32, BF16, F16]):
        lens = edge_lens(P, gen)
        q, kv, _ = inputs(k, gen, layout, P, lens)
        sinks = make_sinks_per_head(hq, gen, dtype=sink_dtype, device=DEV)
        out, lse = check_xqa(q, kv, layout=layout, sinks=sinks, msg=f"{k.name} {layout} P={P} sinks {sink_dtype}",
                             **tol(k))
        assert torch.isneginf(lse[0]).all() and not out[0].any(), "seq_len 0 ignores sinks: zeros, -inf"
    q, kv, _ = inputs(k, gen, "HND", 16, [20000, 1])
    check_xqa(q, kv, layout="HND", sinks=make_sinks_per_head(hq, gen, device=DEV), msg=f"{k.name} long", **tol(k))


@pytest.mark.parametrize("k", SINK_KEYS, ids=kernel_ids)
def test_sink_keys(gen, k):
    hkv = HKV[k.group]
    for (layout, P), S in zip([("NHD", 16), ("HND", 64), ("NHD", 256)], [1, 4, 2]):
        lens = edge_lens(P, gen)
        q, kv, _ = inputs(k, gen, layout, P, lens)
        sinks = make_sink_keys(S, hkv, k.d, k.q, gen, device=DEV)
        out, lse = check_xqa(q, kv, layout=layout, sinks=sinks, msg=f"{k.name} {layout} P={P} S={S}", **tol(k))
        assert torch.isneginf(lse[0]).all() and not out[0].any()
    q, kv, _ = inputs(k, gen, "NHD", 64, [20000])
    check_xqa(q, kv, sinks=make_sink_keys(4, hkv, k.d, k.q, gen, device=DEV), msg=f"{k.name} long", **tol(k))


@pytest.mark.parametrize("k", ROPE, ids=kernel_ids)
def test_rope(gen, k):
    for (layout, P), (theta, scale) in zip([("NHD", 16), ("HND", 64), ("NHD", 1), ("HND", 256)],
                                           [(1e4, 1.0), (5e5, 1.0), (1e4, 4.0), (1e6, 8.0)]):
        lens = edge_lens(P, gen, longest=4000)
        q, kv, _ = inputs(k, gen, layout, P, lens)
        check_xqa(q, kv, layout=layout, pos_encoding_mode="ROPE_LLAMA", rope_theta=theta, rope_scale=scale,
                  msg=f"{k.name} {layout} P={P} theta={theta} scale={scale}", **tol(k))
    q, kv, _ = inputs(k, gen, "NHD", 64, [4800])
    check_xqa(q, kv, pos_encoding_mode="ROPE_LLAMA", msg=f"{k.name} split", **tol(k))


@pytest.mark.parametrize("k", FP8, ids=kernel_ids)
def test_fp8(gen, k):
    for (layout, P), kind in zip([("NHD", 16), ("HND", 64), ("NHD", 1), ("HND", 256), ("NHD", 64)],
                                 ["float", "tensor1", "per_head", "kv_float", "kv_tensor"]):
        lens = edge_lens(P, gen)
        q, kv, hkv = inputs(k, gen, layout, P, lens)
        check_xqa(q, kv, layout=layout, dequant=True, msg=f"{k.name} {layout} P={P} scales={kind}",
                  **fp8_scales(kind, hkv, gen), **tol(k))
    # unscaled, a strided pool, and a long (split) sequence
    q, kv, hkv = inputs(k, gen, "HND", 16, [20000, 33], shared_pool=True)
    check_xqa(q, kv, layout="HND", dequant=True, msg=f"{k.name} unscaled shared pool long", **tol(k))
    check_xqa(q, kv, layout="HND", dequant=True, msg=f"{k.name} per-head long", **fp8_scales("per_head", hkv, gen),
              **tol(k))


# ---------------------------------------------------------------------------------------------------
# Combinations
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", WINDOW_SINKS_FP8, ids=kernel_ids)
def test_window_sinks_fp8(gen, k):
    hkv = HKV[k.group]
    hq = hkv * k.group
    for (layout, P), W, kind in zip([("NHD", 16), ("HND", 64), ("NHD", 256)], [1, 64, 700],
                                    ["per_head", "tensor1", "kv_float"]):
        lens = edge_lens(P, gen) + [12000]
        q, kv, _ = inputs(k, gen, layout, P, lens)
        if k.sinks == "per_head":
            sinks = make_sinks_per_head(hq, gen, dtype=BF16, device=DEV)
        else:
            sinks = make_sink_keys(3, hkv, k.d, k.q, gen, device=DEV)
        check_xqa(q, kv, layout=layout, dequant=True, sliding_window_size=W, sinks=sinks,
                  msg=f"{k.name} {layout} P={P} W={W} scales={kind}", **fp8_scales(kind, hkv, gen), **tol(k))


@pytest.mark.parametrize("k", ROPE_FP8, ids=kernel_ids)
def test_rope_fp8(gen, k):
    for (layout, P), kind in zip([("NHD", 16), ("HND", 64), ("NHD", 1)], ["per_head", "float", "kv_tensor"]):
        lens = edge_lens(P, gen, longest=4000)
        q, kv, hkv = inputs(k, gen, layout, P, lens)
        check_xqa(q, kv, layout=layout, dequant=True, pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5,
                  msg=f"{k.name} {layout} P={P} scales={kind}", **fp8_scales(kind, hkv, gen), **tol(k))


@pytest.mark.parametrize("k", WINDOW_ROPE, ids=kernel_ids)
def test_window_rope(gen, k):
    for (layout, P), W in zip([("NHD", 16), ("HND", 64), ("NHD", 256)], [1, 100, 2048]):
        lens = edge_lens(P, gen, longest=4500) + [4900]
        q, kv, _ = inputs(k, gen, layout, P, lens)
        check_xqa(q, kv, layout=layout, sliding_window_size=W, pos_encoding_mode="ROPE_LLAMA",
                  msg=f"{k.name} {layout} P={P} W={W}", **tol(k))


@pytest.mark.parametrize("k", ROPE_SINK_KEYS, ids=kernel_ids)
def test_rope_sink_keys(gen, k):
    """Sink keys meet the rotated q but are not rotated themselves."""
    hkv = HKV[k.group]
    for layout, P in [("NHD", 16), ("HND", 64)]:
        lens = edge_lens(P, gen, longest=3000)
        q, kv, _ = inputs(k, gen, layout, P, lens)
        check_xqa(q, kv, layout=layout, pos_encoding_mode="ROPE_LLAMA",
                  sinks=make_sink_keys(2, hkv, k.d, k.q, gen, device=DEV), msg=f"{k.name} {layout} P={P}", **tol(k))
