import torch
dev = 'cuda'
def make(B, Hq, Hkv, D, P, lens, dtype=torch.bfloat16, kvdtype=None, layout="NHD", Lq=1, extra_pages=3):
    M = max(1, max((l + P - 1) // P for l in lens)) + extra_pages
    N = B * M + 5
    shape = (N, P, Hkv, D) if layout == "NHD" else (N, Hkv, P, D)
    k = torch.randn(shape, device=dev).to(kvdtype or dtype)
    v = torch.randn(shape, device=dev).to(kvdtype or dtype)
    perm = torch.randperm(N, device=dev)[: B * M].view(B, M).int()
    for b, l in enumerate(lens):
        used = (l + P - 1) // P
        if M > used:
            perm[b, used:] = torch.randint(-1000, 1000000, (M - used,), device=dev).int()
    q = torch.randn((B, Hq, D) if Lq == 1 else (B, Lq, Hq, D), device=dev).to(dtype) * 1.5
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    return q, k, v, perm, sl


def make_mla(B, hq, lens, P, qdt, kvdt=None, seed=0, q_std=0.7, extra_pages=5):
    """Latent-MLA inputs (q, kv (N, P, 576), page table, seq_lens) on the device: each request's pages
    a random permutation of the pool, table entries past a request's pages out-of-pool garbage."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    npages = [-(-l // P) for l in lens]
    M = max(1, max(npages))
    N = sum(npages) + extra_pages
    perm = torch.randperm(N, generator=g)
    table = torch.randint(10**6, 2 * 10**6, (B, M), generator=g, dtype=torch.int32)
    k = 0
    for b, n in enumerate(npages):
        table[b, :n] = perm[k:k + n]; k += n
    kv = torch.randn((N, P, 576), generator=g).to(kvdt or qdt)
    q = (torch.randn((B, hq, 576), generator=g) * q_std).to(qdt)
    return q.to(dev), kv.to(dev), table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)


def gtime(fn, sets, reps=10, calls=12):
    """Median microseconds per call of fn(*s) over `calls` calls (inputs rotated through `sets`)
    captured in one CUDA graph, replayed `reps` times."""
    import statistics
    for s in sets: fn(*s)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for i in range(calls): fn(*sets[i % len(sets)])
    gr.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); gr.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)
