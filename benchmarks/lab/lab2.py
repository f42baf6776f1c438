"""Layout and split-policy experiments with the production kernel (graph-timed)."""
import sys, torch
sys.path[:0] = ["benchmarks/lab", "benchmarks"]
import xqa_jit, xqa_jit.api as api
from mk import make
from lab import gtime, call
from bench import zipf_lengths

def run(name, B, L, layout="NHD", lens=None, reps=3):
    lens = lens or [L] * B
    sets = [make(B, 32, 8, 128, 16, lens, torch.bfloat16, None, layout=layout, extra_pages=0) for _ in range(reps)]
    def c(q, k, v, pt, sl): xqa_jit.xqa(q, k, v, pt, sl, kv_layout=layout)
    t = gtime(c, sets)
    byts = sum(lens) * 8 * 128 * 4
    print(f"{name:34s} {t:8.1f} us  {byts/(t*1e-6)/1e12:.2f} TB/s", flush=True)
    return t

run("llama3-8b NHD", 64, 4096)
run("llama3-8b HND", 64, 4096, "HND")
z = zipf_lengths(64, 4096, 32768, 0)
for mc in (4096, 2048, 8192):
    api.MAX_CHUNK = mc; api._CALLS.clear(); api._PLANS.clear()
    run(f"varlen-zipf MAX_CHUNK={mc}", 64, 0, lens=z, reps=2)
api.MAX_CHUNK = 4096
for mn in (256, 128):
    api.MIN_CHUNK = mn; api._CALLS.clear(); api._PLANS.clear()
    run(f"small-b16 MIN_CHUNK={mn}", 16, 1024)
    run(f"b1-4k MIN_CHUNK={mn}", 1, 4096)
    run(f"long-128k MIN_CHUNK={mn}", 1, 131072, reps=2)
