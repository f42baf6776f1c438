import sys, torch
sys.path[:0] = ["benchmarks/lab", "benchmarks"]
import xqa_jit, xqa_jit.api as api
from mk import make
from lab import gtime
from bench import zipf_lengths
def run(name, B, L, Hkv=8, lens=None, reps=3):
    lens = lens or [L] * B
    sets = [make(B, Hkv * 4, Hkv, 128, 16, lens, torch.bfloat16, None, extra_pages=0) for _ in range(reps)]
    t = gtime(lambda q, k, v, pt, sl: xqa_jit.xqa(q, k, v, pt, sl), sets)
    print(f"{name:34s} {t:8.1f} us  {sum(lens)*Hkv*128*4/(t*1e-6)/1e12:.2f} TB/s", flush=True)
z = zipf_lengths(64, 4096, 32768, 0)
for mc in (4096, 2048, 4096, 2048):
    api.MAX_CHUNK = mc; api._CALLS.clear(); api._PLANS.clear()
    print("MAX_CHUNK", mc)
    run("  gqa4-8k", 64, 8192, Hkv=4)
    run("  long-128k", 1, 131072, reps=2)
    run("  varlen-zipf", 64, 0, lens=z, reps=2)
    run("  seed-like b32 4112cap", 32, 4000)
