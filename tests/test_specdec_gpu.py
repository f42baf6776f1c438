"""GPU correctness of xqa_jit.xqa with several query tokens per request (speculative decoding):
q (B, Lq, Hq, D), causal drafts by default or a random tree via spec_mask, alone and with a window,
sinks, FP8 and RoPE (tree drafts rotated at their depth). lse is (B, Lq, Hq).

Tolerances (out.float() against the float64 reference on the same inputs):
  fp16 q: torch.testing.assert_close atol=rtol=5e-3, and ||out - ref|| / ||ref|| <= 2e-3
  bf16 q: torch.testing.assert_close atol=rtol=3e-2, and ||out - ref|| / ||ref|| <= 1e-2
  FP8 cache (reference on the dequantised cache): norm bound 2e-3 (fp16 q) / 5e-3 (bf16 q).
  lse: atol 1e-3 (fp16) / 5e-3 (bf16) on finite entries; -inf exactly where the reference has it.

Lq and the tree flag change the generated code (so does passing any spec_mask: never pass one to a
causal kernel here); lengths, trees, window sizes, page size and layout are run-time.
"""
from __future__ import annotations

import pytest
import torch

import xqa_jit
from helpers import (
    BF16, E4M3, E5M2, F16, GPU_MARKS, Kernel, causal_mask, check_xqa, kernel_ids, make_paged_kv, make_q,
    make_sink_keys, make_sinks_per_head, make_tree_mask, rand_uniform,
    TOL, FP8_MAX_REL,
)
from xqa_jit.reference import xqa_reference

pytestmark = GPU_MARKS

DEV = "cuda"
HKV = {1: 8, 2: 4, 4: 4, 8: 2, 16: 2}


def tol(k: Kernel) -> dict:
    t = dict(TOL[k.q])
    if k.kv in (E4M3, E5M2):
        t["max_rel"] = FP8_MAX_REL[k.q]
    return t


CAUSAL = [Kernel(F16, F16, 128, 8, lq=2), Kernel(BF16, BF16, 64, 4, lq=4), Kernel(F16, F16, 256, 1, lq=7),
          Kernel(F16, F16, 128, 16, lq=16)]
TREE = [Kernel(F16, F16, 128, 4, lq=4, tree=True), Kernel(BF16, BF16, 128, 8, lq=7, tree=True),
        Kernel(F16, F16, 64, 2, lq=16, tree=True)]
TREE_WINDOW = [Kernel(F16, F16, 128, 4, lq=4, tree=True, window=True)]
SINKS = [Kernel(BF16, BF16, 128, 8, lq=4, tree=True, sinks="per_head"), Kernel(F16, F16, 128, 4, lq=2, sinks="keys")]
FP8 = [Kernel(F16, E4M3, 128, 4, lq=4, tree=True), Kernel(BF16, E5M2, 128, 8, lq=2)]
ROPE = [Kernel(F16, F16, 128, 4, lq=4, tree=True, rope=True), Kernel(BF16, BF16, 128, 8, lq=2, rope=True)]
# 4-D q with Lq = 1 runs the ordinary decode kernel (shared with test_decode_gpu.py).
LQ1 = [Kernel(F16, F16, 128, 4)]
SPECS = set(CAUSAL + TREE + TREE_WINDOW + SINKS + FP8 + ROPE + LQ1)

PAGING = [("NHD", 16), ("HND", 64), ("NHD", 1), ("HND", 256)]


def spec_lens(P: int, lq: int, gen) -> list:
    """Lengths >= Lq (they include the drafts) around page edges, one long-ish, and an empty request."""
    rnd = int(torch.randint(300, 2500, (1,), generator=gen))
    return [lq, lq + 1, max(P, lq) + 1, 2 * P + 3 + lq, rnd, 0]


def inputs(k: Kernel, gen, layout, P, lens):
    hkv = HKV[k.group]
    kv = make_paged_kv(len(lens), hkv, k.d, P, lens, k.kv, layout, DEV, gen=gen)
    q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, lq=k.lq, device=DEV)
    return q, kv, hkv


def mask_for(k: Kernel, batch: int, gen, forest: bool = False):
    return make_tree_mask(batch, k.lq, gen, forest=forest, device=DEV) if k.tree else None


def run(k: Kernel, gen, layout, P, lens, msg, forest=False, **kw):
    q, kv, hkv = inputs(k, gen, layout, P, lens)
    out, lse = check_xqa(q, kv, layout=layout, spec_mask=mask_for(k, len(lens), gen, forest),
                         dequant=k.kv in (E4M3, E5M2), msg=f"{k.name} {layout} P={P} {msg}", **kw, **tol(k))
    assert lse.shape == (len(lens), k.lq, hkv * k.group)
    return out, lse


