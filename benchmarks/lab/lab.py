"""Kernel experiments on the device: variants of one spec built from edited renders, timed with CUDA graphs."""
import os, sys, subprocess, time, statistics, torch
from pathlib import Path
sys.path.insert(0, "benchmarks/lab")
import xqa_jit, xqa_jit.api as api, xqa_jit.build as build
from xqa_jit.spec import DecodeSpec
from xqa_jit.render import render
from mk import make
from mk import gtime
dev = "cuda"


def call(q, k, v, pt, sl): xqa_jit.xqa(q, k, v, pt, sl)
out = []
def log(s): print(s, flush=True); out.append(s)

mode = (sys.argv[1] if len(sys.argv) > 1 else "all") if __name__ == "__main__" else "none"
if mode in ("all", "sweep"):
    log("== length sweep (production kernel, B=64 Hkv=8 g4 d128 bf16, graph-timed, inputs in L2 for small L)")
    for L in (16, 64, 256, 1024, 4096):
        sets = [make(64, 32, 8, 128, 16, [L] * 64, torch.bfloat16, None, extra_pages=0) for _ in range(2)]
        t = gtime(call, sets)
        log(f"L={L:5d}  {t:8.2f} us   {64*8*L*512/(t*1e-6)/1e12:.2f} TB/s")

CPA = 'asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\\n" ::"r"(dst), "l"(src),'
VARIANTS = {
    "base": {},
    "pf256": {CPA: CPA.replace("global [%0]", "global.L2::256B [%0]")},
    "pf128": {CPA: CPA.replace("global [%0]", "global.L2::128B [%0]")},
}
if mode in ("all", "variants", "fp8"):
    root = Path("/tmp/lab"); root.mkdir(exist_ok=True)
    specs = {"bf16": DecodeSpec(), "fp8": DecodeSpec(kv_dtype="e4m3")}
    if mode == "fp8": specs.pop("bf16")
    jobs = {}
    for sn, spec in specs.items():
        for vn, reps in VARIANTS.items():
            src = render(spec)
            for a, b in reps.items():
                assert a in src, (vn, a[:40]); src = src.replace(a, b)
            d = root / f"{sn}_{vn}"; d.mkdir(exist_ok=True); (d / "k.cu").write_text(src)
            jobs[(sn, vn)] = subprocess.Popen(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC",
                                               "-o", str(d / "kernel.so"), str(d / "k.cu"), "-lcudart"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for key, pr in jobs.items():
        o = pr.communicate()[0].decode()
        if pr.returncode: log(f"BUILD FAIL {key}: {o[-800:]}")
    cfgs = [("llama3-8b", 64, 4096), ("small-b16", 16, 1024), ("b32-L8192", 32, 8192)]
    for sn, spec in specs.items():
        kvd = torch.float8_e4m3fn if spec.kv_fp8 else None
        inputs = {c: [make(B, 32, 8, 128, 16, [L] * B, torch.bfloat16, kvd, extra_pages=0) for _ in range(3)] for c, B, L in cfgs}
        for vn in VARIANTS:
            d = root / f"{sn}_{vn}"
            if not (d / "kernel.so").exists(): continue
            mod = build.Module(spec, "9.0a", d, {"lib": "kernel.so"})
            skey = ("bf16", spec.kv_dtype, 128, 4, 1, False, "none", False, False, False, 0)
            api._SPECS[skey] = mod; api._CALLS.clear(); api._PLANS.clear(); api._OCC.clear()
            row = []
            for c, B, L in cfgs:
                t = gtime(call, inputs[c])
                byts = B * 8 * L * 128 * 2 * (1 if kvd else 2)
                row.append(f"{c} {t:7.1f}us {byts/(t*1e-6)/1e12:.2f}TB/s")
            log(f"{sn:4s} {vn:7s} occ={mod.occupancy(0)} smem={mod.info['smem_bytes']}  " + "  ".join(row))
Path(os.environ.get("OUT", "/tmp") + "/lab.txt").write_text("\n".join(out))

if mode == "fp8":
    api._SPECS.clear(); api._CALLS.clear(); api._PLANS.clear()
    orig = api._split_plan
    for forced in (None, 1):
        api._split_plan = (lambda mod, dev, units, span: (1, max(64, -(-span // 64) * 64))) if forced else orig
        api._CALLS.clear(); api._PLANS.clear()
        sets = [make(64, 32, 8, 128, 16, [4096] * 64, torch.bfloat16, torch.float8_e4m3fn, extra_pages=0) for _ in range(3)]
        t = gtime(call, sets)
        log(f"fp8 production kernel, splits={'forced 1' if forced else 'planned'}: {t:.1f} us {64*8*4096*256/(t*1e-6)/1e12:.2f} TB/s")
    Path(os.environ.get("OUT", "/tmp") + "/lab.txt").write_text("\n".join(out))
