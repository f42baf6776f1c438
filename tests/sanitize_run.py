"""Run a few kernel variants on tiny inputs, for `compute-sanitizer --tool memcheck` (issue 8).

    compute-sanitizer --tool memcheck python tests/sanitize_run.py

Covers: plain decode with split-KV and a page table full of garbage past each request's end,
out-of-pool page ids and seq_lens beyond the page table's capacity (clamped, no debug mode), FP8
with window and sinks, speculative decoding with a tree and RoPE, and both MLA forms. Not a pytest
module: memcheck makes each launch far slower, so it is run on its own.
"""
import torch

import xqa_jit
import xqa_jit.mla_latent

dev = "cuda"
g = torch.Generator(device="cpu").manual_seed(0)


def paged(B, Hkv, D, P, lens, dtype, M=None):
    M = M or max(1, max((l + P - 1) // P for l in lens)) + 2
    N = B * M + 3
    k = torch.randn(N, P, Hkv, D, generator=g).to(dev).to(dtype)
    v = torch.randn(N, P, Hkv, D, generator=g).to(dev).to(dtype)
    pt = torch.randperm(N, generator=g)[: B * M].view(B, M).int()
    for b, l in enumerate(lens):  # garbage (out-of-pool ids) past each request's last page
        pt[b, (l + P - 1) // P:] = torch.randint(-(1 << 30), 1 << 30, (M - (l + P - 1) // P,), generator=g).int()
    return k, v, pt.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)


def q_(B, Hq, D, dtype, Lq=1):
    shape = (B, Hq, D) if Lq == 1 else (B, Lq, Hq, D)
    return torch.randn(shape, generator=g).to(dev).to(dtype)


bf, fp = torch.bfloat16, torch.float16
k, v, pt, sl = paged(3, 2, 128, 16, [3000, 0, 17], bf)
o = xqa_jit.xqa(q_(3, 8, 128, bf), k, v, pt, sl)  # split-KV on the long one
pt_bad = pt.clone()
pt_bad[0, 3] = 1 << 20  # an out-of-pool page id inside the sequence
sl_bad = torch.tensor([3000, 5, 10 ** 6], dtype=torch.int32, device=dev)  # beyond capacity
o2 = xqa_jit.xqa(q_(3, 8, 128, bf), k, v, pt_bad, sl_bad)
k8, v8, pt8, sl8 = paged(2, 8, 64, 16, [700, 130], bf)
o3 = xqa_jit.xqa(q_(2, 64, 64, bf), k8.to(torch.float8_e4m3fn), v8.to(torch.float8_e4m3fn), pt8, sl8,
                 sliding_window_size=128, sinks=torch.randn(64, device=dev), kv_scale=0.5)
kt, vt, ptt, slt = paged(2, 2, 128, 16, [300, 9], fp)
mask = torch.tril(torch.ones(4, 4, dtype=torch.bool)).repeat(2, 1, 1).to(dev)
mask[:, 3, 2] = False  # a tree: draft 3 hangs off draft 1
o4 = xqa_jit.xqa(q_(2, 8, 128, fp, Lq=4), kt, vt, ptt, slt, spec_mask=mask, pos_encoding_mode="ROPE_LLAMA")
kvl = torch.randn(40, 64, 576, generator=g).to(dev).to(bf)
ptl = torch.randperm(40, generator=g)[:36].view(3, 12).int().to(dev)
o5 = xqa_jit.xqa_mla(q_(3, 16, 576, bf), kvl, ptl, torch.tensor([700, 1, 64], dtype=torch.int32, device=dev),
                     sm_scale=192 ** -0.5)
# 128 heads, 16-bit cache, pages of 64 and 8: the TMA kernel (v3), with bad page ids past the end
# and one request split over the sequence
ptl_bad = ptl.clone(); ptl_bad[1, 1:] = 10**6
o7 = xqa_jit.xqa_mla(q_(3, 128, 576, bf), kvl, ptl_bad, torch.tensor([700, 1, 64], dtype=torch.int32, device=dev))
kv8 = torch.randn(300, 8, 576, generator=g).to(dev).to(fp)
pt8l = torch.randperm(300, generator=g)[:296].view(2, 148).int().to(dev)
o8 = xqa_jit.xqa_mla(q_(2, 64, 576, fp), kv8, pt8l, torch.tensor([1180, 77], dtype=torch.int32, device=dev))
# v3's persistent launch: 600 (request, head group) units, several per block, empty ones between
ptp = torch.randint(0, 40, (300, 5), generator=g).int().to(dev); ptp[7, 2:] = 10**6
slp = torch.randint(0, 321, (300,), generator=g).int(); slp[:3] = torch.tensor([0, 1, 64]); slp[7] = 300
o10 = xqa_jit.xqa_mla(q_(300, 128, 576, bf), kvl, ptp, slp.to(dev))
# v3 with 16 / 32 heads (one head group padded to 64 rows): persistent and split launches
xqa_jit.mla_latent.set_impl("v3")
o11 = xqa_jit.xqa_mla(q_(300, 16, 576, bf), kvl, ptp, slp.to(dev))
o12 = xqa_jit.xqa_mla(q_(3, 32, 576, bf), kvl, ptl_bad, torch.tensor([700, 1, 64], dtype=torch.int32, device=dev),
                      return_lse=True)[0]
# v3 on an e4m3 cache (groups expanded to f16 in shared memory; a bf16 q converted): persistent
# (128 heads, pages of 64) and split (pages of 8, a tensor scale) launches
kvl8 = (kvl.float() * 0.5).to(torch.float8_e4m3fn)
o13 = xqa_jit.xqa_mla(q_(300, 128, 576, bf), kvl8, ptp, slp.to(dev), kv_scale=2.0)
o14 = xqa_jit.xqa_mla(q_(2, 16, 576, bf), kv8.to(torch.float8_e4m3fn), pt8l,
                      torch.tensor([1180, 77], dtype=torch.int32, device=dev), kv_scale=torch.tensor([0.5], device=dev))
# the experimental pair kernel (v4: a cluster of two blocks per request, st.async exchange)
xqa_jit.mla_latent.set_impl("v4")
o9 = xqa_jit.xqa_mla(q_(3, 128, 576, bf), kvl, ptl_bad, torch.tensor([700, 1, 64], dtype=torch.int32, device=dev))
xqa_jit.mla_latent.set_impl(None)
kvs = torch.randn(20, 16, 2, 256, generator=g).to(dev).to(fp)
o6 = xqa_jit.xqa_mla(q_(2, 8, 128, fp), kvs, ptt, slt)
torch.cuda.synchronize()
for i, t in enumerate((o, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14)):
    assert torch.isfinite(t.float()).all(), f"output {i} not finite"
print("sanitize_run: all launches completed")
