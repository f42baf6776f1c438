"""Numpy simulation of templates/mla2.cu.jinja, one (head group, split, request) block at a time.

The kernel's own index arithmetic is reproduced line by line (q / K / P stores, descriptors, the
fragments of S, P and O, the softmax, the epilogue and the split merge). wgmma operand fetch is
modelled from the PTX ISA's canonical layouts (9.7.15.5.1.2.1.3):
  K-major, 128B swizzle:  ((8,m),(T,2k)):((8T,SBO),(1,T))     (LBO unused)
  MN-major, 128B swizzle: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))
with T = 8 16-bit elements, strides in elements (LBO/SBO in bytes / 2), the start address from the
descriptor, and Swizzle<3,4,3> on the byte address (bits 4..6 ^= bits 7..9). Register fragments:
D of m64nNk16: warp w of the warpgroup holds rows 16w + g (+8), d[4j+e] = (row + 8*(e>>1),
col 8j + 2t + (e&1)); A of m64nNk16 in registers: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..),
a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..) (two elements per 32-bit register, low half first).
"""
import numpy as np

DK, DV, HG, TILE_N = 576, 512, 64, 64
NDB = DK // 64
DB_BYTES = TILE_N * 128
TILE16 = NDB * DB_BYTES
RAW = TILE_N * DK
NSTAGES = 2
OB_STRIDE = DV + 8
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

def round_mt(x, mt):
    x = np.asarray(x, np.float32)
    if mt == 'f16':
        return x.astype(np.float16).astype(np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)

def wg_off(r, c, rows):
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)

def make_desc(saddr, lbo, sbo):
    enc = lambda x: (x & 0x3FFFF) >> 4
    return enc(saddr) | (enc(lbo) << 16) | (enc(sbo) << 32) | (1 << 62)

