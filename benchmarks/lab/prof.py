import sys, torch, xqa_jit
sys.path.insert(0, "benchmarks/lab")
from mk import make  # noqa
cfgs = [("bf16", 64, 4096, None), ("fp8", 64, 4096, torch.float8_e4m3fn), ("small", 16, 1024, None)]
for name, B, L, kvd in cfgs:
    q, k, v, pt, sl = make(B, 32, 8, 128, 16, [L] * B, torch.bfloat16, kvd, extra_pages=0)
    for _ in range(2): xqa_jit.xqa(q, k, v, pt, sl)
torch.cuda.synchronize()
