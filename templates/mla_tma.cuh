{#- Copy-engine (TMA) and softmax helpers shared by the TMA latent-MLA kernels (mla3.cu.jinja,
    mla4.cu.jinja). Included inside namespace xqa after mla_sm90.cuh; the including template has
    defined DK, KT, MT, TILE_N, DB_BYTES, L2_EVICT_FIRST and SKIP_UNIT_RESCALE. The host part
    (tensor map) is included separately as mla_tma_host.cuh. -#}
// ---------------------------------------------------------------- TMA and mbarriers
struct KParams {
  Params p;
  CUtensorMap tmap;   // the cache as (576 dims, P rows, N pages), box 64 x min(P, 64) x 1
  // The cache as (64 dims, P rows, 9 dim blocks, N pages), box 64 x min(P, 64) x 4 (tmap4) or 5
  // (tmap5) blocks x 1: a refill group of whole 64-row tiles in one copy instead of one per dim
  // block (the copy engine takes ~60 clk of the issuing warp per instruction: benchmarks/NOTES.md
  // v12). It lands as [blocks][rows][128 B], the tile buffer's layout.
  CUtensorMap tmap4, tmap5;
  // v3 only: q as (64 dims, heads, 9 dim blocks, batch), box 64 x 64 x 9 x 1: a unit's q rows land
  // as [blocks][rows][128 B] in one copy. persist != 0: a persistent launch (one chunk per request;
  // block j runs units j, j + gridDim.x, ...).
  CUtensorMap tmapq;
  int persist;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// (The retry loop stays inside one asm block, as a branch the compiler's register allocator sees
// as straight-line code: a C++ loop between two wgmma of one accumulator chain made ptxas
// serialise them, warning C7520.)
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_AGAIN:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_AGAIN;\n}\n" ::"r"(bar), "r"(parity)
      : "memory");
}
// The copies' L2 policy: evict-first (KV tiles are read once per head group) or normal.
__device__ __forceinline__ uint64_t l2_policy() {
  uint64_t pol;
  if constexpr (L2_EVICT_FIRST)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  else
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                         int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, { %2, %3, %4}], [%5], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "l"(l2_policy())
      : "memory");
}
__device__ __forceinline__ void tma_load4(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                          int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, { %2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar),
      "l"(l2_policy())
      : "memory");
}

// Lane j's share of a tile (lane j < pages per tile covers rows j*RB .. +RB): the page-table entry
// is loaded early (page_load: v3 a step ahead, v4 at the top of a step) and checked where the copy is issued
// (page_coord): a check right after the load would stall the warp for the load's latency in the
// middle of the softmax. Rows at or past `valid_end`, and ids outside the pool, become num_pages
// (a coordinate past the map: zero fill). Entries past the request's last token are never read.
__device__ __forceinline__ bool lane_has_rows(const Params& p, int tile_begin, int valid_end, int lane) {
  const int rb = p.log2_page < 6 ? (1 << p.log2_page) : TILE_N;  // rows per box
  return lane * rb < TILE_N && tile_begin + lane * rb < valid_end;
}
__device__ __forceinline__ int page_load(const Params& p, int b, int tile_begin, int valid_end, int lane) {
  if (!lane_has_rows(p, tile_begin, valid_end, lane)) return 0;
  const int rb = p.log2_page < 6 ? (1 << p.log2_page) : TILE_N;
  return __ldg(p.page_table + b * p.pt_sb + ((tile_begin + lane * rb) >> p.log2_page));
}
__device__ __forceinline__ int page_coord(const Params& p, int b, int tile_begin, int valid_end,
                                          int lane, int page) {
  if (!lane_has_rows(p, tile_begin, valid_end, lane)) return static_cast<int>(p.num_pages);
  if (static_cast<unsigned>(page) >= static_cast<unsigned>(p.num_pages)) {
    const int rb = p.log2_page < 6 ? (1 << p.log2_page) : TILE_N;
    report(p.err, 1, b, (tile_begin + lane * rb) >> p.log2_page, page);
    return static_cast<int>(p.num_pages);
  }
  return page;
}
__device__ __forceinline__ int tile_page(const Params& p, int b, int tile_begin, int valid_end, int lane) {
  return page_coord(p, b, tile_begin, valid_end, lane, page_load(p, b, tile_begin, valid_end, lane));
}

