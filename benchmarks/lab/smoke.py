"""Ad-hoc GPU smoke check of xqa against a tiny float64 reference (not part of the suite)."""
import math, sys, time, torch, xqa_jit
sys.path.insert(0, "benchmarks/lab")
from xqa_jit.rope import inv_freq
torch.manual_seed(0)
dev = "cuda"

def rot(x, pos, D, theta=1e4, scale=1.0):
    f = inv_freq(D, theta, scale).double().to(x.device)
    ang = pos.double()[..., None] * f
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

def ref(q, k, v, pt, sl, layout="NHD", sm_scale=None, W=-1, sinks=None, ks=1.0, vs=1.0, mask=None, rope=False):
    q4 = q if q.dim() == 4 else q[:, None]
    B, Lq, Hq, D = q4.shape
    P = k.shape[1] if layout == "NHD" else k.shape[2]
    Hkv = k.shape[2] if layout == "NHD" else k.shape[1]
    G = Hq // Hkv
    sm = sm_scale or 1 / math.sqrt(D)
    out = torch.zeros(B, Lq, Hq, D, dtype=torch.float64, device=q.device)
    lse = torch.full((B, Lq, Hq), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(sl[b])
        if L == 0: continue
        t = torch.arange(L, device=q.device)
        pg, sl_ = pt[b, t // P].long(), t % P
        K = (k[pg, sl_] if layout == "NHD" else k[pg, :, sl_]).double()
        V = (v[pg, sl_] if layout == "NHD" else v[pg, :, sl_]).double()
        ksc = ks if not torch.is_tensor(ks) else ks.double().view(1, -1, 1)
        vsc = vs if not torch.is_tensor(vs) else vs.double().view(1, -1, 1)
        K = K * ksc; V = V * vsc
        bits = torch.tril(torch.ones(Lq, Lq, dtype=torch.bool, device=q.device)) if mask is None else mask[b]
        depth = bits.sum(1) - 1
        qpos = L - Lq + (depth if mask is not None else torch.arange(Lq, device=q.device))
        Q = q4[b].double()
        if rope:
            Q = rot(Q, qpos[:, None].expand(Lq, Hq), D)
            kpos = t.clone()
            if mask is not None:
                dr = t >= L - Lq
                kpos[dr] = qpos[(t[dr] - (L - Lq))]
            K = rot(K, kpos[:, None].expand(L, Hkv), D)
        Kq = K.repeat_interleave(G, 1); Vq = V.repeat_interleave(G, 1)
        s = torch.einsum("ihd,thd->iht", Q, Kq) * sm
        vis = torch.ones(Lq, L, dtype=torch.bool, device=q.device)
        j = t - (L - Lq)
        dr = j >= 0
        vis[:, dr] = bits[:, j[dr]]
        if W > 0:
            p = (L - Lq + torch.arange(Lq, device=q.device))[:, None]
            vis &= t[None] >= p - W + 1
        s = s.masked_fill(~vis[:, None, :], -math.inf)
        extra = None
        if sinks is not None:
            if sinks.dim() == 1:
                extra = sinks.double()[None, :, None].expand(Lq, Hq, 1)
            else:
                sk = sinks.double().repeat_interleave(G, 1)
                extra = torch.einsum("ihd,shd->ihs", Q, sk) * sm
        full = s if extra is None else torch.cat([s, extra], -1)
        m = full.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = (full - m).exp()
        den = e.sum(-1, keepdim=True)
        pr = e[..., :L] / torch.where(den > 0, den, torch.ones_like(den))
        out[b] = torch.einsum("iht,thd->ihd", pr, Vq)
        lse[b] = torch.where(den[..., 0] > 0, (den[..., 0]).log() + m[..., 0], torch.full_like(m[..., 0], -math.inf))
    if q.dim() == 3: out, lse = out[:, 0], lse[:, 0]
    return out.float(), lse.float()

from mk import make  # noqa: E402  (the input builder shared with the lab scripts)

fails = 0
def check(name, tol=None, **kw):
    global fails
    a = dict(kw)
    B, Hq, Hkv, D, P, lens = a.pop("B"), a.pop("Hq"), a.pop("Hkv"), a.pop("D"), a.pop("P"), a.pop("lens")
    dtype = a.pop("dtype", torch.bfloat16); kvd = a.pop("kvdtype", None); layout = a.get("kv_layout", "NHD"); Lq = a.pop("Lq", 1)
    q, k, v, pt, sl = make(B, Hq, Hkv, D, P, lens, dtype, kvd, layout, Lq)
    sinks = a.get("sinks")
    if sinks == "ph": a["sinks"] = torch.randn(Hq, device=dev) * 2
    elif sinks == "keys": a["sinks"] = torch.randn(3, Hkv, D, device=dev).to(dtype)
    if a.get("spec_mask") == "tree":
        m = torch.zeros(B, Lq, Lq, dtype=torch.bool, device=dev)
        for b in range(B):
            par = [-1] + [int(torch.randint(0, i, (1,))) for i in range(1, Lq)]
            for i in range(Lq):
                j = i
                while j >= 0: m[b, i, j] = True; j = par[j]
        a["spec_mask"] = m
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=dev)
    try:
        o, lse = xqa_jit.xqa(q, k, v, pt, sl, out=out, return_lse=True, **a)
        torch.cuda.synchronize()
    except Exception as e:
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:3000]}"); fails += 1; return
    kf = k.float() if kvd is not None else k
    vf = v.float() if kvd is not None else v
    r, rl = ref(q, kf, vf, pt, sl, layout, a.get("sm_scale"), a.get("sliding_window_size", -1), a.get("sinks"),
                a.get("k_scale", a.get("kv_scale", 1.0)), a.get("v_scale", a.get("kv_scale", 1.0)),
                a.get("spec_mask"), a.get("pos_encoding_mode") == "ROPE_LLAMA")
    err = ((o.float() - r).norm() / r.norm().clamp_min(1e-12)).item()
    fin = torch.isfinite(rl)
    lerr = (lse[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    inf_ok = bool((torch.isinf(lse) == ~fin).all())
    nan = bool(torch.isnan(o).any())
    tol = tol or (2e-3 if dtype == torch.float16 else 1e-2)
    ok = err < tol and lerr < 1e-2 and inf_ok and not nan
    fails += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name:44s} rel {err:.2e} lse {lerr:.1e} inf_ok {inf_ok} nan {nan}")

C = dict(B=3, Hq=32, Hkv=8, D=128, P=16, lens=[1000, 1, 37])
check("basic bf16", **C)
check("basic fp16", **{**C, "dtype": torch.float16})
check("HND", **{**C, "kv_layout": "HND"})
check("len0 + page1", B=3, Hq=8, Hkv=2, D=64, P=1, lens=[0, 70, 5])
check("page256 d256 g1", B=2, Hq=4, Hkv=4, D=256, P=256, lens=[600, 257])
check("g64 d64", B=2, Hq=64, Hkv=1, D=64, P=64, lens=[300, 1000])
check("long split", B=1, Hq=32, Hkv=8, D=128, P=16, lens=[20000], dtype=torch.float16)
check("window", **{**C, "sliding_window_size": 100})
check("sinks ph", **{**C, "sinks": "ph"})
check("sinks keys", **{**C, "sinks": "keys"})
check("rope", **{**C, "pos_encoding_mode": "ROPE_LLAMA", "dtype": torch.float16})
check("fp8 e4m3 fp16", tol=2e-3, **{**C, "dtype": torch.float16, "kvdtype": torch.float8_e4m3fn, "k_scale": 0.5, "v_scale": 2.0})
check("fp8 e5m2 bf16", tol=3e-3, **{**C, "kvdtype": torch.float8_e5m2, "kv_scale": 0.7})
check("fp8 perhead tensor", tol=3e-3, **{**C, "kvdtype": torch.float8_e4m3fn, "k_scale": torch.rand(8, device=dev) + 0.5})
check("win+sinks+fp8 long", tol=3e-3, B=2, Hq=64, Hkv=8, D=64, P=16, lens=[9000, 50], kvdtype=torch.float8_e4m3fn, sliding_window_size=128, sinks="ph")
check("specdec q4 causal", **{**C, "Lq": 4})
check("specdec q7 tree rope", **{**C, "Lq": 7, "spec_mask": "tree", "pos_encoding_mode": "ROPE_LLAMA", "dtype": torch.float16})
check("specdec q16 g16 d256 win", B=2, Hq=32, Hkv=2, D=256, P=16, lens=[500, 40], Lq=16, sliding_window_size=64)
print("FAILS", fails)

from triton.testing import do_bench
x = torch.empty(4 << 30, dtype=torch.uint8, device=dev)
t = do_bench(lambda: x.view(torch.int64).sum(), rep=200, return_mode="median")
bw = x.numel() / (t * 1e-3); print(f"read bw (sum) {bw/1e12:.2f} TB/s")
y = torch.empty_like(x); t = do_bench(lambda: y.copy_(x), rep=200, return_mode="median"); print(f"copy read bw {x.numel()/(t*1e-3)/1e12:.2f} TB/s")
del x, y
for name, B, Hq, Hkv, D, L, kvd in [("llama3-8b", 64, 32, 8, 128, 4096, None), ("llama3-8b-fp8", 64, 32, 8, 128, 4096, torch.float8_e4m3fn),
                                     ("70b-tp8", 128, 8, 1, 128, 4096, None), ("long-128k", 1, 32, 8, 128, 131072, None), ("small-b16", 16, 32, 8, 128, 1024, None)]:
    sets = [make(B, Hq, Hkv, D, 16, [L] * B, torch.bfloat16, kvd, extra_pages=0) for _ in range(3)]
    i = [0]
    def f():
        s = sets[i[0] % 3]; i[0] += 1; xqa_jit.xqa(s[0], s[1], s[2], s[3], s[4])
    t = do_bench(f, rep=300, return_mode="median")
    byts = B * Hkv * L * D * 2 * (1 if kvd else 2)
    print(f"{name:14s} {t*1e3:8.1f} us  {byts/(t*1e-3)/1e12:.2f} TB/s  frac {byts/bw/(t*1e-3):.3f}")
q, k, v, pt, sl = make(1, 32, 8, 128, 16, [64])
for _ in range(10): xqa_jit.xqa(q, k, v, pt, sl)
torch.cuda.synchronize(); n = 3000; t0 = time.perf_counter()
for _ in range(n): xqa_jit.xqa(q, k, v, pt, sl)
print(f"host per call {(time.perf_counter()-t0)/n*1e6:.1f} us"); torch.cuda.synchronize()
