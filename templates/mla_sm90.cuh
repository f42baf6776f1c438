{#- Device helpers shared by the wgmma latent-MLA kernels (mla2.cu.jinja, mla3.cu.jinja): the
    launch parameters, wgmma/descriptor/barrier wrappers, the q loader and the split-KV
    publish/merge/normalise epilogue. Included inside namespace xqa after the including
    template has defined QT, KT, MT, DEBUG, HG, HV, NHG, DV, NTHREADS, OB_STRIDE and MAX_SPLITS.
    In the asm strings a register list is written "{ %0, ..." with a space: "{%" would open a
    Jinja tag. -#}
{%- set WT = "bf16" if mma_is_bf16 else "f16" -%}
{%- macro reglist(n, base) -%}{% for i in range(n) %}%{{ base + i }}{{ ", " if not loop.last else "" }}{% endfor %}{%- endmacro -%}
{%- macro outs(n, arr) -%}{% for i in range(n) %}"+f"({{ arr }}[{{ i }}]){{ ", " if not loop.last else "" }}{% endfor %}{%- endmacro -%}
// ---------------------------------------------------------------- launch parameters
// Every field is 8 bytes wide so the Python side packs it with one struct format ("<25q2d").
struct Params {
  const QT* q; const KT* kv; QT* out; float* lse;
  const int* page_table; const int* seq_lens; const float* kv_scale_ptr;
  float* part_o; float* part_ml; int* counters; int* err;
  int64_t batch, max_pages, num_pages, log2_page, splits, chunk;
  int64_t q_sb, q_sh, o_sb, o_sh, kv_sp, kv_ss, pt_sb, lse_sb;  // strides in elements
  double sm_scale, kv_scale;
};

__device__ __forceinline__ void report(int* err, int code, int a, int b, int c) {
  if (DEBUG && err != nullptr && atomicCAS(err, 0, code) == 0) {
    err[1] = a; err[2] = b; err[3] = c;
  }
}

// Byte offset of 16-byte chunk `c` (c = element / 8) of row `r` in a [NDB][rows][128 B] tile with
// the 128-byte swizzle (chunk bits 4..6 XOR row bits 7..9 of the address: base 1024-aligned).
__device__ __forceinline__ uint32_t wg_off(int r, int c, int rows) {
  return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// ---------------------------------------------------------------- wgmma and barrier helpers
// Shared-memory matrix descriptor, 128-byte swizzle. K-major operands (Q, K, P): rows 128 B apart,
// 8-row groups SBO = 1024 B apart, LBO unused (1); a 16-element k step inside the 128-byte row is
// +32 B on the start address. MN-major V (B of P V, imm-trans-b = 1): 64 dims per 128-byte row,
// the next 64 dims LBO = DB_BYTES away, the next 8 tokens SBO = 1024 B away.
__device__ __forceinline__ uint64_t desc_encode(uint32_t x) { return (x & 0x3FFFFu) >> 4; }
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return desc_encode(saddr) | (desc_encode(lbo) << 16) | (desc_encode(sbo) << 32) | (1ull << 62);
}

// A descriptor advanced by `bytes` (a multiple of 16; the 14-bit address field cannot carry: shared
// addresses stay below 256 KiB).
__device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t bytes) { return d + (bytes >> 4); }

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Pin registers at a point of the instruction stream (no reads hoisted above a wait, no writes
// sunk below a fence).
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
// Generic-proxy shared-memory writes (st.shared, completed cp.async) -> tensor-core reads.
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

// S (64 x 64, fp32) (+)= Q (64 x 16) K^T (16 x 64); both K-major in smem.
__device__ __forceinline__ void wgmma_qk(float (&d)[32], uint64_t da, uint64_t db, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.{{ WT }}.{{ WT }} "
      "{ {{ reglist(32, 0) }} }, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : {{ outs(32, "d") }}
      : "l"(da), "l"(db), "r"(acc));
}
// O (64 x 256, fp32) += P (64 x 16, registers) V (16 x 256, MN-major in smem).
__device__ __forceinline__ void wgmma_pv_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.{{ WT }}.{{ WT }} "
      "{ {{ reglist(128, 0) }} }, { %128, %129, %130, %131}, %132, 1, 1, 1, 1;\n"
      : {{ outs(128, "d") }}
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
// O (64 x 256, fp32) += P (64 x 16, K-major in smem) V (16 x 256, MN-major in smem).
__device__ __forceinline__ void wgmma_pv_ss(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.{{ WT }}.{{ WT }} "
      "{ {{ reglist(128, 0) }} }, %128, %129, 1, 1, 1, 0, 1;\n"
      : {{ outs(128, "d") }}
      : "l"(da), "l"(db));
}

