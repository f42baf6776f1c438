"""Compile (nvcc -c, no link) every decode spec the GPU suite uses; exit 1 on the first error."""
import sys, subprocess, concurrent.futures as cf, importlib, time
sys.path[:0] = [".", "tests"]
import torch
from xqa_jit.spec import DecodeSpec
from xqa_jit.render import render
SH = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
specs = set()
for m in ("test_decode_gpu", "test_variants_gpu", "test_specdec_gpu"):
    for k in importlib.import_module(m).SPECS:
        specs.add(DecodeSpec(q_dtype=SH[k.q], kv_dtype=SH[k.kv], head_dim=k.d, group=k.group, q_len=k.lq,
                             window=k.window, sinks=k.sinks, rope=k.rope, tree=k.tree))
print(len(specs), "specs")
def comp(s):
    f = f"/tmp/cc/all_{s.name}.cu"; open(f, "w").write(render(s))
    r = subprocess.run(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-warn-spills", "-c", f, "-o", f + ".o",
                        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"], capture_output=True, text=True)
    return s.name, r.returncode, (r.stderr)[-1500:]
t = time.time(); bad = 0
with cf.ThreadPoolExecutor(2) as ex:
    for name, rc, err in ex.map(comp, sorted(specs, key=lambda s: s.name)):
        if rc: bad += 1; print("ERROR", name, err)
        elif "spill" in err: print("spills", name, [l for l in err.splitlines() if "spill" in l][:1])
print(f"done {len(specs)} in {time.time()-t:.0f}s, {bad} errors"); sys.exit(1 if bad else 0)
