import time, cProfile, pstats, torch, xqa_jit, xqa_jit.api as api
dev = "cuda"
q = torch.randn(1, 32, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(8, 16, 8, 128, device=dev, dtype=torch.bfloat16); v = k.clone()
pt = torch.arange(8, device=dev, dtype=torch.int32).view(1, 8); sl = torch.tensor([64], device=dev, dtype=torch.int32)
for _ in range(20): xqa_jit.xqa(q, k, v, pt, sl)
torch.cuda.synchronize()
def tm(name, f, n=5000):
    t0 = time.perf_counter()
    for _ in range(n): f()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize(); print(f"{name:40s} {dt:7.2f} us")
tm("xqa full", lambda: xqa_jit.xqa(q, k, v, pt, sl))
tm("xqa out= given", lambda: xqa_jit.xqa(q, k, v, pt, sl, out=q))
tm("empty_like", lambda: torch.empty_like(q))
tm("getCurrentRawStream", lambda: torch._C._cuda_getCurrentRawStream(0))
tm("is_compiling", lambda: torch.compiler.is_compiling())
mod = next(iter(api._SPECS.values()))
params = api._PARAMS.pack(*([0] * 46 + [1.0, 1.0, 1.0]))
import ctypes
tm("ctypes launch (bad params -> rc)", lambda: mod.lib.xqa_info((ctypes.c_int64*16)(), 16))
pr = cProfile.Profile(); pr.enable()
for _ in range(3000): xqa_jit.xqa(q, k, v, pt, sl)
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
