"""v2 (wgmma) latent MLA kernel on the device: smoke -> correctness matrix -> v1/v2 timing.

    timeout 300 python benchmarks/lab/mla2/lab.py smoke     # one tiny case per dtype; prints before each launch
    timeout 500 python benchmarks/lab/mla2/lab.py check     # Hq 16/32/64/128 x bf16/fp16/e4m3 x pages 1/16/64/256, splits
    timeout 500 python benchmarks/lab/mla2/lab.py time      # deepseek-mla (B128 Hq128 L4096 P64) and -tp8 (Hq16), v1 vs v2
(`timeout`: a protocol bug would hang the kernel rather than fail.)
"""
import math, os, statistics, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests"))
import xqa_jit
from xqa_jit import mla_latent
from xqa_jit.reference import mla_reference
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mk import gtime as _gtime, make_mla
def gtime(fn, sets, reps=10, calls=6): return _gtime(fn, sets, reps, calls)

DEV = "cuda"
SCALE = 192 ** -0.5 * (0.1 * math.log(40.0) + 1.0) ** 2
out_lines = []
def log(s):
    print(s, flush=True); out_lines.append(s)

def make(B, hq, lens, P, qdt, kvdt, seed=0, q_std=0.7):
    return make_mla(B, hq, lens, P, qdt, kvdt, seed, q_std)

def check(hq, lens, P, qdt, kvdt, kv_scale=None, seed=0, tag=""):
    q, kv, table, seq = make(len(lens), hq, lens, P, qdt, kvdt, seed)
    log(f"  launch {tag} hq={hq} P={P} q={qdt} kv={kvdt} lens={lens[:6]}{'...' if len(lens) > 6 else ''}")
    out, lse = xqa_jit.xqa_mla(q, kv, table, seq, sm_scale=SCALE, kv_scale=kv_scale, return_lse=True)
    torch.cuda.synchronize()
    ref_kv = kv.float() * (kv_scale if isinstance(kv_scale, float) else 1.0) if kvdt == torch.float8_e4m3fn else kv
    if isinstance(kv_scale, torch.Tensor):
        ref_kv = kv.float() * kv_scale.float().item()
    ref, ref_lse = mla_reference(q, ref_kv, table, seq, sm_scale=SCALE, return_lse=True)
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    fin = torch.isfinite(ref_lse)
    lerr = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    ok_inf = bool((torch.isneginf(lse) == torch.isneginf(ref_lse)).all())
    zeros = all(not out[b].any() for b, l in enumerate(lens) if l == 0)
    bound = 5e-3 if qdt == torch.float16 else 1.2e-2
    ok = err < bound and lerr < 1e-2 and ok_inf and zeros and not torch.isnan(out).any()
    log(f"    rel_err={err:.2e} lse_err={lerr:.2e} neg_inf_ok={ok_inf} zeros_ok={zeros} -> {'OK' if ok else 'FAIL'}")
    return ok


mode = sys.argv[1] if len(sys.argv) > 1 else "smoke"
mla_latent.set_impl("v2")
ok = True
if mode == "smoke":
    for qdt, kvdt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float8_e4m3fn)):
        ok &= check(64, [64], 64, qdt, kvdt, kv_scale=0.5 if kvdt == torch.float8_e4m3fn else None, tag="smoke")
        ok &= check(128, [200, 0, 1], 16, qdt, kvdt, kv_scale=0.5 if kvdt == torch.float8_e4m3fn else None, tag="smoke")
elif mode == "check":
    for hq in (16, 32, 64, 128):
        for qdt, kvdt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                          (torch.float16, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e4m3fn)):
            sc = 0.8 if kvdt == torch.float8_e4m3fn else None
            for P in (1, 16, 64, 256):
                ok &= check(hq, [0, 1, 63, 64, 65, 700, 2999], P, qdt, kvdt, kv_scale=sc, seed=P)
            ok &= check(hq, [16000], 64, qdt, kvdt, kv_scale=sc, tag="split")           # one long request: split + merge
            ok &= check(hq, [int(x) for x in torch.randint(0, 1200, (32,))], 64, qdt, kvdt, kv_scale=sc, tag="batch32")
    ok &= check(128, [5000, 7, 0], 64, torch.bfloat16, torch.float8_e4m3fn,
                kv_scale=torch.tensor([1.7], device=DEV), tag="tensor-scale")
elif mode == "time":
    for name, hq in (("deepseek-mla", 128), ("deepseek-mla-tp8", 16)):
        for kvdt in (torch.bfloat16, torch.float8_e4m3fn):
            sets = [make(128, hq, [4096] * 128, 64, torch.bfloat16, kvdt, seed=s) for s in range(2)]
            sc = 1.0 if kvdt == torch.float8_e4m3fn else None
            row = []
            for impl in ("v1", "v2"):
                mla_latent.set_impl(impl)
                fn = lambda q, kv, t, s: xqa_jit.xqa_mla(q, kv, t, s, sm_scale=SCALE, kv_scale=sc)
                t = gtime(fn, sets)
                flops = 128 * hq * 4096 * (576 + 512) * 2
                row.append(f"{impl} {t:7.1f} us ({flops / t / 1e6:.0f} TFLOP/s)")
            log(f"{name:17s} kv={str(kvdt).split('.')[-1]:14s} " + "   ".join(row))
log("ALL OK" if ok else "SOME FAILED")
open(os.path.join(os.environ.get("OUT", "/tmp"), f"mla2_{mode}.txt"), "w").write("\n".join(out_lines))
