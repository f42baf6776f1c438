"""v3 (TMA, two warpgroups, two tiles per step) latent MLA kernel on the device: smoke -> timing against v2.

    timeout 120 python benchmarks/lab/mla3/lab.py smoke [v4]  # tiny cases, each printed before launch
    timeout 300 python benchmarks/lab/mla3/lab.py time    # deepseek-mla (B128 Hq128 L4096 P64), v2 vs v3
    timeout 300 python benchmarks/lab/mla3/lab.py variants  # v3 built from edited renders, + an L2-hot run
        (LAB_SRC=DIR adds every DIR/*.cu as a whole-source variant, e.g. an earlier schedule's render;
        LAB_ONLY=a,b,... keeps only those variants; LAB_IMPL=v4 edits and traces the pair kernel v4
        instead of v3, with its own "noxch" variant: no partial exchange, wrong results)
    timeout 100 python benchmarks/lab/mla3/lab.py trace [SRC.cu]  # clock64 stamps of one block's steps,
        per-block entry/exit times (SM clock, waves, prologue); SRC.cu: a rendered source to trace instead
    python benchmarks/lab/mla3/lab.py prof                # three launches for ncu
(`timeout`: a barrier-protocol bug hangs the kernel rather than failing.) The copy engine alone, without
the kernels (layouts, buffer counts, box shapes, a held buffer, L2 prefetch): tma_bw.cu beside this file
(its first lines say how to build and run it; NOTES v11, v12). Correctness proper is
tests/test_mla_gpu.py (test_latent_impls forces each kernel, NaN-poisoned cache tails).
"""
import math, os, sys
import torch
import xqa_jit
from xqa_jit import mla_latent
from xqa_jit.reference import mla_reference
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mk import gtime as _gtime, make_mla
def gtime(fn, sets, reps=15, calls=4): return _gtime(fn, sets, reps, calls)

DEV = "cuda"
SCALE = 192 ** -0.5 * (0.1 * math.log(40.0) + 1.0) ** 2
lines = []
def log(s):
    print(s, flush=True); lines.append(s)

def make(B, hq, lens, P, dt, seed=0):
    return make_mla(B, hq, lens, P, dt, dt, seed, extra_pages=3)

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


