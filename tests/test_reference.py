"""CPU tests of xqa_jit.reference against a deliberately naive float64 implementation.

The naive version walks the page table token by token and loops over requests, heads, queries and keys
in plain Python floats, so it shares no vectorised indexing, masking or broadcasting with the reference.
Both are float64; they must agree to ~1e-10 (the reference returns float32, so we compare at 1e-5).
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import (
    FP8_DTYPES, causal_mask, make_latent_kv, make_paged_kv, make_q, make_sink_keys,
    make_sinks_per_head, make_tree_mask, randn, rand_uniform,
)
from xqa_jit.reference import gather_kv, gather_kv_batch, mla_reference, tree_depth, xqa_reference
from xqa_jit.rope import inv_freq

ATOL = RTOL = 1e-5  # float64 vs float64, rounded to float32 at the end

CPU = "cpu"


# ----------------------------------------------------------------------------------------------------
# The naive implementation
# ----------------------------------------------------------------------------------------------------

def _dot(a, b):
    return math.fsum(x * y for x, y in zip(a, b))


def _scale_at(scale, h):
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor):
        flat = scale.reshape(-1)
        return float(flat[0 if flat.numel() == 1 else h])
    return float(scale)


def _rotate(x, pos, inv):
    half = len(x) // 2
    out = [0.0] * len(x)
    for d in range(half):
        a = pos * inv[d]
        c, s = math.cos(a), math.sin(a)
        out[d] = x[d] * c - x[d + half] * s
        out[d + half] = x[d + half] * c + x[d] * s
    return out


def _softmax_row(logits, vals, sink_logits, dv):
    """(out list, lse) for one query: logits/vals of visible keys plus value-less sink logits."""
    every = logits + sink_logits
    if not every:
        return [0.0] * dv, -math.inf
    mx = max(every)
    den = math.fsum(math.exp(x - mx) for x in every)
    acc = [0.0] * dv
    for l, v in zip(logits, vals):
        w = math.exp(l - mx) / den
        for d in range(dv):
            acc[d] += w * v[d]
    return acc, mx + math.log(den)


def naive_xqa(q, k_cache, v_cache, page_table, seq_lens, *, kv_layout="NHD", sm_scale=None,
              rope=False, rope_theta=1e4, rope_scale=1.0, window=-1, sinks=None, k_scale=None,
              v_scale=None, spec_mask=None):
    q4 = q.unsqueeze(1) if q.dim() == 3 else q
    B, Lq, Hq, D = q4.shape
    nhd = kv_layout == "NHD"
    P = k_cache.shape[1] if nhd else k_cache.shape[2]
    Hkv = k_cache.shape[2] if nhd else k_cache.shape[1]
    Dv = v_cache.shape[-1]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    inv = [float(x) for x in inv_freq(D, rope_theta, rope_scale)] if rope else None

    def row(cache, page, slot, h):
        r = cache[page, slot, h] if nhd else cache[page, h, slot]
        return r.double().tolist()

    out = torch.zeros(B, Lq, Hq, Dv, dtype=torch.float64)
    lse = torch.full((B, Lq, Hq), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        base = L - Lq
        if spec_mask is None:
            def allowed(i, j):
                return j <= i

            def depth(j):
                return j
        else:
            m = spec_mask[b].tolist()

            def allowed(i, j, m=m):
                return m[i][j]

            def depth(j, m=m):
                return sum(1 for x in m[j] if x) - 1
        keys, vals = {}, {}
        for t in range(L):
            page = int(page_table[b, t // P])
            slot = t % P
            kpos = base + depth(t - base) if t >= base else t
            for h in range(Hkv):
                k = [x * _scale_at(k_scale, h) for x in row(k_cache, page, slot, h)]
                keys[t, h] = _rotate(k, kpos, inv) if rope else k
                vals[t, h] = [x * _scale_at(v_scale, h) for x in row(v_cache, page, slot, h)]
        for h in range(Hq):
            kvh = h // G
            for i in range(Lq):
                qv = q4[b, i, h].double().tolist()
                if rope:
                    qv = _rotate(qv, base + depth(i), inv)
                qpos = base + i
                logits, vlist = [], []
                for t in range(L):
                    if t >= base and not allowed(i, t - base):
                        continue
                    if window > 0 and t < qpos - window + 1:
                        continue
                    logits.append(scale * _dot(qv, keys[t, kvh]))
                    vlist.append(vals[t, kvh])
                sink_logits = []
                if sinks is not None and sinks.dim() == 1:
                    sink_logits = [float(sinks[h])]
                elif sinks is not None:
                    sink_logits = [scale * _dot(qv, sinks[s, kvh].double().tolist()) for s in range(sinks.shape[0])]
                o, l = _softmax_row(logits, vlist, sink_logits, Dv)
                out[b, i, h] = torch.tensor(o, dtype=torch.float64)
                lse[b, i, h] = l
    if q.dim() == 3:
        out, lse = out[:, 0], lse[:, 0]
    return out, lse


def naive_mla(q, kv_cache, page_table, seq_lens, *, v_head_dim, sm_scale=None, kv_scale=None):
    """MLA by its general rule, written out: keys kv[..., :Dk]; values the first v_head_dim elements
    when the row is Dk wide, else the v_head_dim elements after the keys."""
    kv = kv_cache.unsqueeze(2) if kv_cache.dim() == 3 else kv_cache
    B, Hq, Dk = q.shape
    P, Hkv, W = kv.shape[1], kv.shape[2], kv.shape[3]
    G = Hq // Hkv
    v0 = 0 if W == Dk else Dk
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(Dk)
    s = 1.0 if kv_scale is None else float(kv_scale)
    out = torch.zeros(B, Hq, v_head_dim, dtype=torch.float64)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = int(seq_lens[b])
        rows = {}
        for t in range(L):
            for h in range(Hkv):
                rows[t, h] = [x * s for x in kv[int(page_table[b, t // P]), t % P, h].double().tolist()]
        for h in range(Hq):
            qv = q[b, h].double().tolist()
            logits = [scale * _dot(qv, rows[t, h // G][:Dk]) for t in range(L)]
            vals = [rows[t, h // G][v0:v0 + v_head_dim] for t in range(L)]
            o, l = _softmax_row(logits, vals, [], v_head_dim)
            out[b, h] = torch.tensor(o, dtype=torch.float64)
            lse[b, h] = l
    return out, lse


def check(ref_out, ref_lse, naive_out, naive_lse):
    assert ref_out.dtype == torch.float32 and ref_lse.dtype == torch.float32
    assert ref_out.shape == naive_out.shape and ref_lse.shape == naive_lse.shape
    torch.testing.assert_close(ref_out.double(), naive_out, atol=ATOL, rtol=RTOL)
    ninf = torch.isneginf(naive_lse)
    assert torch.equal(torch.isneginf(ref_lse), ninf)
    torch.testing.assert_close(ref_lse.double()[~ninf], naive_lse[~ninf], atol=ATOL, rtol=RTOL)


def run_both(q, kv, *, layout="NHD", **kw):
    """Reference and naive on the same inputs; kw uses the reference's keyword names."""
    out, lse = xqa_reference(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, kv_layout=layout,
                             return_lse=True, **kw)
    nkw = dict(kw)
    nkw["rope"] = nkw.pop("pos_encoding_mode", "NONE") == "ROPE_LLAMA"
    nkw["window"] = nkw.pop("sliding_window_size", -1)
    if "kv_scale" in nkw:
        nkw["k_scale"] = nkw["v_scale"] = nkw.pop("kv_scale")
    n_out, n_lse = naive_xqa(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, kv_layout=layout, **nkw)
    check(out, lse, n_out, n_lse)
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Core: layouts, GQA, page sizes, lengths, garbage page-table entries
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_single_query(gen, layout, group, page_size):
    hkv, d = 2, 16
    lens = [0, 1, page_size, 2 * page_size + 3, 37]
    kv = make_paged_kv(len(lens), hkv, d, page_size, lens, torch.float16, layout, CPU, gen=gen)
    q = make_q(len(lens), hkv * group, d, torch.float16, gen, device=CPU)
    out, lse = run_both(q, kv, layout=layout)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


