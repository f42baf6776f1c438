"""GPU correctness of xqa_jit.xqa_mla: the DeepSeek-V2/V3 latent form (q (B, Hq, 576), kv (N, P, 576) or
(N, P, 1, 576), values = first 512 of the row) for 16/32/64/128 heads, bf16/fp16 and an e4m3 cache
with kv_scale; and the seed doc's [K | V] form (N, P, Hkv, 2D), which runs on the decode kernel.

Tolerances (out.float() against the float64 reference on the same inputs):
  fp16 q: torch.testing.assert_close atol=rtol=5e-3, and ||out - ref|| / ||ref|| <= 2e-3
  bf16 q: torch.testing.assert_close atol=rtol=3e-2, and ||out - ref|| / ||ref|| <= 1e-2
  e4m3 cache (reference on the dequantised cache): norm bound 2e-3 (fp16 q) / 5e-3 (bf16 q, whose own
    output rounding is ~1.7e-3 RMS relative); elementwise bounds as for q's dtype.
  lse: atol 1e-3 (fp16) / 5e-3 (bf16) on finite entries; -inf exactly where the reference has it.
Scores use DeepSeek-V3's softmax scale 192^-0.5 * mscale^2 (mscale = 0.1 ln 40 + 1), as a caller would.
"""
from __future__ import annotations

import math

import pytest
import torch

import xqa_jit
import xqa_jit.mla_latent
from helpers import (
    BF16, E4M3, F16, GPU_MARKS, Kernel, MlaKernel, assert_attn_close, assert_lse_close, dequantize,
    edge_lens, kernel_ids, make_latent_kv, make_q,
    TOL, FP8_MAX_REL,
)
from xqa_jit.reference import mla_reference

pytestmark = GPU_MARKS

DEV = "cuda"
DEEPSEEK_SM_SCALE = 192 ** -0.5 * (0.1 * math.log(40.0) + 1.0) ** 2
Q_STD = 0.7  # q.k over 576 dims: std 24 * 0.7 * 0.135 ~ 2.3 units of logit

LATENT = [MlaKernel(BF16, BF16, 16), MlaKernel(BF16, BF16, 32), MlaKernel(BF16, BF16, 64),
          MlaKernel(BF16, BF16, 128), MlaKernel(F16, F16, 16), MlaKernel(F16, F16, 128)]
LATENT_FP8 = [MlaKernel(BF16, E4M3, 16), MlaKernel(BF16, E4M3, 128), MlaKernel(F16, E4M3, 64)]
# The [K | V] form is paged decode over two strided halves: these decode kernels (shared with
# test_decode_gpu.py) with (Hkv, group) = (2, 4) and (1, 8).
SEED = [Kernel(F16, F16, 128, 4), Kernel(BF16, BF16, 64, 8)]
SPECS = set(LATENT + LATENT_FP8 + SEED)


def tol(k) -> dict:
    t = dict(TOL[k.q])
    if k.kv == E4M3:
        t["max_rel"] = FP8_MAX_REL[k.q]
    return t


def check_mla(q, kv, table, lens, *, t, msg, kv_scale=None, **kw):
    out, lse = xqa_jit.xqa_mla(q, kv, table, lens, kv_scale=kv_scale, return_lse=True, **kw)
    ref_kv = dequantize(kv, kv_scale) if kv.dtype == E4M3 else kv
    ref, ref_lse = mla_reference(q, ref_kv, table, lens, return_lse=True, **kw)
    assert out.dtype == q.dtype, msg
    assert_attn_close(out, ref, atol=t["atol"], rtol=t["rtol"], max_rel=t["max_rel"], msg=msg)
    assert_lse_close(lse, ref_lse, atol=t["lse_atol"], msg=msg)
    return out, lse


