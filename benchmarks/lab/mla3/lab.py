"""v3 (TMA + seesaw) latent MLA kernel on the device: smoke -> timing against v2.

    timeout 120 python benchmarks/lab/mla3/lab.py smoke   # tiny cases, each printed before launch
    timeout 300 python benchmarks/lab/mla3/lab.py time    # deepseek-mla (B128 Hq128 L4096 P64), v2 vs v3
(`timeout`: a barrier-protocol bug hangs the kernel rather than failing.) Correctness proper is
tests/test_mla_gpu.py (test_latent_impls forces each kernel, NaN-poisoned cache tails).
"""
import math, os, statistics, sys
import torch
import xqa_jit
from xqa_jit import mla_latent
from xqa_jit.reference import mla_reference

DEV = "cuda"
SCALE = 192 ** -0.5 * (0.1 * math.log(40.0) + 1.0) ** 2
lines = []
def log(s):
    print(s, flush=True); lines.append(s)

def make(B, hq, lens, P, dt, seed=0):
    g = torch.Generator().manual_seed(seed)
    npg = [-(-l // P) for l in lens]
    M, N = max(1, max(npg)), sum(npg) + 3
    perm = torch.randperm(N, generator=g)
    table = torch.randint(10**6, 2 * 10**6, (B, M), generator=g, dtype=torch.int32)
    k = 0
    for b, n in enumerate(npg):
        table[b, :n] = perm[k:k + n]; k += n
    kv = torch.randn((N, P, 576), generator=g).to(dt)
    q = (torch.randn((B, hq, 576), generator=g) * 0.7).to(dt)
    return q.to(DEV), kv.to(DEV), table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)

def check(hq, lens, P, dt, tag=""):
    q, kv, t, s = make(len(lens), hq, lens, P, dt)
    log(f"  launch {tag} hq={hq} P={P} {dt} lens={lens[:8]}")
    out, lse = xqa_jit.xqa_mla(q, kv, t, s, sm_scale=SCALE, return_lse=True)
    torch.cuda.synchronize()
    ref, rl = mla_reference(q, kv, t, s, sm_scale=SCALE, return_lse=True)
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    fin = torch.isfinite(rl)
    lerr = (lse[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    ok = err < (5e-3 if dt == torch.float16 else 1.2e-2) and lerr < 1e-2 and not torch.isnan(out).any()
    log(f"    rel_err={err:.2e} lse_err={lerr:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok

def gtime(fn, sets, reps=15, calls=4):
    for st in sets: fn(*st)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for i in range(calls): fn(*sets[i % len(sets)])
    gr.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); gr.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)

mode = sys.argv[1] if len(sys.argv) > 1 else "smoke"
impls = sys.argv[2].split(",") if len(sys.argv) > 2 else ["v2", "v3"]
ok = True
if mode == "smoke":
    mla_latent.set_impl("v3")
    for dt in (torch.bfloat16, torch.float16):
        ok &= check(64, [64], 64, dt, "one tile")
        ok &= check(64, [128], 64, dt, "two tiles")
        ok &= check(128, [200, 0, 1, 129, 4096], 64, dt, "mixed")
        ok &= check(128, [300, 77], 8, dt, "P=8")
        ok &= check(64, [1000, 5], 256, dt, "P=256")
        ok &= check(128, [16000], 64, dt, "split")
elif mode == "time":
    sets = [make(128, 128, [4096] * 128, 64, torch.bfloat16, seed=s) for s in range(2)]
    flops = 128 * 128 * 4096 * (576 + 512) * 2
    for impl in impls:
        mla_latent.set_impl(impl)
        fn = lambda q, kv, t, s: xqa_jit.xqa_mla(q, kv, t, s, sm_scale=SCALE)
        t = gtime(fn, sets)
        log(f"deepseek-mla bf16 {impl}: {t:7.1f} us  {flops / t / 1e6:5.0f} TFLOP/s  "
            f"{128 * 4096 * 1152 / t / 1e3:6.0f} GB/s")
    mla_latent.set_impl(None)
log("ALL OK" if ok else "SOME FAILED")
open(os.path.join(os.environ.get("OUT", "/tmp"), f"mla3_{mode}.txt"), "w").write("\n".join(lines))
