"""RoPE: q hi fragments in registers vs shared memory (graph-timed, production launch path)."""
import sys, subprocess, torch
from pathlib import Path
sys.path[:0] = ["benchmarks/lab"]
import xqa_jit, xqa_jit.api as api, xqa_jit.build as build
from xqa_jit.spec import DecodeSpec
from xqa_jit.render import render
from mk import make
from lab import gtime
root = Path("/tmp/lab4"); root.mkdir(exist_ok=True)
for qt in ("bf16", "fp16"):
    spec = DecodeSpec(q_dtype=qt, kv_dtype=qt, rope=True)
    dt = torch.bfloat16 if qt == "bf16" else torch.float16
    sets = [make(64, 32, 8, 128, 16, [4096] * 64, dt, None, extra_pages=0) for _ in range(3)]
    for vn, rep in (("base", None), ("qreg", ("constexpr bool Q_IN_REGS = D <= 128 && !ROPE;", "constexpr bool Q_IN_REGS = D <= 128;"))):
        src = render(spec)
        if rep: src = src.replace(*rep)
        d = root / f"{qt}_{vn}"; d.mkdir(exist_ok=True); (d / "k.cu").write_text(src)
        subprocess.run(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC",
                        "-o", str(d / "kernel.so"), str(d / "k.cu"), "-lcudart"], check=True)
        mod = build.Module(spec, "9.0a", d, {"lib": "kernel.so"})
        api._SPECS[(qt, qt, 128, 4, 1, False, "none", True, False, False, 0)] = mod
        api._CALLS.clear(); api._PLANS.clear(); api._OCC.clear()
        outs = []
        def c(q, k, v, pt, sl): outs.append(xqa_jit.xqa(q, k, v, pt, sl, pos_encoding_mode="ROPE_LLAMA"))
        t = gtime(c, sets)
        q, k, v, pt, sl = sets[0]
        o = xqa_jit.xqa(q, k, v, pt, sl, pos_encoding_mode="ROPE_LLAMA")
        from xqa_jit.reference import xqa_reference
        r = xqa_reference(q[:2], k, v, pt[:2], sl[:2], pos_encoding_mode="ROPE_LLAMA")
        err = ((o[:2].float() - r).norm() / r.norm()).item()
        print(f"rope {qt} {vn:5s} {t:7.1f} us {64*8*4096*512/(t*1e-6)/1e12:.2f} TB/s  rel err {err:.2e}", flush=True)