// A value the compiler must treat as new at this point: keeps the descriptor arithmetic next to
// its wgmma instead of hoisting ~70 loop-invariant 64-bit descriptors into registers.
__device__ __forceinline__ void opaque(uint32_t& x) { asm volatile("" : "+r"(x)); }

// O *= per-row factors, skipped by a warp whose factors are all 1 (the running max rarely moves
// once a few tiles are in).
__device__ __forceinline__ void rescale(float (&o)[128], float a0, float a1) {
  if (!SKIP_UNIT_RESCALE || __any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) scale_rows(o, a0, a1);
}

// P (fp32 S-accumulator layout) times per-row factors -> 16-bit A fragments (k step kk = tokens
// 16kk .. 16kk+15 = S n-tiles 2kk, 2kk+1).
__device__ __forceinline__ void pack_p(uint32_t (&pb)[4][4], const float (&s)[32], float f0, float f1) {
#pragma unroll
  for (int kk = 0; kk < TILE_N / 16; ++kk) {
    pb[kk][0] = pack2<MT>(s[8 * kk + 0] * f0, s[8 * kk + 1] * f0);  // row r0,     tokens 16kk + 2t
    pb[kk][1] = pack2<MT>(s[8 * kk + 2] * f1, s[8 * kk + 3] * f1);  // row r0 + 8
    pb[kk][2] = pack2<MT>(s[8 * kk + 4] * f0, s[8 * kk + 5] * f0);  // row r0,     tokens +8
    pb[kk][3] = pack2<MT>(s[8 * kk + 6] * f1, s[8 * kk + 7] * f1);  // row r0 + 8
  }
}

// Raw scores of one tile: -inf past the chunk's end (`valid` tokens of the tile). The softmax scale
// (positive, log2 e folded in) is applied inside the exponent: 2^(s c - m) with m = c max(s).
__device__ __forceinline__ void mask_tail(float (&s)[32], int valid, int tq) {
  if (valid < TILE_N) {
#pragma unroll
    for (int j = 0; j < TILE_N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (j * 8 + 2 * tq + (e & 1) >= valid) s[4 * j + e] = NEG_INF;
    }
  }
}
// Scaled row max (base-2 logits) over this thread's quad (rows r0 + 8h).
__device__ __forceinline__ float row_max(const float (&s)[32], int h, float c) {
  float mx = NEG_INF;
#pragma unroll
  for (int j = 0; j < TILE_N / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  return fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2)) * c;
}
// 2^x, flushing results below 2^-126 to zero (exp2f's denormal handling costs three more
// instructions per element; such weights vanish in a bf16/fp16 P anyway).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// s <- 2^(s c - m) on rows r0 + 8h; returns this thread's share of the row sum.
__device__ __forceinline__ float row_exp(float (&s)[32], int h, float c, float m_use) {
  float rs = 0.f;
#pragma unroll
  for (int j = 0; j < TILE_N / 8; ++j) {
    s[4 * j + 2 * h] = ex2(fmaf(s[4 * j + 2 * h], c, -m_use));
    s[4 * j + 2 * h + 1] = ex2(fmaf(s[4 * j + 2 * h + 1], c, -m_use));
    rs += s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
  }
  return rs;
}

// Zero rows valid .. TILE_N-1 of dim blocks [k0, k0 + nb) of a buffer (one warpgroup, t = 0..127),
// then make the writes visible to the tensor cores and the copy engine.
__device__ __forceinline__ void zero_tail(uint8_t* buf, int k0, int nb, int valid, int t) {
  const int per_blk = (TILE_N - valid) * 8;
  for (int it = t; it < per_blk * nb; it += 128) {
    const int k = k0 + it / per_blk, rem = it % per_blk;
    *reinterpret_cast<uint4*>(buf + k * DB_BYTES + (valid + rem / 8) * 128 + (rem % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
  fence_async_smem();
}