def latent_case(k: MlaKernel, gen, P, lens, three_d):
    kv, table, seq = make_latent_kv(lens, P, 576, k.kv, DEV, gen=gen, hkv=None if three_d else 1)
    q = make_q(len(lens), k.heads, 576, k.q, gen, std=Q_STD, device=DEV)
    return q, kv, table, seq


@pytest.mark.parametrize("k", LATENT, ids=kernel_ids)
def test_latent(gen, k):
    for P, three_d in [(1, True), (64, False), (256, True), (16, False)]:
        lens = edge_lens(P, gen, longest=3000)
        q, kv, table, seq = latent_case(k, gen, P, lens, three_d)
        out, lse = check_mla(q, kv, table, seq, t=tol(k), sm_scale=DEEPSEEK_SM_SCALE,
                             msg=f"{k.name} P={P} 3d={three_d} lens={lens}")
        assert out.shape == (len(lens), k.heads, 512) and lse.shape == (len(lens), k.heads)
        assert not out[0].any() and torch.isneginf(lse[0]).all()
    # one long request (split over the sequence), and a wide batch
    q, kv, table, seq = latent_case(k, gen, 64, [16000], True)
    check_mla(q, kv, table, seq, t=tol(k), sm_scale=DEEPSEEK_SM_SCALE, msg=f"{k.name} long")
    lens = torch.randint(0, 1200, (32,), generator=gen).tolist()
    q, kv, table, seq = latent_case(k, gen, 64, lens, False)
    check_mla(q, kv, table, seq, t=tol(k), sm_scale=DEEPSEEK_SM_SCALE, v_head_dim=512, msg=f"{k.name} batch 32")


@pytest.mark.parametrize("k", LATENT_FP8, ids=kernel_ids)
def test_latent_fp8(gen, k):
    scales = [0.5, torch.tensor([1.7], device=DEV), None, 1.0]
    for (P, three_d), sc in zip([(1, True), (64, False), (256, True), (16, False)], scales):
        lens = edge_lens(P, gen, longest=3000)
        q, kv, table, seq = latent_case(k, gen, P, lens, three_d)
        check_mla(q, kv, table, seq, t=tol(k), kv_scale=sc, sm_scale=DEEPSEEK_SM_SCALE,
                  msg=f"{k.name} P={P} 3d={three_d} kv_scale={sc}")
    q, kv, table, seq = latent_case(k, gen, 64, [16000, 7], True)
    check_mla(q, kv, table, seq, t=tol(k), kv_scale=0.8, sm_scale=DEEPSEEK_SM_SCALE, msg=f"{k.name} long")


@pytest.mark.parametrize("k", LATENT[3:4], ids=kernel_ids)
def test_latent_out_and_default_scale(gen, k):
    """out= (NaN-poisoned) is fully written; the default sm_scale is 1/sqrt(576)."""
    lens = edge_lens(64, gen) + [9000]
    q, kv, table, seq = latent_case(k, gen, 64, lens, False)
    out = torch.full((len(lens), k.heads, 512), float("nan"), dtype=k.q, device=DEV)
    res = xqa_jit.xqa_mla(q, kv, table, seq, out=out)
    assert res.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    ref = mla_reference(q, kv, table, seq)
    t = tol(k)
    assert_attn_close(out, ref, atol=t["atol"], rtol=t["rtol"], max_rel=t["max_rel"], msg="default sm_scale")
    # a broadcast q (every head the same row: head stride 0) gives the same rows as its copy
    qb = q[:, :1].expand(q.shape)
    assert qb.stride(1) == 0
    outb = xqa_jit.xqa_mla(qb, kv, table, seq)
    refb = mla_reference(qb.contiguous(), kv, table, seq)
    assert_attn_close(outb, refb, atol=t["atol"], rtol=t["rtol"], max_rel=t["max_rel"], msg="broadcast q")


