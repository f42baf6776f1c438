"""GPU correctness of xqa_jit.xqa, core path: dtypes, head dims, GQA ratios, paging, layouts, strided
views, lengths (0, 1, page edges, long split-KV), sm_scale, out=, return_lse.

Tolerances (out.float() against the float64 reference, which sees the same 16-bit inputs):
  fp16 q: torch.testing.assert_close atol=rtol=5e-3, and ||out - ref|| / ||ref|| <= 2e-3
  bf16 q: torch.testing.assert_close atol=rtol=3e-2, and ||out - ref|| / ||ref|| <= 1e-2
  lse:    atol 1e-3 (fp16) / 5e-3 (bf16) on finite entries; -inf exactly where the reference has it.
Why: out is rounded to q's dtype (fp16 keeps 11 significant bits, bf16 8: 2^-9 ~ 2e-3 relative per
element), and P is rounded to 16 bits for the tensor-core P.V product; fp32 accumulation keeps long sums
(20k tokens) well inside these. The norm bounds catch systematic errors that an elementwise check hides.

Only the (q dtype, head_dim, group) triple changes the generated code here; page size, layout, lengths,
strides and sm_scale are run-time arguments and vary freely inside each test.
"""
from __future__ import annotations

import pytest
import torch

import xqa_jit
from helpers import (
    BF16, F16, GPU_MARKS, Kernel, check_xqa, edge_lens, kernel_ids, make_paged_kv, make_q,
    TOL,
)
from xqa_jit.reference import xqa_reference

pytestmark = GPU_MARKS

DEV = "cuda"

# KV heads per GQA ratio: MHA with 8 heads ... MQA-like 64 query heads on one KV head.
HKV = {1: 8, 4: 4, 8: 2, 16: 2, 64: 1}

# Every kernel this file compiles (q dtype, head_dim, group).
CORE = [
    Kernel(F16, F16, 128, 1), Kernel(F16, F16, 128, 4), Kernel(F16, F16, 128, 8),
    Kernel(F16, F16, 128, 16), Kernel(F16, F16, 128, 64),
    Kernel(BF16, BF16, 128, 4), Kernel(BF16, BF16, 128, 8), Kernel(BF16, BF16, 128, 64),
    Kernel(F16, F16, 64, 4), Kernel(F16, F16, 256, 8),
    Kernel(BF16, BF16, 64, 8), Kernel(BF16, BF16, 256, 1),
]
# Run-time features reuse two of them.
COMMON = [Kernel(F16, F16, 128, 4), Kernel(BF16, BF16, 128, 8)]
SPECS = set(CORE) | set(COMMON)

PAGING = [("NHD", 1), ("HND", 16), ("NHD", 64), ("HND", 256), ("NHD", 16), ("HND", 1)]


@pytest.mark.parametrize("k", CORE, ids=kernel_ids)
def test_core(gen, k):
    """Every (dtype, D, group) kernel over page sizes 1..256, both layouts, edge lengths."""
    hkv = HKV[k.group]
    for layout, P in PAGING:
        lens = edge_lens(P, gen)
        kv = make_paged_kv(len(lens), hkv, k.d, P, lens, k.kv, layout, DEV, gen=gen)
        q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, device=DEV)
        out, lse = check_xqa(q, kv, layout=layout, msg=f"{k.name} {layout} P={P} lens={lens}", **TOL[k.q])
        assert torch.equal(out[0], torch.zeros_like(out[0])), "seq_len 0 must give zeros"
        assert torch.isneginf(lse[0]).all(), "seq_len 0 must give lse = -inf"


@pytest.mark.parametrize("k", COMMON, ids=kernel_ids)
def test_long_split_kv(gen, k):
    """Batch 1 x 20000 tokens cannot fill the GPU without splitting the sequence; also a mixed batch."""
    hkv = HKV[k.group]
    for layout, P, lens in [("NHD", 16, [20000]), ("HND", 64, [20000]), ("NHD", 256, [20000, 0, 3, 9001]),
                            ("HND", 1, [4097])]:
        kv = make_paged_kv(len(lens), hkv, k.d, P, lens, k.kv, layout, DEV, gen=gen)
        q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, device=DEV)
        check_xqa(q, kv, layout=layout, msg=f"{k.name} {layout} P={P} lens={lens}", **TOL[k.q])