// Eight q elements (16 bytes) in the MMA type.
__device__ __forceinline__ uint4 q_chunk(const QT* p) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  if constexpr (std::is_same<QT, MT>::value) {
    return v;
  } else {
    float x[8];
    u4_to_f8<QT>(v, x);
    return f8_to_u4<MT>(x);
  }
}

// Block coordinates re-read from the special registers (volatile: not merged with the reads at
// kernel entry, so nothing has to stay live across the main loop for the epilogue).
__device__ __forceinline__ int3 block_coords() {
  int3 c;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(c.x));
  asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(c.y));
  asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(c.z));
  return c;
}

__device__ __forceinline__ uint8_t* smem_base(uint8_t* raw) {
  const uint32_t a = smem_u32(raw);
  return raw + ((1024u - (a & 1023u)) & 1023u);
}

// After the main loop, with ob, f_m, f_l holding this block's result: split-KV publish and merge
// (the last split of a request merges), then normalise and write out / lse. Rows >= HV (padding
// of a 16/32-head group) are never published or written.
// ob: [HG][OB_STRIDE] fp32; s_w: room for MAX_SPLITS * HV floats; f_m, f_l, f_mul: [HG] each;
// flag: [0] last-split flag, [1] the request's number of splits (set by the kernel).
__device__ __forceinline__ void finish_block(const Params& p, float* ob, float* s_w, float* f_m,
                                             float* f_l, float* f_mul, int* flag) {
  const int3 bc = block_coords();
  const int hg = bc.x, split = bc.y, b = bc.z;
  const int tid = threadIdx.x;
  const int ns = flag[1];
  const int64_t unit = static_cast<int64_t>(b) * NHG + hg;
  const int head0 = hg * HV;
  float vscale = static_cast<float>(p.kv_scale);
  if (p.kv_scale_ptr != nullptr) vscale *= p.kv_scale_ptr[0];

  // ---- several splits: publish a partial (out, m, l); the last split to finish merges them
  if (ns > 1) {
    const int64_t part = unit * p.splits + split;
    float* po = p.part_o + part * (HV * DV);
    float* pml = p.part_ml + part * (HV * 2);
    for (int it = tid; it < HV * DV / 4; it += NTHREADS) {
      const int rl = it / (DV / 4), c4 = it % (DV / 4);
      __stcg(reinterpret_cast<float4*>(po) + it,
             *reinterpret_cast<const float4*>(ob + rl * OB_STRIDE + c4 * 4));
    }
    for (int rl = tid; rl < HV; rl += NTHREADS)
      __stcg(reinterpret_cast<float2*>(pml) + rl, make_float2(f_m[rl], f_l[rl]));
    __threadfence();
    __syncthreads();
    if (tid == 0) flag[0] = atomicAdd(p.counters + unit, 1) == ns - 1;
    __syncthreads();
    if (!flag[0]) return;
    __threadfence();
    const float* po0 = p.part_o + unit * p.splits * (HV * DV);
    const float* pml0 = p.part_ml + unit * p.splits * (HV * 2);
    // per-row totals and per-split weights 2^(m_s - m): stage the (m, l) pairs of all splits with
    // all threads (m into s_w, l into ob, free until the weighted sum below rewrites it)
    float* s_l = ob;
    for (int i = tid; i < ns * HV; i += NTHREADS) {
      const float2 ml = __ldcg(reinterpret_cast<const float2*>(pml0) + i);
      s_w[i] = ml.x;
      s_l[i] = ml.y;
    }
    __syncthreads();
    for (int rl = tid; rl < HV; rl += NTHREADS) {
      float mb = NEG_INF;
      for (int s = 0; s < ns; ++s) mb = fmaxf(mb, s_w[s * HV + rl]);
      const float mb_use = mb == NEG_INF ? 0.f : mb;
      float lb = 0.f;
      for (int s = 0; s < ns; ++s) {
        const float w = exp2f(s_w[s * HV + rl] - mb_use);
        s_w[s * HV + rl] = w;
        lb += s_l[s * HV + rl] * w;
      }
      f_m[rl] = mb;
      f_l[rl] = lb;
    }
    __syncthreads();
    // weighted sum of the partials (L2-resident): each thread owns 4 float4 columns and keeps 16
    // loads (4 columns x 4 splits) in flight
    constexpr int N4 = HV * DV / 4;
    for (int base4 = tid; base4 < N4; base4 += 4 * NTHREADS) {
      float4 acc[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      int s = 0;
      for (; s + 4 <= ns; s += 4) {
        float4 v[4][4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float4* src = reinterpret_cast<const float4*>(po0 + (s + k) * (HV * DV));
#pragma unroll
          for (int u = 0; u < 4; ++u) v[k][u] = __ldcg(src + base4 + u * NTHREADS);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const float w = s_w[(s + k) * HV + (base4 + u * NTHREADS) / (DV / 4)];
            acc[u].x += w * v[k][u].x; acc[u].y += w * v[k][u].y;
            acc[u].z += w * v[k][u].z; acc[u].w += w * v[k][u].w;
          }
        }
      }
      for (; s < ns; ++s) {
        const float4* src = reinterpret_cast<const float4*>(po0 + s * (HV * DV));
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = __ldcg(src + base4 + u * NTHREADS);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float w = s_w[s * HV + (base4 + u * NTHREADS) / (DV / 4)];
          acc[u].x += w * v[u].x; acc[u].y += w * v[u].y;
          acc[u].z += w * v[u].z; acc[u].w += w * v[u].w;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int it = base4 + u * NTHREADS;
        const int rl = it / (DV / 4), c4 = it % (DV / 4);
        *reinterpret_cast<float4*>(ob + rl * OB_STRIDE + c4 * 4) = acc[u];
      }
    }
    if (tid == 0) p.counters[unit] = 0;  // ready for the next launch (and CUDA-graph replay)
    __syncthreads();
  }

  // ---- finalize: normalise, write out and lse
  for (int rl = tid; rl < HV; rl += NTHREADS) {
    const float mb = f_m[rl], l = f_l[rl];
    f_mul[rl] = (mb == NEG_INF || !(l > 0.f)) ? 0.f : vscale / l;
    if (p.lse != nullptr)
      p.lse[b * p.lse_sb + head0 + rl] = l > 0.f ? (mb + log2f(l)) * LN2 : NEG_INF;
  }
  __syncthreads();
  for (int it = tid; it < HV * (DV / 8); it += NTHREADS) {
    const int rl = it / (DV / 8), gi = it % (DV / 8);
    const float mul = f_mul[rl];
    const float4 a = reinterpret_cast<const float4*>(ob + rl * OB_STRIDE + gi * 8)[0];
    const float4 c = reinterpret_cast<const float4*>(ob + rl * OB_STRIDE + gi * 8)[1];
    const float x[8] = {a.x * mul, a.y * mul, a.z * mul, a.w * mul,
                        c.x * mul, c.y * mul, c.z * mul, c.w * mul};
    *reinterpret_cast<uint4*>(p.out + b * p.o_sb + (head0 + rl) * p.o_sh + gi * 8) = f8_to_u4<QT>(x);
  }
}

// O accumulator of one warpgroup: rows 16*wl + g (+8), columns 8j + 2t (+1) of its 256-column half.
__device__ __forceinline__ void scale_rows(float (&o)[128], float a0, float a1) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j] *= a0; o[4 * j + 1] *= a0;
    o[4 * j + 2] *= a1; o[4 * j + 3] *= a1;
  }
}