def decode(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert (desc >> 62) == 1 and ((desc >> 49) & 7) == 0
    return start, lbo, sbo

def swz(addr):
    return addr ^ (((addr >> 7) & 7) << 4)

class Smem:
    def __init__(self, nbytes):
        self.h = np.zeros(nbytes // 2, np.float32)   # 16-bit elements stored as their float value
        self.raw8 = np.zeros(nbytes, np.float32)     # FP8 bytes (their values), raw region only
    def st16(self, addr, vals):                      # 8 elements at a 16-byte-aligned address
        assert addr % 16 == 0
        self.h[addr // 2: addr // 2 + len(vals)] = vals
    def ld(self, addrs):
        assert np.all(addrs % 2 == 0)
        return self.h[addrs // 2]

def fetch_kmajor(sm, desc, rows):
    """rows x 16 matrix (row, k) of a K-major operand."""
    start, lbo, sbo = decode(desc)
    r = np.arange(rows)[:, None]; k = np.arange(16)[None, :]
    off = (r % 8) * 128 + (r // 8) * sbo + k * 2
    return sm.ld(swz(start + off))

def fetch_mnmajor(sm, desc, n):
    """16 x n matrix (k, mn) of an MN-major operand."""
    start, lbo, sbo = decode(desc)
    k = np.arange(16)[:, None]; mn = np.arange(n)[None, :]
    off = (mn % 8) * 2 + ((mn // 8) % 8) * 16 + (mn // 64) * lbo + (k % 8) * 128 + (k // 8) * sbo
    return sm.ld(swz(start + off))

W, L = np.meshgrid(np.arange(4), np.arange(32), indexing='ij')   # warp in WG, lane
G, TQ = L >> 2, L & 3

def d_to_regs(D, N):
    """D (64 x N) -> regs [4, 32, N/2]"""
    regs = np.zeros((4, 32, N // 2), np.float32)
    for j in range(N // 8):
        for e in range(4):
            regs[:, :, 4 * j + e] = D[16 * W + G + 8 * (e >> 1), 8 * j + 2 * TQ + (e & 1)]
    return regs

def regs_to_d(regs, N):
    D = np.zeros((64, N), np.float32)
    for j in range(N // 8):
        for e in range(4):
            D[16 * W + G + 8 * (e >> 1), 8 * j + 2 * TQ + (e & 1)] = regs[:, :, 4 * j + e]
    return D

def afrag_to_mat(a):
    """a [4, 32, 4 regs, 2 halves] -> A (64 x 16)"""
    A = np.full((64, 16), np.nan, np.float32)
    for reg, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        for hlf in range(2):
            A[16 * W + G + dr, 2 * TQ + dc + hlf] = a[:, :, reg, hlf]
    assert not np.isnan(A).any()
    return A

def wgmma(D_regs, A, B, N, accumulate=True):
    D = regs_to_d(D_regs, N) if accumulate else np.zeros((64, N), np.float32)
    D = D + (A.astype(np.float64) @ B.astype(np.float64)).astype(np.float32)
    return d_to_regs(D, N)

def shfl_xor(x, m):  # x [4, 32]
    return x[:, np.arange(32) ^ m]

def sim_block(q_rows, kv, pt_row, log2p, num_pages, length, chunk_begin, chunk_end, fp8, mt,
              qk_scale):
    """Returns ob (64 x 512 fp32), f_m, f_l (64) as the kernel leaves them before finish_block."""
    PIPE = NSTAGES * RAW + TILE16 if fp8 else NSTAGES * TILE16
    OFF_Q = (PIPE + 1023) // 1024 * 1024
    OFF_P = OFF_Q + NDB * HG * 128
    sm = Smem(OFF_P + HG * 128 + 4096)
    pipe_u, q_u, p_u = 0, OFF_Q, OFF_P
    cvt_u = pipe_u + NSTAGES * RAW
    ntiles = (chunk_end - chunk_begin + TILE_N - 1) // TILE_N
    page_mask = (1 << log2p) - 1
    alpha_s = np.zeros(64, np.float32)
    raw_tiles = {}
    def load_tile(dst, tile_begin, valid_end):
        # WG1 warp wl, lanes < 16 look up rows wl*16 + lane; rows copied in 16-byte chunks
        for wl in range(4):
            my_page = np.full(32, -1)
            for lane in range(32):
                t = tile_begin + wl * 16 + (lane & 15)
                if lane < 16 and t < valid_end:
                    page = pt_row[t >> log2p]
                    if 0 <= page < num_pages:
                        my_page[lane] = page
            for i in range(16):
                row = wl * 16 + i; t = tile_begin + row
                page = my_page[i]
                vals = kv[page, t & page_mask] if page >= 0 else np.zeros(DK, np.float32)
                if fp8:
                    raw_tiles[dst] = raw_tiles.get(dst, np.zeros((TILE_N, DK), np.float32))
                    raw_tiles[dst][row] = vals   # plain rows: row * 576 + ch * 16
                else:
                    for ch in range(DK // 8):
                        sm.st16(dst + wg_off(row, ch, TILE_N), vals[ch * 8: ch * 8 + 8])
    def convert(src):   # convert_half for wg = 0, 1: thread t handles it = t, t + 128, ...
        r = raw_tiles[src]
        NG = TILE_N // 2 * (DK // 8)
        for wg in (0, 1):
            for t in range(128):
                for it in range(t, NG, 128):
                    row = wg * (TILE_N // 2) + it // (DK // 8); gi = it % (DK // 8)
                    sm.st16(cvt_u + wg_off(row, gi, TILE_N), r[row, gi * 8: gi * 8 + 8])
    # q
    for r in range(HG):
        for c in range(DK // 8):
            sm.st16(q_u + wg_off(r, c, HG), q_rows[r, c * 8: c * 8 + 8])
    o0 = np.zeros((4, 32, 128), np.float32); o1 = np.zeros((4, 32, 128), np.float32)
    m_run = np.full((2, 4, 32), -np.inf, np.float32); l_run = np.zeros((2, 4, 32), np.float32)
    for n in range(ntiles):   # data-flow order (the protocol checker covers the ordering)
        tile_begin = chunk_begin + n * TILE_N
        if fp8:
            load_tile(pipe_u + (n % NSTAGES) * RAW, tile_begin, chunk_end); convert(pipe_u + (n % NSTAGES) * RAW)
            tile_u = cvt_u
        else:
            tile_u = pipe_u + (n % NSTAGES) * TILE16
            load_tile(tile_u, tile_begin, chunk_end)
        # ---- WG0: S
        s = np.zeros((4, 32, 32), np.float32)
        for kk in range(DK // 16):
            A = fetch_kmajor(sm, make_desc(q_u + (kk >> 2) * (HG * 128) + (kk & 3) * 32, 16, 1024), 64)
            Bt = fetch_kmajor(sm, make_desc(tile_u + (kk >> 2) * DB_BYTES + (kk & 3) * 32, 16, 1024), 64)
            s = wgmma(s, A, Bt.T, 64, accumulate=kk > 0)
        s = s * np.float32(qk_scale)
        if tile_begin + TILE_N > chunk_end:
            for j in range(8):
                for e in range(4):
                    tok = tile_begin + j * 8 + 2 * TQ + (e & 1)
                    s[:, :, 4 * j + e] = np.where(tok >= chunk_end, -np.inf, s[:, :, 4 * j + e])
        alpha = np.zeros((2, 4, 32), np.float32)
        for h in range(2):
            mx = np.full((4, 32), -np.inf, np.float32)
            for j in range(8):
                mx = np.maximum(mx, np.maximum(s[:, :, 4 * j + 2 * h], s[:, :, 4 * j + 2 * h + 1]))
            mx = np.maximum(mx, shfl_xor(mx, 1)); mx = np.maximum(mx, shfl_xor(mx, 2))
            m_new = np.maximum(m_run[h], mx)
            m_use = np.where(m_new == -np.inf, 0, m_new).astype(np.float32)
            alpha[h] = np.exp2(m_run[h] - m_use)
            m_run[h] = m_new
            rs = np.zeros((4, 32), np.float32)
            for j in range(8):
                for x in (4 * j + 2 * h, 4 * j + 2 * h + 1):
                    s[:, :, x] = np.exp2(s[:, :, x] - m_use); rs += s[:, :, x]
            l_run[h] = l_run[h] * alpha[h] + rs
        sr = round_mt(s, mt)
        pa = np.zeros((4, 4, 32, 4, 2), np.float32)  # [kk][w][lane][reg][half]
        for kk in range(4):
            for reg in range(4):
                pa[kk, :, :, reg, 0] = sr[:, :, 8 * kk + 2 * reg]
                pa[kk, :, :, reg, 1] = sr[:, :, 8 * kk + 2 * reg + 1]
        # P -> smem (32-bit stores of two 16-bit values)
        r0 = 16 * W + G
        for j in range(8):
            cofs = ((j ^ G) << 4) + 4 * TQ
            for rowadd, reg in ((0, (j & 1) * 2), (8, (j & 1) * 2 + 1)):
                addr = p_u + (r0 + rowadd) * 128 + cofs
                for hlf in range(2):
                    sm.h[(addr + 2 * hlf) // 2] = pa[j >> 1, :, :, reg, hlf]
        for (rowadd, h) in ((0, 0), (8, 1)):
            alpha_s[(r0 + rowadd)[TQ == 0]] = alpha[h][TQ == 0]
        # ---- WG0: O[:, :256] = alpha O + P V (A from registers)
        o0[:, :, 0::4] *= alpha[0][:, :, None]; o0[:, :, 1::4] *= alpha[0][:, :, None]
        o0[:, :, 2::4] *= alpha[1][:, :, None]; o0[:, :, 3::4] *= alpha[1][:, :, None]
        for kk in range(4):
            A = afrag_to_mat(pa[kk])
            B = fetch_mnmajor(sm, make_desc(tile_u + kk * 2048, DB_BYTES, 1024), 256)
            o0 = wgmma(o0, A, B, 256)
        # ---- WG1: O[:, 256:] (alpha from smem, A = P from smem)
        a0 = alpha_s[16 * W + G]; a1 = alpha_s[16 * W + G + 8]
        o1[:, :, 0::4] *= a0[:, :, None]; o1[:, :, 1::4] *= a0[:, :, None]
        o1[:, :, 2::4] *= a1[:, :, None]; o1[:, :, 3::4] *= a1[:, :, None]
        for kk in range(4):
            A = fetch_kmajor(sm, make_desc(p_u + kk * 32, 16, 1024), 64)
            B = fetch_mnmajor(sm, make_desc(tile_u + 4 * DB_BYTES + kk * 2048, DB_BYTES, 1024), 256)
            o1 = wgmma(o1, A, B, 256)
    # ---- epilogue: ob, f_m, f_l
    ob = np.zeros((64, OB_STRIDE), np.float32); f_m = np.zeros(64, np.float32); f_l = np.zeros(64, np.float32)
    for wg, o in ((0, o0), (1, o1)):
        for h in range(2):
            rl = 16 * W + G + 8 * h
            if wg == 0:
                l = l_run[h] + shfl_xor(l_run[h], 1); l = l + shfl_xor(l, 2)
                f_m[rl[TQ == 0]] = m_run[h][TQ == 0]; f_l[rl[TQ == 0]] = l[TQ == 0]
            for j in range(32):
                ob[rl, wg * 256 + j * 8 + 2 * TQ] = o[:, :, 4 * j + 2 * h]
                ob[rl, wg * 256 + j * 8 + 2 * TQ + 1] = o[:, :, 4 * j + 2 * h + 1]
    return ob[:, :DV], f_m, f_l

def finish(parts, hv, vscale):
    """parts: list over splits of (ob, f_m, f_l); the kernel's merge + normalisation."""
    if len(parts) > 1:
        ns = len(parts)
        s_w = np.array([p[1][:hv] for p in parts]); s_l = np.array([p[2][:hv] for p in parts])
        mb = s_w.max(0); mb_use = np.where(mb == -np.inf, 0, mb)
        w = np.exp2(s_w - mb_use); lb = (s_l * w).sum(0)
        ob = sum(w[s][:, None] * parts[s][0][:hv] for s in range(ns))
        f_m, f_l = mb, lb
    else:
        ob, f_m, f_l = parts[0][0][:hv], parts[0][1][:hv], parts[0][2][:hv]
    mul = np.where((f_m == -np.inf) | ~(f_l > 0), 0, vscale / np.where(f_l > 0, f_l, 1))
    lse = np.where(f_l > 0, (f_m + np.log2(np.where(f_l > 0, f_l, 1))) * LN2, -np.inf)
    return ob * mul[:, None], lse

def run_case(hq, P, lens, fp8, mt, chunk, seed, kv_scale=1.0, sm_scale=0.1):
    rng = np.random.default_rng(seed)
    B = len(lens); M = max(1, max((l + P - 1) // P for l in lens)) + 1
    N = B * M + 3
    log2p = P.bit_length() - 1
    if fp8:
        kv = rng.standard_normal((N, P, DK)).astype(np.float32)
        kv = np.clip(kv, -448, 448).astype(np.float16).astype(np.float32)  # stand-in: f16-exact values
    else:
        kv = round_mt(rng.standard_normal((N, P, DK)), mt)
    perm = rng.permutation(N)
    table = np.full((B, M), 10**6, np.int64)  # garbage past the last page (never read)
    k = 0
    for b, l in enumerate(lens):
        for i in range((l + P - 1) // P):
            table[b, i] = perm[k]; k += 1
    q = round_mt(rng.standard_normal((B, hq, DK)) * 0.7, mt)
    hv = min(hq, 64); nhg = hq // hv
    qk_scale = sm_scale * kv_scale * LOG2E
    worst = 0.0; worst_lse = 0.0
    for b, l in enumerate(lens):
        ns = (l + chunk - 1) // chunk
        for hg in range(nhg):
            rows = np.zeros((64, DK), np.float32); rows[:hv] = q[b, hg * hv:(hg + 1) * hv]
            if ns == 0:
                out = np.zeros((hv, DV)); lse = np.full(hv, -np.inf)
            else:
                parts = [sim_block(rows, kv, table[b], log2p, N, l, s * chunk, min(s * chunk + chunk, l),
                                   fp8, mt, qk_scale) for s in range(ns)]
                out, lse = finish(parts, hv, kv_scale)
            # float64 reference on the same (rounded) inputs
            if l == 0:
                ref = np.zeros((hv, DV)); rlse = np.full(hv, -np.inf)
            else:
                keys = np.stack([kv[table[b, t // P], t % P] for t in range(l)]).astype(np.float64) * kv_scale
                sc = q[b, hg * hv:(hg + 1) * hv].astype(np.float64) @ keys.T * sm_scale
                mx = sc.max(1, keepdims=True); pr = np.exp(sc - mx)
                ref = pr @ keys[:, :DV] / pr.sum(1, keepdims=True)
                rlse = mx[:, 0] + np.log(pr.sum(1))
            err = np.abs(out - ref).max() / max(1e-9, np.abs(ref).max())
            fin = np.isfinite(rlse)
            assert np.array_equal(np.isfinite(lse), fin), "lse -inf pattern"
            el = np.abs(lse[fin] - rlse[fin]).max() if fin.any() else 0.0
            worst = max(worst, err); worst_lse = max(worst_lse, el)
    print(f"hq={hq:3d} P={P:3d} lens={lens} fp8={fp8} mt={mt} chunk={chunk} kv_scale={kv_scale}: "
          f"max|out-ref|/max|ref| = {worst:.2e}, max|lse-ref| = {worst_lse:.2e}")
    return worst, worst_lse

if __name__ == "__main__":
    res = []
    res.append(run_case(64, 64, [100, 0, 64], False, 'bf16', 1 << 20, 0))
    res.append(run_case(16, 16, [130, 1], False, 'f16', 1 << 20, 1))
    res.append(run_case(32, 1, [70], False, 'bf16', 1 << 20, 2))
    res.append(run_case(128, 256, [300], False, 'f16', 128, 3))            # 3 splits + merge
    res.append(run_case(64, 64, [200, 65], True, 'f16', 64, 4, kv_scale=0.5))  # FP8 path, 4 splits
    res.append(run_case(16, 8, [257], True, 'f16', 1 << 20, 5, kv_scale=1.7))
    ok = all(e < 2e-2 and l < 2e-2 for e, l in res)
    print("SIM OK" if ok else "SIM MISMATCH")