@pytest.mark.parametrize("k", COMMON, ids=kernel_ids)
def test_large_batch(gen, k):
    hkv = HKV[k.group]
    lens = torch.randint(0, 700, (96,), generator=gen).tolist()
    kv = make_paged_kv(96, hkv, k.d, 16, lens, k.kv, "NHD", DEV, gen=gen)
    q = make_q(96, hkv * k.group, k.d, k.q, gen, device=DEV)
    check_xqa(q, kv, msg=f"{k.name} batch 96", **TOL[k.q])


@pytest.mark.parametrize("k", COMMON, ids=kernel_ids)
def test_strided_views(gen, k):
    """K and V as the two halves of one (N, 2, ...) pool, and v_cache being k_cache itself."""
    hkv = HKV[k.group]
    for layout, P in [("NHD", 16), ("HND", 64), ("NHD", 1)]:
        lens = edge_lens(P, gen)
        q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, device=DEV)
        kv = make_paged_kv(len(lens), hkv, k.d, P, lens, k.kv, layout, DEV, gen=gen, shared_pool=True)
        assert not kv.k_cache.is_contiguous()
        check_xqa(q, kv, layout=layout, msg=f"{k.name} shared pool {layout} P={P}", **TOL[k.q])
        kv = make_paged_kv(len(lens), hkv, k.d, P, lens, k.kv, layout, DEV, gen=gen, same_kv=True)
        check_xqa(q, kv, layout=layout, msg=f"{k.name} v is k {layout} P={P}", **TOL[k.q])


@pytest.mark.parametrize("k", COMMON, ids=kernel_ids)
def test_sm_scale_and_explicit_dims(gen, k):
    hkv = HKV[k.group]
    lens = edge_lens(16, gen)
    kv = make_paged_kv(len(lens), hkv, k.d, 16, lens, k.kv, "HND", DEV, gen=gen)
    q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, std=1.0, device=DEV)
    for sm in (0.05, 0.3):
        check_xqa(q, kv, layout="HND", sm_scale=sm, msg=f"{k.name} sm_scale={sm}", **TOL[k.q])
    out = xqa_jit.xqa(q, *kv, k.d, 16, hkv, kv_layout="HND")
    ref = xqa_reference(q, *kv, kv_layout="HND")
    torch.testing.assert_close(out.float(), ref, atol=TOL[k.q]["atol"], rtol=TOL[k.q]["rtol"])


@pytest.mark.parametrize("k", COMMON, ids=kernel_ids)
def test_out_and_return_types(gen, k):
    """out= is written in full (poisoned with NaN first) and returned; return_lse toggles a tuple."""
    hkv = HKV[k.group]
    lens = edge_lens(64, gen) + [20000]
    kv = make_paged_kv(len(lens), hkv, k.d, 64, lens, k.kv, "NHD", DEV, gen=gen)
    q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, device=DEV)
    ref, ref_lse = xqa_reference(q, *kv, return_lse=True)
    tol = TOL[k.q]

    out = torch.full_like(q, float("nan"))
    res = xqa_jit.xqa(q, *kv, out=out)
    assert isinstance(res, torch.Tensor) and res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} elements of out= left unwritten"
    torch.testing.assert_close(out.float(), ref, atol=tol["atol"], rtol=tol["rtol"])

    out = torch.full_like(q, float("nan"))
    res, lse = xqa_jit.xqa(q, *kv, out=out, return_lse=True)
    assert res.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    assert lse.shape == (len(lens), hkv * k.group) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=tol["atol"], rtol=tol["rtol"])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse.to(DEV)))

    plain = xqa_jit.xqa(q, *kv)
    assert isinstance(plain, torch.Tensor) and plain.dtype == q.dtype and plain.shape == q.shape
    # out= into a strided view of a bigger buffer (every row still written)
    big = torch.full((len(lens), hkv * k.group, 2 * k.d), float("nan"), dtype=q.dtype, device=DEV)
    view = big[..., : k.d]
    xqa_jit.xqa(q, *kv, out=view)
    assert not torch.isnan(view).any() and torch.isnan(big[..., k.d:]).all()
    torch.testing.assert_close(view.float(), ref, atol=tol["atol"], rtol=tol["rtol"])