def test_bf16_sm_scale_and_shapes(gen):
    lens = [29, 5]
    kv = make_paged_kv(2, 2, 32, 8, lens, torch.bfloat16, "NHD", CPU, gen=gen)
    q = make_q(2, 8, 32, torch.bfloat16, gen, device=CPU)
    run_both(q, kv, sm_scale=0.3)
    out = xqa_reference(q, *kv, sm_scale=0.3)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 8, 32)
    # positional head_dim / page_size / num_kv_heads are checked against the tensors
    xqa_reference(q, *kv, 32, 8, 2)
    with pytest.raises(ValueError):
        xqa_reference(q, *kv, 64)


def test_strided_views_and_same_kv(gen):
    lens = [23, 40]
    for layout in ("NHD", "HND"):
        kv = make_paged_kv(2, 2, 16, 8, lens, torch.float16, layout, CPU, gen=gen, shared_pool=True)
        assert not kv.k_cache.is_contiguous()
        q = make_q(2, 4, 16, torch.float16, gen, device=CPU)
        run_both(q, kv, layout=layout)
        kv2 = make_paged_kv(2, 2, 16, 8, lens, torch.float16, layout, CPU, gen=gen, same_kv=True)
        assert kv2.v_cache is kv2.k_cache
        run_both(q, kv2, layout=layout)


