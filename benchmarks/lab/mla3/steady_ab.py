"""Steady-state A/B of v3 variants (edited renders of templates/mla3.cu.jinja) on one MLA configuration.

    AB_VARIANTS='{"base": {}, "name": {"text": "replacement", ...}}' \
    AB_CONFIG=deepseek-mla [AB_CONFIGS=benchmarks/configs.json] [AB_ROUNDS=3] python benchmarks/lab/mla3/steady_ab.py

Each variant is checked against the reference (pages 8-256, empty and split requests), then timed per
round: 1 s idle, 2 s of back-to-back graph replays (4 calls each) -> burst (median of the first 10),
sustained (median of the second half), SM clock, board power, share of samples at the power cap, and
energy per call; the bf16 8192^3 matmul likewise, which sets the compute ceiling (NOTES v13, v14, v17).
NOTES v17 ran it on the render with lsu_prefetch.patch applied (variants: PF_STEPS 0-3, PF_BOTH)."""
import sys, os, time, subprocess, statistics, math
from pathlib import Path
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "benchmarks/lab")
import torch, xqa_jit, bench
from xqa_jit import build, mla_latent
from xqa_jit.render import render
from xqa_jit.spec import MlaSpec
from xqa_jit.reference import mla_reference
from mk import make_mla
import json
VAR = json.loads(os.environ.get("AB_VARIANTS", '{"base": {}}'))
cfg = [c for c in bench.load_configs(os.environ.get("AB_CONFIGS", "benchmarks/configs.json"))
       if c.name == os.environ.get("AB_CONFIG", "deepseek-mla")][0]
KT = cfg.kv_dtype
HQ = cfg.hq
spec = MlaSpec(q_dtype="bf16", kv_dtype=KT, num_heads=HQ, impl="v3")
src = render(spec)
procs, mods = {}, {}
for vn, reps in VAR.items():
    v = src
    for a, b in reps.items():
        assert a in v, (vn, a); v = v.replace(a, b)
    d = Path(f"/tmp/steady_ab/{vn}"); d.mkdir(parents=True, exist_ok=True); (d / "k.cu").write_text(v)
    procs[vn] = (d, subprocess.Popen(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler",
                 "-fPIC", "-o", str(d / "kernel.so"), str(d / "k.cu"), "-lcudart"], stderr=subprocess.PIPE))
for vn, (d, pr) in procs.items():
    assert pr.wait() == 0, pr.stderr.read()[-2000:]
    mods[vn] = build.Module(spec, "9.0a", d, {"lib": "kernel.so"})
print("built", list(mods), flush=True)
def use(name):
    mla_latent._SPECS.clear(); mla_latent._PLANS.clear()
    mla_latent._SPECS[("bf16", KT, HQ, False, 0, "auto", True)] = mods[name]
SC = 0.1
ok = True
for vn in mods:
    use(vn)
    for (lens, P) in (([200, 0, 1, 129, 4096, 700], 64), ([300, 77, 1000], 8), ([1000, 5], 256), ([16000], 64), ([3000] * 40, 32)):
        q, kv, t, s = make_mla(len(lens), HQ, lens, P, torch.bfloat16, seed=len(lens) + P)
        if KT != "bf16": kv = (kv.float() * 0.5).to(torch.float8_e4m3fn)
        o, lse = xqa_jit.xqa_mla(q, kv, t, s, sm_scale=SC, return_lse=True)
        ref, rl = mla_reference(q, kv.float() if KT != "bf16" else kv, t, s, sm_scale=SC, return_lse=True)
        err = float((o.float() - ref).norm() / ref.norm())
        fin = torch.isfinite(rl)
        lerr = float((lse[fin] - rl[fin]).abs().max())
        good = err < 1.2e-2 and lerr < 1e-2 and not torch.isnan(o).any()
        ok &= good
        if not good or P == 64 and len(lens) == 6: print(f"check {vn} P={P} lens={lens[:6]}: rel {err:.2e} lse {lerr:.2e} {'OK' if good else 'FAIL'}", flush=True)
print("ALL CHECKS OK" if ok else "SOME CHECKS FAILED", flush=True)
mon = bench.GpuMonitor(0)
time.sleep(1.0)
res = {}
def run(tag, fn, secs=2.0):
    g = torch.cuda.CUDAGraph()
    fn(); torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(4): fn()
    g.replay(); torch.cuda.synchronize()
    time.sleep(1.0)
    t0 = time.time(); ev = []
    while time.time() - t0 < secs:
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); ev.append((a, b))
        if len(ev) % 20 == 0: torch.cuda.synchronize()
    torch.cuda.synchronize()
    ts = [a.elapsed_time(b) * 1e3 / 4 for a, b in ev]
    t1 = time.time()
    st = mon.stats((t0 + t1) / 2, t1)
    sus = statistics.median(ts[len(ts) // 2:]); bu = statistics.median(ts[:10])
    res.setdefault(tag.split()[0], []).append((bu, sus))
    print(f"{tag:18s} burst {bu:6.1f} us  sustained {sus:6.1f} us  SM {st.get('clock_mhz', 0):.0f} MHz  "
          f"{st.get('power_w', 0):.0f} W  capped {100 * st.get('power_capped', 0):.0f}%  -> {st.get('power_w', 0) * sus / 1e3:.0f} mJ/call", flush=True)
print("config", cfg.name, flush=True)
data, kw = bench.build_inputs(cfg, cfg.lengths(), 0, "cuda")
q, kv, t, s = data["q"], data["kv"], data["page_table"], data["seq_lens"]
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for rnd in range(int(os.environ.get("AB_ROUNDS", "3"))):
    for name in mods:
        use(name)
        run(f"{name} r{rnd}", lambda: xqa_jit.xqa_mla(q, kv, t, s, out=data["out"], **kw))
    run(f"matmul r{rnd}", lambda: a @ b)
flop = 2 * cfg.batch * HQ * cfg.kv_len * 1088
mm = statistics.median(x[1] for x in res["matmul"])
ceil = flop / (2 * 8192 ** 3 / mm)
print(f"matmul sustained {mm:.0f} us = {2 * 8192 ** 3 / mm / 1e6:.0f} TFLOP/s -> compute ceiling {ceil:.1f} us")
for k, v in res.items():
    if k == "matmul": continue
    print(f"{k:10s} burst {statistics.median(x[0] for x in v):6.1f}  sustained {statistics.median(x[1] for x in v):6.1f}  "
          f"ceil/sustained {ceil / statistics.median(x[1] for x in v):.3f}")
mon.close()
sys.exit(0 if ok else 1)