def poison_tails(kv, table, lens, P):
    """A copy of the cache with NaN in every row no request covers (the tail of each request's last
    page, and pages no request uses): a kernel that lets such a row reach P.V (0 x NaN = NaN) or
    the softmax fails."""
    bad = kv.clone()
    used = torch.zeros(kv.shape[0], P, dtype=torch.bool, device=kv.device)
    for b, n in enumerate(lens.tolist()):
        for lp in range((n + P - 1) // P):
            rows = min(P, n - lp * P)
            used[int(table[b, lp]), :rows] = True
    mask = ~used
    if bad.dim() == 4:
        mask = mask.unsqueeze(-1)
    if bad.dtype == E4M3:  # no masked_fill for float8: write e4m3's NaN (0x7f) through its bytes
        bad.view(torch.uint8)[mask] = 0x7F
    else:
        bad[mask] = float("nan")
    return bad


IMPL_CASES = [MlaKernel(BF16, BF16, 128), MlaKernel(F16, F16, 64)]
# (v4 takes 128 heads only: its fp16 case is a 128-head one)
# v3 with 16 and 32 heads: one head group padded to 64 rows (zero q rows, results not stored)
V3_NARROW = [MlaKernel(BF16, BF16, 16), MlaKernel(F16, F16, 32)]
# v1 (mma.sync) is what other GPUs run and what sm_90a runs for pages under 8 tokens: forced here on
# the pages auto now sends to v3
IMPL_PARAMS = [(i, k) for i in ("v2", "v3") for k in IMPL_CASES] + \
    [(i, k) for i in ("v3", "v1") for k in V3_NARROW] + \
    [("v2", MlaKernel(BF16, E4M3, 16))] + \
    [("v3", k) for k in (MlaKernel(BF16, E4M3, 16), MlaKernel(BF16, E4M3, 128), MlaKernel(F16, E4M3, 64))] + \
    [("v4", MlaKernel(BF16, BF16, 128)), ("v4", MlaKernel(F16, F16, 128))]


@pytest.mark.parametrize("impl,k", IMPL_PARAMS, ids=[f"{i}-{kernel_ids(k)}" for i, k in IMPL_PARAMS])
def test_latent_impls(gen, k, impl):
    """Each kernel forced, on page sizes that give v3 several copy boxes per tile (8, 32), one
    (64) or a tile inside a larger page (128), with NaN in every row past the requests' ends; odd
    and even tile counts; one long request split over the SMs. An FP8 cache also gets a float, a
    tensor and no kv_scale."""
    xqa_jit.mla_latent.set_impl(impl)
    scales = [0.5, torch.tensor([1.7], device=DEV), None, 1.25] if k.kv == E4M3 else [None] * 4
    try:
        for (P, three_d), sc in zip([(8, True), (32, False), (64, True), (128, False)], scales):
            lens = edge_lens(P, gen, longest=2000) + [64 * 3, 64 * 4 + 1]
            q, kv, table, seq = latent_case(k, gen, P, lens, three_d)
            bad = poison_tails(kv, table, seq, P)
            out, lse = xqa_jit.xqa_mla(q, bad, table, seq, sm_scale=DEEPSEEK_SM_SCALE, kv_scale=sc,
                                       return_lse=True)
            ref, ref_lse = mla_reference(q, dequantize(kv, sc), table, seq, sm_scale=DEEPSEEK_SM_SCALE,
                                         return_lse=True)
            t = tol(k)
            msg = f"{k.name} impl={impl} P={P} kv_scale={sc} lens={lens}"
            assert_attn_close(out, ref, atol=t["atol"], rtol=t["rtol"], max_rel=t["max_rel"], msg=msg)
            assert_lse_close(lse, ref_lse, atol=t["lse_atol"], msg=msg)
        q, kv, table, seq = latent_case(k, gen, 64, [12345, 100], False)
        out = xqa_jit.xqa_mla(q, poison_tails(kv, table, seq, 64), table, seq, sm_scale=DEEPSEEK_SM_SCALE)
        ref = mla_reference(q, dequantize(kv, None), table, seq, sm_scale=DEEPSEEK_SM_SCALE)
        t = tol(k)
        assert_attn_close(out, ref, atol=t["atol"], rtol=t["rtol"], max_rel=t["max_rel"],
                          msg=f"{k.name} impl={impl} long")
    finally:
        xqa_jit.mla_latent.set_impl(None)


@pytest.mark.parametrize("k", IMPL_CASES + V3_NARROW[:1] + [MlaKernel(BF16, E4M3, 128)], ids=kernel_ids)
def test_latent_persistent(gen, k):
    """v3's persistent launch (one chunk per request, more (request, head group) units than SMs: each
    block runs several units, loading the next unit's q and first tiles under the current one's last
    tiles): empty requests between non-empty ones, one-tile units followed by longer ones, odd and
    even tile counts, pages smaller than, equal to and larger than a tile, NaN past every request's
    end, a NaN-poisoned out."""
    xqa_jit.mla_latent.set_impl("v3")
    try:
        sms = torch.cuda.get_device_properties(DEV).multi_processor_count
        per_req = max(1, k.heads // 64)  # (request, head group) units per request
        batch = (2 * sms + 37) // per_req + 1  # > 2 units per SM
        pool = [0, 1, 63, 64, 65, 127, 128, 129, 192, 257, 700]
        for P in (64, 8, 128):
            pick = torch.randint(0, len(pool) + 1, (batch,), generator=gen).tolist()
            lens = [pool[i] if i < len(pool) else int(torch.randint(1, 1500, (1,), generator=gen))
                    for i in pick]
            lens[:4] = [0, 0, 1, 64]  # leading empty units; the block's first unit a one-token one
            q, kv, table, seq = latent_case(k, gen, P, lens, False)
            out = torch.full((batch, k.heads, 512), float("nan"), dtype=k.q, device=DEV)
            res, lse = xqa_jit.xqa_mla(q, poison_tails(kv, table, seq, P), table, seq, out=out,
                                       sm_scale=DEEPSEEK_SM_SCALE, return_lse=True)
            splits = {v[0] for key, v in xqa_jit.mla_latent._PLANS.items() if key[2] == batch * per_req}
            assert splits == {1}, f"expected a one-chunk (persistent) launch, plan splits {splits}"
            ref, ref_lse = mla_reference(q, dequantize(kv, None), table, seq, sm_scale=DEEPSEEK_SM_SCALE,
                                         return_lse=True)
            t = tol(k)
            msg = f"{k.name} persistent P={P} batch={batch}"
            assert res.data_ptr() == out.data_ptr()
            assert_attn_close(out, ref, atol=t["atol"], rtol=t["rtol"], max_rel=t["max_rel"], msg=msg)
            assert_lse_close(lse, ref_lse, atol=t["lse_atol"], msg=msg)
            assert not out[0].any() and torch.isneginf(lse[0]).all(), msg
    finally:
        xqa_jit.mla_latent.set_impl(None)


@pytest.mark.parametrize("k", SEED, ids=kernel_ids)
def test_seed_form(gen, k):
    hkv = 128 // k.d  # (2, 4) for D=128, (1, 8) for D=64
    for P in (16, 1, 64):
        lens = edge_lens(P, gen)
        kv, table, seq = make_latent_kv(lens, P, 2 * k.d, k.kv, DEV, gen=gen, hkv=hkv)
        q = make_q(len(lens), hkv * k.group, k.d, k.q, gen, device=DEV)
        out, lse = check_mla(q, kv, table, seq, t=tol(k), msg=f"{k.name} seed form P={P}")
        assert out.shape == q.shape
        check_mla(q, kv, table, seq, t=tol(k), sm_scale=0.2, head_dim=k.d, page_size=P, num_kv_heads=hkv,
                  msg=f"{k.name} seed form P={P} explicit dims")