mode = sys.argv[1] if len(sys.argv) > 1 else "smoke"
impls = sys.argv[2].split(",") if len(sys.argv) > 2 else ["v2", "v3"]
ok = True
if mode == "smoke":  # lab.py smoke [impl]: v3 unless named (v4 takes 128 heads only)
    smoke_impl = sys.argv[2] if len(sys.argv) > 2 else "v3"
    mla_latent.set_impl(smoke_impl)
    if smoke_impl == "v4":
        _check = check
        check = lambda hq, *a: _check(128, *a)
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
elif mode == "variants":
    import subprocess
    from pathlib import Path
    from xqa_jit import build
    from xqa_jit.render import render
    from xqa_jit.spec import MlaSpec
    LIMPL = os.environ.get("LAB_IMPL", "v3")  # the kernel the variants edit (v3 or v4)
    spec = MlaSpec(q_dtype="bf16", kv_dtype="bf16", num_heads=128, impl=LIMPL)
    NOSKIP = {"SKIP_UNIT_RESCALE = true": "SKIP_UNIT_RESCALE = false"}
    NOEVICT = {"L2_EVICT_FIRST = true": "L2_EVICT_FIRST = false"}
    VARIANTS = {"base": {}, "noevict": NOEVICT, "noskip": NOSKIP,
                # no tensor-core work at all (wrong results): what the copies and barriers alone take
                "nomma": {"wgmma_qk(s, desc_add": "if (0) wgmma_qk(s, desc_add",
                          "wgmma_pv_rs(o, pb[kk]": "if (0) wgmma_pv_rs(o, pb[kk]",
                          "wgmma_pv_ss(o, desc_add": "if (0) wgmma_pv_ss(o, desc_add"}}
    if LIMPL == "v4":
        VARIANTS["nomma"].pop("wgmma_pv_ss(o, desc_add")
        VARIANTS["noxch"] = {"EXCHANGE = true": "EXCHANGE = false"}
    # LAB_EXTRA='{"name": {"text": "replacement", ...}, ...}': more edited-render variants
    VARIANTS.update(__import__("json").loads(os.environ.get("LAB_EXTRA", "{}")))
    root = Path("/tmp/lab3"); root.mkdir(exist_ok=True)
    # whole-source variants: every *.cu under $LAB_SRC (e.g. an earlier schedule, rendered elsewhere)
    srcs = {f.stem: f.read_text() for f in sorted(Path(os.environ["LAB_SRC"]).glob("*.cu"))} \
        if os.environ.get("LAB_SRC") else {}
    VARIANTS.update({k: {} for k in srcs})
    if os.environ.get("LAB_ONLY"):  # a comma-separated subset of the variants above
        VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["LAB_ONLY"].split(",")}
    jobs = {}
    for vn, reps in VARIANTS.items():
        src = srcs.get(vn) or render(spec)
        for a, b in reps.items():
            assert a in src, (vn, a[:50]); src = src.replace(a, b)
        d = root / vn; d.mkdir(exist_ok=True); (d / "k.cu").write_text(src)
        jobs[vn] = subprocess.Popen(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared",
                                     "-Xcompiler", "-fPIC", "-o", str(d / "kernel.so"), str(d / "k.cu"), "-lcudart"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for vn, pr in jobs.items():
        o = pr.communicate()[0].decode()
        if pr.returncode: log(f"BUILD FAIL {vn}: {o[-1500:]}")
    sets = [make(128, 128, [4096] * 128, 64, torch.bfloat16, seed=s) for s in range(2)]
    q, kv, table, seq = sets[0]
    hot = [(q, kv, (table % 64).contiguous(), seq)]  # every request on the same 64 pages: L2-resident
    flops = 128 * 128 * 4096 * (576 + 512) * 2
    mla_latent.set_impl(LIMPL)
    for vn in VARIANTS:
        d = root / vn
        if not (d / "kernel.so").exists(): continue
        mod = build.Module(spec, "9.0a", d, {"lib": "kernel.so"})
        mla_latent._SPECS.clear(); mla_latent._PLANS.clear()
        mla_latent._SPECS[("bf16", "bf16", 128, False, 0, LIMPL, True)] = mod
        fn = lambda q, kv, t, s: xqa_jit.xqa_mla(q, kv, t, s, sm_scale=SCALE)
        ok &= check(128, [200, 0, 1, 129, 4096], 64, torch.bfloat16, vn)
        t = gtime(fn, sets)
        th = gtime(fn, hot)
        log(f"{vn:10s} {t:7.1f} us {flops / t / 1e6:5.0f} TFLOP/s | L2-hot {th:7.1f} us {flops / th / 1e6:5.0f} TFLOP/s")
    mla_latent.set_impl(None)
elif mode == "trace":
    # clock64 stamps of the schedule's steps (TRACE(n) in the template) for request 5's head group 0
    import ctypes, subprocess
    from pathlib import Path
    from xqa_jit import build
    from xqa_jit.render import render
    from xqa_jit.spec import MlaSpec
    LIMPL = os.environ.get("LAB_IMPL", "v3")
    spec = MlaSpec(q_dtype="bf16", kv_dtype="bf16", num_heads=128, impl=LIMPL)
    d = Path("/tmp/lab3/trace"); d.mkdir(parents=True, exist_ok=True)
    src = open(sys.argv[2]).read() if len(sys.argv) > 2 else render(spec)  # optional: a rendered source
    (d / "k.cu").write_text("#define XQA_MLA_TRACE 5\n" + src)
    r = subprocess.run(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler",
                        "-fPIC", "-o", str(d / "kernel.so"), str(d / "k.cu"), "-lcudart"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    mod = build.Module(spec, "9.0a", d, {"lib": "kernel.so"})
    mla_latent.set_impl(LIMPL)
    mla_latent._SPECS.clear(); mla_latent._PLANS.clear()
    mla_latent._SPECS[("bf16", "bf16", 128, False, 0, LIMPL, True)] = mod
    q, kv, tb, sq = make(128, 128, [4096] * 128, 64, torch.bfloat16)
    for _ in range(3):
        xqa_jit.xqa_mla(q, kv, tb, sq, sm_scale=SCALE)
    torch.cuda.synchronize()
    buf = (ctypes.c_ulonglong * (2 * 64 * 12))()
    assert mod.lib.xqa_trace(buf) == 0
    import numpy as np
    a = np.array(buf, dtype=np.int64).reshape(2, 64, 12)
    # (a stamp right after a bar.sync can read the clock before the barrier: ptxas may hoist the read, seen
    # in session 7 as a "synced" stamp before the other warpgroup's arrive; stamps after waits are sound)
    names0 = ["top(S_A done)", "softmaxA+P_A+SCALE0", "PV_A_L done", "SCALE1 synced", "PV_B_L done",
              "S_A' landed+issued", "S_A' done", "softmaxA math done", "P_A stored+fenced"]
    names1 = ["top(S_B done)", "SCALE0 synced", "softmaxB+P_B+SCALE1", "PV_A_R done", "PV_B_R done",
              "S_B' landed+issued", "S_B' done"]
    if len(sys.argv) > 2 and "seesaw" in sys.argv[2]:  # the seesaw schedule's events (session 2)
        names0 = ["top(S_A done)", "softmaxA+SCALE0", "PV_A_L done", "SCALE1 synced", "P0 stored", "P1 synced",
                  "S_A' 0-3 issued", "PV_B_L done", "S_A' 4-8 issued", "S_A' done"]
        names1 = ["top(S_B done)", "SCALE0 synced", "softmaxB+SCALE1", "PV_B_R issued", "P0 synced", "PV_B_R done",
                  "PV_A_R done", "S_B' issued", "S_B' done"]
    if LIMPL == "v4":  # one stamp row per tile
        names0 = names1 = ["top", "peer partial landed", "S(t+1) issued", "P packed", "S(t+1) done",
                           "S(t+1) sent", "PV done", "partial added+arrived", "rescaled", "tile t+1 landed",
                           "pfree passed"]
    for i in (4, 10, 20):
        t0 = a[0, i, 0]
        log(f"iteration {i}: period {a[0, i + 1, 0] - t0} clk")
        ev = sorted([(a[0, i, e] - t0, "WG0 " + n) for e, n in enumerate(names0) if a[0, i, e]] +
                    [(a[1, i, e] - t0, "    WG1 " + n) for e, n in enumerate(names1) if a[1, i, e]])
        for dt, n in ev:
            log(f"   {dt:7d}  {n}")
    try:  # per-block entry/exit stamps (sources older than session 3 lack them)
        cb = (ctypes.c_ulonglong * (512 * 6))()
        assert mod.lib.xqa_trace_cta(cb) == 0
        c = np.array(cb, dtype=np.float64).reshape(512, 6)
        c = c[c[:, 3] > 0]  # blocks that ran (a persistent grid has one per SM)
        ghz = (c[:, 4] - c[:, 2]) / (c[:, 3] - c[:, 1])
        t0 = c[:, 1].min()
        st, en = (c[:, 1] - t0) / 1e3, (c[:, 3] - t0) / 1e3
        pro = (c[:, 5] - c[:, 2]) / ghz / 1e3
        w1 = st < 2.0
        w2 = (f"wave 2 starts {st[~w1].min():.1f}..{st[~w1].max():.1f} us, lasts "
              f"{np.median(en[~w1] - st[~w1]):.1f} us" if (~w1).any() else "no second wave (persistent grid)")
        log(f"SM clock {np.median(ghz):.3f} GHz (min {ghz.min():.3f}); kernel span {en.max():.1f} us; "
            f"wave 1: {int(w1.sum())} blocks, {np.median(en[w1] - st[w1]):.1f} us each (max {np.max(en[w1] - st[w1]):.1f}); "
            f"{w2}; entry -> step 0: {np.median(pro):.2f} us")
        gaps = []
        for sm in np.unique(c[:, 0]):
            idx = np.where(c[:, 0] == sm)[0]
            idx = idx[np.argsort(st[idx])]
            gaps += [st[j] - en[k] for k, j in zip(idx[:-1], idx[1:])]
        if gaps:
            log(f"same-SM gap between blocks: median {np.median(gaps):.2f} us, max {np.max(gaps):.2f} us")
    except (AttributeError, AssertionError) as e:
        log(f"(no per-block stamps: {type(e).__name__})")
    n = int((a[0, :, 0] > 0).sum())  # stamped steps (one per two tiles)
    periods = np.diff(a[0, 1:n, 0])
    log(f"median period {int(np.median(periods))} clk over steps 1..{n - 1} (min {periods.min()}, max {periods.max()})")
elif mode == "prof":
    q, kv, t, s = make(128, 128, [4096] * 128, 64, torch.bfloat16)
    mla_latent.set_impl(impls[0] if len(sys.argv) > 2 else "v3")
    for _ in range(3):
        xqa_jit.xqa_mla(q, kv, t, s, sm_scale=SCALE)
    torch.cuda.synchronize()
log("ALL OK" if ok else "SOME FAILED")
open(os.path.join(os.environ.get("OUT", "/tmp"), f"mla3_{mode}.txt"), "w").write("\n".join(lines))