@pytest.mark.parametrize("k", CAUSAL, ids=kernel_ids)
def test_causal(gen, k):
    for layout, P in PAGING:
        out, lse = run(k, gen, layout, P, spec_lens(P, k.lq, gen), "causal")
        assert not out[-1].any() and torch.isneginf(lse[-1]).all()
    run(k, gen, "NHD", 64, [20000], "long")


@pytest.mark.parametrize("k", TREE, ids=kernel_ids)
def test_tree(gen, k):
    for (layout, P), forest in zip(PAGING, [False, True, False, True]):
        run(k, gen, layout, P, spec_lens(P, k.lq, gen), f"tree forest={forest}", forest=forest)
    run(k, gen, "HND", 16, [20000, k.lq], "long tree")
    # a chain (the causal mask passed explicitly) must equal the reference's causal default
    q, kv, _ = inputs(k, gen, "NHD", 16, spec_lens(16, k.lq, gen))
    out = xqa_jit.xqa(q, *kv, spec_mask=causal_mask(q.shape[0], k.lq, DEV))
    ref = xqa_reference(q, *kv)
    torch.testing.assert_close(out.float(), ref, atol=tol(k)["atol"], rtol=tol(k)["rtol"])


@pytest.mark.parametrize("k", TREE_WINDOW, ids=kernel_ids)
def test_tree_window(gen, k):
    for (layout, P), W in zip(PAGING, [1, 3, 50, 1000]):
        run(k, gen, layout, P, spec_lens(P, k.lq, gen), f"W={W}", sliding_window_size=W)
    run(k, gen, "NHD", 16, [20000], "long W=200", sliding_window_size=200)


@pytest.mark.parametrize("k", SINKS, ids=kernel_ids)
def test_sinks(gen, k):
    hkv = HKV[k.group]
    for layout, P in PAGING[:3]:
        if k.sinks == "per_head":
            sinks = make_sinks_per_head(hkv * k.group, gen, device=DEV)
        else:
            sinks = make_sink_keys(3, hkv, k.d, k.q, gen, device=DEV)
        out, lse = run(k, gen, layout, P, spec_lens(P, k.lq, gen), "sinks", sinks=sinks)
        assert not out[-1].any() and torch.isneginf(lse[-1]).all()


@pytest.mark.parametrize("k", FP8, ids=kernel_ids)
def test_fp8(gen, k):
    hkv = HKV[k.group]
    scales = [dict(k_scale=0.8, v_scale=1.7),
              dict(k_scale=torch.tensor([1.25], device=DEV), v_scale=torch.tensor([0.6], device=DEV)),
              dict(k_scale=rand_uniform((hkv,), gen, 0.4, 1.6, DEV), v_scale=rand_uniform((hkv,), gen, 0.4, 2.0, DEV)),
              dict(kv_scale=0.65)]
    for (layout, P), sc in zip(PAGING, scales):
        run(k, gen, layout, P, spec_lens(P, k.lq, gen), f"scales={sorted(sc)}", **sc)


@pytest.mark.parametrize("k", ROPE, ids=kernel_ids)
def test_rope(gen, k):
    """With a tree, each draft is rotated at len - Lq + depth (as query and as key)."""
    for (layout, P), (theta, scale) in zip(PAGING, [(1e4, 1.0), (5e5, 1.0), (1e4, 2.0), (1e6, 8.0)]):
        run(k, gen, layout, P, spec_lens(P, k.lq, gen), f"rope theta={theta} scale={scale}",
            pos_encoding_mode="ROPE_LLAMA", rope_theta=theta, rope_scale=scale)


@pytest.mark.parametrize("k", LQ1, ids=kernel_ids)
def test_lq1_4d(gen, k):
    """q (B, 1, Hq, D) gives out of the same shape and lse (B, 1, Hq), equal to the 3-D call."""
    q, kv, hkv = inputs(k, gen, "NHD", 16, spec_lens(16, 1, gen))
    out, lse = run(k, gen, "NHD", 16, spec_lens(16, 1, gen), "4-D Lq=1")
    assert out.shape == (6, 1, hkv * k.group, k.d)
    o4, l4 = xqa_jit.xqa(q, *kv, return_lse=True)
    o3, l3 = xqa_jit.xqa(q[:, 0], *kv, return_lse=True)
    torch.testing.assert_close(o4[:, 0], o3, atol=0, rtol=0)
    torch.testing.assert_close(l4[:, 0], l3, atol=0, rtol=0)