def test_garbage_entries_are_never_used(gen):
    """Out-of-range ids past the end must not be indexed; in-range ones must not change the result."""
    P, lens = 4, [9, 4, 0]
    kv = make_paged_kv(3, 1, 16, P, lens, torch.float16, "NHD", CPU, gen=gen, extra_cols=4)
    q = make_q(3, 2, 16, torch.float16, gen, device=CPU)
    table = kv.page_table.clone()
    table[0, 3:] = 2**31 - 1
    table[1, 1:] = -(2**31)
    table[2, :] = 10**6
    out1, lse1 = xqa_reference(q, kv.k_cache, kv.v_cache, table, kv.seq_lens, return_lse=True)
    table[0, 3:] = 0
    table[1, 1:] = 1
    table[2, :] = 0
    out2, lse2 = xqa_reference(q, kv.k_cache, kv.v_cache, table, kv.seq_lens, return_lse=True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


def test_gather_kv(gen):
    lens = [13, 0, 5]
    kv = make_paged_kv(3, 2, 8, 4, lens, torch.float16, "NHD", CPU, gen=gen)
    hnd = kv.k_cache.transpose(1, 2).contiguous()
    for b, L in enumerate(lens):
        rows = gather_kv(kv.k_cache, kv.page_table, L, "NHD", b=b)
        assert rows.shape == (L, 2, 8) and rows.dtype == torch.float64
        for t in range(L):
            assert torch.equal(rows[t], kv.k_cache[int(kv.page_table[b, t // 4]), t % 4].double())
        assert torch.equal(gather_kv(hnd, kv.page_table[b], L, "HND"), rows)
    dense = gather_kv_batch(kv.k_cache, kv.page_table, kv.seq_lens)
    assert dense.shape == (3, 13, 2, 8) and torch.equal(dense[2, 5:], torch.zeros_like(dense[2, 5:]))


def test_matches_sdpa(gen):
    """Cross-check the plain path against torch SDPA on a dense float64 copy (GQA expanded)."""
    lens = [50, 17]
    kv = make_paged_kv(2, 2, 32, 16, lens, torch.float16, "HND", CPU, gen=gen)
    q = make_q(2, 6, 32, torch.float16, gen, lq=3, device=CPU)
    out = xqa_reference(q, *kv, kv_layout="HND")
    for b, L in enumerate(lens):
        k = gather_kv(kv.k_cache, kv.page_table[b], L, "HND").repeat_interleave(3, dim=1).transpose(0, 1)
        v = gather_kv(kv.v_cache, kv.page_table[b], L, "HND").repeat_interleave(3, dim=1).transpose(0, 1)
        qb = q[b].double().transpose(0, 1)  # (Hq, Lq, D)
        mask = torch.arange(L)[None, :] <= (L - 3 + torch.arange(3))[:, None]
        exp = torch.nn.functional.scaled_dot_product_attention(qb, k, v, attn_mask=mask)
        torch.testing.assert_close(out[b].double(), exp.transpose(0, 1), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------
# Multi-token queries: causal default and random trees
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lq", [2, 4, 7])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_multi_query_causal(gen, lq, layout):
    lens = [lq, lq + 1, 21, 0]
    kv = make_paged_kv(4, 2, 16, 8, lens, torch.float16, layout, CPU, gen=gen)
    q = make_q(4, 4, 16, torch.float16, gen, lq=lq, device=CPU)
    out, lse = run_both(q, kv, layout=layout)
    assert out.shape == q.shape and lse.shape == (4, lq, 4)
    # the explicit causal mask is the default
    out2, lse2 = xqa_reference(q, *kv, kv_layout=layout, spec_mask=causal_mask(4, lq, CPU), return_lse=True)
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lq", [1, 3, 6])
@pytest.mark.parametrize("forest", [False, True])
def test_multi_query_tree(gen, lq, forest):
    lens = [lq, 19, 33]
    kv = make_paged_kv(3, 2, 16, 4, lens, torch.bfloat16, "NHD", CPU, gen=gen)
    q = make_q(3, 4, 16, torch.bfloat16, gen, lq=lq, device=CPU)
    mask = make_tree_mask(3, lq, gen, forest=forest, device=CPU)
    run_both(q, kv, spec_mask=mask)


def test_single_query_4d_equals_3d(gen):
    lens = [11, 30]
    kv = make_paged_kv(2, 2, 16, 8, lens, torch.float16, "NHD", CPU, gen=gen)
    q = make_q(2, 4, 16, torch.float16, gen, device=CPU)
    o3, l3 = xqa_reference(q, *kv, return_lse=True, pos_encoding_mode="ROPE_LLAMA", sliding_window_size=5)
    o4, l4 = xqa_reference(q[:, None], *kv, return_lse=True, pos_encoding_mode="ROPE_LLAMA", sliding_window_size=5)
    assert torch.equal(o3, o4[:, 0]) and torch.equal(l3, l4[:, 0])


def test_tree_depth():
    m = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    assert tree_depth(m).tolist() == [0, 1, 1, 2]


# ----------------------------------------------------------------------------------------------------
# Sliding window, sinks, RoPE
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 3, 8, 1000])
@pytest.mark.parametrize("lq", [1, 4])
def test_window(gen, window, lq):
    lens = [lq, 12, 30, 0]
    kv = make_paged_kv(4, 2, 16, 4, lens, torch.float16, "HND", CPU, gen=gen)
    q = make_q(4, 4, 16, torch.float16, gen, lq=lq, device=CPU)
    run_both(q, kv, layout="HND", sliding_window_size=window)
    if lq > 1:
        run_both(q, kv, layout="HND", sliding_window_size=window, spec_mask=make_tree_mask(4, lq, gen, device=CPU))


@pytest.mark.parametrize("sink_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sinks_per_head(gen, sink_dtype):
    lens = [0, 1, 9, 26]
    kv = make_paged_kv(4, 2, 16, 8, lens, torch.float16, "NHD", CPU, gen=gen)
    q = make_q(4, 8, 16, torch.float16, gen, lq=2, device=CPU)
    sinks = make_sinks_per_head(8, gen, dtype=sink_dtype, device=CPU)
    out, lse = run_both(q, kv, sinks=sinks, sliding_window_size=4)
    assert torch.isneginf(lse[0]).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    # the sink lowers the output weight: ratio to the sink-free result is 1 - e^{sink - lse}
    out0, lse0 = xqa_reference(q, *kv, sliding_window_size=4, return_lse=True)
    w = 1 - torch.exp(sinks.double()[None, None, :] - lse[1:].double())
    torch.testing.assert_close(out[1:].double(), out0[1:].double() * w[..., None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_sink_keys(gen, rope):
    lens = [0, 7, 20]
    kv = make_paged_kv(3, 2, 16, 4, lens, torch.bfloat16, "NHD", CPU, gen=gen)
    q = make_q(3, 4, 16, torch.bfloat16, gen, lq=3, device=CPU)
    sinks = make_sink_keys(3, 2, 16, torch.bfloat16, gen, device=CPU)
    mode = "ROPE_LLAMA" if rope else "NONE"
    out, lse = run_both(q, kv, sinks=sinks, pos_encoding_mode=mode, sm_scale=0.2)
    assert torch.isneginf(lse[0]).all()
    run_both(q, kv, sinks=sinks, pos_encoding_mode=mode, sliding_window_size=2,
             spec_mask=make_tree_mask(3, 3, gen, device=CPU))


def test_sink_key_equals_per_head_logit(gen):
    """A sink key whose dot product with q is known is the same as that per-head logit."""
    lens = [15]
    kv = make_paged_kv(1, 1, 16, 4, lens, torch.float16, "NHD", CPU, gen=gen)
    q = torch.zeros(1, 1, 16, dtype=torch.float16)
    q[0, 0, 0] = 2.0
    q[0, 0, 1:] = make_q(1, 1, 15, torch.float16, gen, device=CPU)[0, 0]
    sink_key = torch.zeros(1, 1, 16, dtype=torch.float16)
    sink_key[0, 0, 0] = 1.5
    logit = torch.tensor([0.25 * 2.0 * 1.5])
    a = xqa_reference(q, *kv, sm_scale=0.25, sinks=sink_key, return_lse=True)
    b = xqa_reference(q, *kv, sm_scale=0.25, sinks=logit, return_lse=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("theta,scale", [(1e4, 1.0), (5e5, 4.0)])
@pytest.mark.parametrize("lq,tree", [(1, False), (4, False), (5, True)])
def test_rope(gen, theta, scale, lq, tree):
    lens = [lq, 18, 41]
    kv = make_paged_kv(3, 2, 32, 8, lens, torch.float16, "NHD", CPU, gen=gen)
    q = make_q(3, 4, 32, torch.float16, gen, lq=lq, device=CPU)
    mask = make_tree_mask(3, lq, gen, device=CPU) if tree else None
    run_both(q, kv, pos_encoding_mode="ROPE_LLAMA", rope_theta=theta, rope_scale=scale, spec_mask=mask)


def test_rope_chain_tree_equals_causal(gen):
    """For a chain, depth(j) = j, so a tree mask equal to the causal mask changes nothing."""
    lens = [9, 30]
    kv = make_paged_kv(2, 2, 16, 4, lens, torch.float16, "NHD", CPU, gen=gen)
    q = make_q(2, 4, 16, torch.float16, gen, lq=4, device=CPU)
    a = xqa_reference(q, *kv, pos_encoding_mode="ROPE_LLAMA", return_lse=True)
    b = xqa_reference(q, *kv, pos_encoding_mode="ROPE_LLAMA", spec_mask=causal_mask(2, 4, CPU), return_lse=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_rope_tree_uses_depth_positions(gen):
    """Two sibling drafts are both at depth 1: each sees root + itself at the same positions."""
    lens = [12]
    kv = make_paged_kv(1, 1, 16, 4, lens, torch.float16, "NHD", CPU, gen=gen)
    q = make_q(1, 2, 16, torch.float16, gen, lq=3, device=CPU)
    q[0, 2] = q[0, 1]
    # make draft 2's key/value equal draft 1's: slots 10 and 11
    k, v, table, seq = kv
    p1, p2 = int(table[0, 10 // 4]), int(table[0, 11 // 4])
    k[p2, 11 % 4] = k[p1, 10 % 4]
    v[p2, 11 % 4] = v[p1, 10 % 4]
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    out = xqa_reference(q, k, v, table, seq, pos_encoding_mode="ROPE_LLAMA", spec_mask=mask)
    torch.testing.assert_close(out[0, 1], out[0, 2], atol=1e-6, rtol=1e-6)
    run_both(q, kv, pos_encoding_mode="ROPE_LLAMA", spec_mask=mask)


def test_inv_freq_is_hf_llama():
    d, theta, factor = 64, 1e4, 2.0
    hf = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    torch.testing.assert_close(inv_freq(d, theta, factor), hf / factor, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_kind", ["none", "float", "tensor1", "per_head", "kv_scale"])
def test_fp8(gen, fp8, scale_kind):
    hkv, lens = 2, [0, 13, 27]
    kv = make_paged_kv(3, hkv, 16, 8, lens, FP8_DTYPES[fp8], "HND", CPU, gen=gen)
    q = make_q(3, 4, 16, torch.float16, gen, device=CPU)
    kw = {}
    if scale_kind == "float":
        kw = dict(k_scale=0.75, v_scale=1.5)
    elif scale_kind == "tensor1":
        kw = dict(k_scale=torch.tensor([0.5]), v_scale=torch.tensor([2.0]))
    elif scale_kind == "per_head":
        kw = dict(k_scale=rand_uniform((hkv,), gen, 0.3, 1.5), v_scale=rand_uniform((hkv,), gen, 0.3, 1.5))
    elif scale_kind == "kv_scale":
        kw = dict(kv_scale=0.6)
    out, lse = run_both(q, kv, layout="HND", **kw)
    # equals the reference on the dequantised cache
    ks = kw.get("k_scale", kw.get("kv_scale", 1.0))
    vs = kw.get("v_scale", kw.get("kv_scale", 1.0))
    ks = ks.reshape(1, -1, 1, 1) if isinstance(ks, torch.Tensor) else ks
    vs = vs.reshape(1, -1, 1, 1) if isinstance(vs, torch.Tensor) else vs
    kd = kv.k_cache.double() * ks
    vd = kv.v_cache.double() * vs
    o2, l2 = xqa_reference(q, kd, vd, kv.page_table, kv.seq_lens, kv_layout="HND", return_lse=True)
    torch.testing.assert_close(o2, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(l2, lse, atol=1e-6, rtol=1e-6)


def test_kv_scale_conflict(gen):
    kv = make_paged_kv(1, 1, 16, 4, [5], torch.float8_e4m3fn, "NHD", CPU, gen=gen)
    q = make_q(1, 1, 16, torch.float16, gen, device=CPU)
    with pytest.raises(ValueError):
        xqa_reference(q, *kv, kv_scale=1.0, k_scale=2.0)


def test_everything_together(gen):
    """Window + per-head sinks + FP8 per-head scales + RoPE + random tree + GQA 4, HND."""
    lens = [0, 5, 23, 38]
    kv = make_paged_kv(4, 2, 32, 4, lens, torch.float8_e4m3fn, "HND", CPU, gen=gen)
    q = make_q(4, 8, 32, torch.bfloat16, gen, lq=5, device=CPU)
    run_both(q, kv, layout="HND", sliding_window_size=9, sinks=make_sinks_per_head(8, gen, device=CPU),
             k_scale=rand_uniform((2,), gen, 0.5, 1.5), v_scale=torch.tensor([0.8]),
             pos_encoding_mode="ROPE_LLAMA", spec_mask=make_tree_mask(4, 5, gen, device=CPU))
    run_both(q, kv, layout="HND", sliding_window_size=6,
             sinks=make_sink_keys(2, 2, 32, torch.bfloat16, gen, device=CPU), kv_scale=torch.tensor([0.7, 1.3]),
             pos_encoding_mode="ROPE_LLAMA")


def test_long_sequence_is_chunked(gen, monkeypatch):
    """Batch chunking (bounded memory) gives the same result as one chunk."""
    import xqa_jit.reference as ref
    lens = [300, 0, 77, 512, 1]
    kv = make_paged_kv(5, 2, 16, 16, lens, torch.float16, "NHD", CPU, gen=gen)
    q = make_q(5, 4, 16, torch.float16, gen, lq=2, device=CPU)
    sinks = make_sinks_per_head(4, gen, device=CPU)
    a = xqa_reference(q, *kv, return_lse=True, sinks=sinks)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 1)  # one request per chunk
    b = xqa_reference(q, *kv, return_lse=True, sinks=sinks)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.isneginf(b[1][1]).all()


# ----------------------------------------------------------------------------------------------------
# MLA
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("three_d", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_mla_deepseek(gen, three_d, dtype):
    lens = [0, 1, 19]
    kv, table, seq = make_latent_kv(lens, 8, 576, dtype, CPU, gen=gen, hkv=None if three_d else 1)
    q = make_q(3, 4, 576, torch.bfloat16, gen, std=0.5, device=CPU)
    kw = dict(kv_scale=0.8) if dtype == torch.float8_e4m3fn else {}
    sm = 192 ** -0.5
    out, lse = mla_reference(q, kv, table, seq, sm_scale=sm, return_lse=True, **kw)
    assert out.shape == (3, 4, 512) and lse.shape == (3, 4)
    n_out, n_lse = naive_mla(q, kv, table, seq, v_head_dim=512, sm_scale=sm, kv_scale=kw.get("kv_scale"))
    check(out, lse, n_out, n_lse)


def test_mla_seed_form(gen):
    lens = [0, 9, 22]
    d, hkv = 16, 2
    kv, table, seq = make_latent_kv(lens, 4, 2 * d, torch.float16, CPU, gen=gen, hkv=hkv)
    q = make_q(3, 8, d, torch.float16, gen, device=CPU)
    out, lse = mla_reference(q, kv, table, seq, d, 4, hkv, return_lse=True)
    assert out.shape == (3, 8, d)
    n_out, n_lse = naive_mla(q, kv, table, seq, v_head_dim=d)
    check(out, lse, n_out, n_lse)
    # same as xqa with K = first half, V = second half
    o2, l2 = xqa_reference(q, kv[..., :d], kv[..., d:], table, seq, return_lse=True)
    assert torch.equal(out, o2) and torch.equal(lse, l2)


def test_mla_latent_width_needs_v_head_dim(gen):
    kv, table, seq = make_latent_kv([5], 4, 64, torch.float16, CPU, gen=gen)
    q = make_q(1, 2, 64, torch.float16, gen, device=CPU)
    with pytest.raises(ValueError):
        mla_reference(q, kv, table, seq)
    out, lse = mla_reference(q, kv, table, seq, v_head_dim=48, return_lse=True)
    check(out, lse, *naive_mla(q, kv, table, seq, v_head_dim=48))
