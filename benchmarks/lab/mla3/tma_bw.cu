// Copy-engine ceiling of the latent-MLA layouts (lab; NOTES v11). No tensor work at all: one thread
// per block keeps NBUF tiles of a (pages, 64, 576) bf16 cache in flight with TMA and re-issues a
// buffer as soon as it lands. It answers: how long does the data path alone take for v3's layout
// (two blocks per request, each reading all 9 dim blocks of every tile), for v4's (two blocks per
// request, each reading 5 of the 9), and for other box shapes and buffer counts?
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/tma_bw tma_bw.cu && /tmp/tma_bw
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <random>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

constexpr int B = 128, L = 4096, P = 64, D = 576, TILES = L / P, DBB = 64 * 128;  // dim block: 64 rows x 128 B

__device__ __forceinline__ uint32_t su32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void expect_tx(uint32_t bar, uint32_t n) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(n) : "memory");
}
__device__ __forceinline__ void wait_bar(uint32_t bar, uint32_t par) {
  asm volatile("{\n.reg .pred p;\nW:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}\n" ::"r"(bar), "r"(par) : "memory");
}
__device__ __forceinline__ void tma3(uint32_t dst, const CUtensorMap* m, uint32_t bar, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, { %2, %3, %4}], [%5];\n"
               ::"r"(dst), "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
}
__device__ __forceinline__ void pf3(const CUtensorMap* m, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.prefetch.tensor.3d.L2.global.tile [%0, { %1, %2, %3}];\n" ::"l"(m), "r"(c0), "r"(c1), "r"(c2) : "memory");
}
__device__ __forceinline__ void tma4(uint32_t dst, const CUtensorMap* m, uint32_t bar, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, { %2, %3, %4, %5}], [%6];\n"
               ::"r"(dst), "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
}

// mode 0: all 9 dim blocks per tile (v3: each of a request's `per_req` blocks reads the whole tile)
// mode 1: dim blocks 4 rank .. 4 rank + 3 and the rope block 8 (v4's pair)
// big:    (mode 1) the four value blocks in one 4-D box (64 elems, 64 rows, 4 blocks) instead of 4
// hold:   clocks a landed tile is held before its buffer is re-issued (the consumers' S, softmax
//         and P V); pf: prefetch the tile pf tiles past the one being loaded into L2 at each issue
//         (0: none); pf_one: only the first block of a request prefetches
//         pf_warp: the prefetches come from a second warp, off the copy thread's path
__device__ unsigned long long g_clk[6];  // block 0: clock64 and globaltimer at entry and exit; clocks in issue(), in waits
struct Cfg { int nbuf, mode, per_req, big, hold, pf, pf_one, pf_warp = 0; };

__global__ void __launch_bounds__(64, 1) copy_kernel(const __grid_constant__ CUtensorMap m3, const __grid_constant__ CUtensorMap m4,
                                                      const __grid_constant__ CUtensorMap m5, const int* table, Cfg cfg) {
  extern __shared__ __align__(1024) uint8_t sm[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(sm) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t bars[8];
  __shared__ volatile int landed;
  __shared__ int pages[TILES];  // the request's page ids, read before the loop (as the kernels do early)
  if (threadIdx.x == 0) landed = -1;
  for (int t = threadIdx.x; t < TILES; t += blockDim.x) pages[t] = table[blockIdx.x / cfg.per_req * TILES + t];
  __syncthreads();
  if (threadIdx.x != 0 && !(cfg.pf_warp && threadIdx.x == 32)) return;
  const int rank = blockIdx.x % cfg.per_req;
  const int nb = cfg.mode == 0 ? 9 : 5;
  const int tile_bytes = nb * DBB;
  for (int i = 0; i < cfg.nbuf; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(su32(&bars[i])));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  auto issue = [&](int t) {
    const int j = t % cfg.nbuf;
    const uint32_t bar = su32(&bars[j]), dst = su32(base + j * tile_bytes);
    const int page = pages[t];
    expect_tx(bar, tile_bytes);
    if (cfg.mode == 0 && cfg.big) {  // v3's two refill groups, one 4-D box each: blocks 0-3 and 4-8
      tma4(dst, &m4, bar, 0, 0, 0, page);
      tma4(dst + 4 * DBB, &m5, bar, 0, 0, 4, page);
    } else if (cfg.mode == 0) {
      for (int k = 0; k < 9; ++k) tma3(dst + k * DBB, &m3, bar, k * 64, 0, page);
    } else {
      if (cfg.big) tma4(dst, &m4, bar, 0, 0, 4 * rank, page);
      else for (int k = 0; k < 4; ++k) tma3(dst + k * DBB, &m3, bar, (4 * rank + k) * 64, 0, page);
      tma3(dst + 4 * DBB, &m3, bar, 8 * 64, 0, page);
    }
  };
  auto prefetch = [&](int t) {
    if (cfg.pf == 0 || t >= TILES || (cfg.pf_one && rank != 0)) return;
    const int page = pages[t];
    if (cfg.mode == 0) for (int k = 0; k < 9; ++k) pf3(&m3, k * 64, 0, page);
    else { for (int k = 0; k < 4; ++k) pf3(&m3, (4 * rank + k) * 64, 0, page); pf3(&m3, 8 * 64, 0, page); }
  };
  if (threadIdx.x == 32) {  // the prefetch warp: tile t + nbuf + pf once tile t has landed
    for (int t = 0; t < cfg.pf; ++t) prefetch(cfg.nbuf + t);
    for (int t = 0; t < TILES; ++t) {
      while (landed < t) {}
      prefetch(t + cfg.nbuf + cfg.pf);
    }
    return;
  }
  if (blockIdx.x == 0) {
    g_clk[0] = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g_clk[1]));
  }
  for (int t = 0; t < cfg.nbuf && t < TILES; ++t) issue(t);
  if (!cfg.pf_warp)
    for (int t = 0; t < cfg.pf; ++t) prefetch(cfg.nbuf + t);
  long long issue_clk = 0, wait_clk = 0;
  for (int t = 0; t < TILES; ++t) {
    const long long w0 = clock64();
    wait_bar(su32(&bars[t % cfg.nbuf]), (t / cfg.nbuf) & 1);
    wait_clk += clock64() - w0;
    if (cfg.hold) {
      const long long t0 = clock64();
      while (clock64() - t0 < cfg.hold) {}
    }
    landed = t;
    const long long c0 = clock64();
    if (t + cfg.nbuf < TILES) issue(t + cfg.nbuf);
    issue_clk += clock64() - c0;
    if (!cfg.pf_warp) prefetch(t + cfg.nbuf + cfg.pf);
  }
  if (blockIdx.x == 0) {
    g_clk[2] = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g_clk[3]));
    g_clk[4] = issue_clk;
    g_clk[5] = wait_clk;
  }
}

typedef CUresult (*EncFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                          const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                          CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

int main() {
  const int npages = B * TILES + 3;
  void* kv;
  CK(cudaMalloc(&kv, size_t(npages) * P * D * 2));
  CK(cudaMemset(kv, 0x3c, size_t(npages) * P * D * 2));
  std::vector<int> perm(npages);
  for (int i = 0; i < npages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), std::mt19937(1));
  std::vector<int> hot(B * TILES);
  for (int i = 0; i < B * TILES; ++i) hot[i] = perm[i % TILES];
  int *t_cold, *t_hot;
  CK(cudaMalloc(&t_cold, B * TILES * 4));
  CK(cudaMalloc(&t_hot, B * TILES * 4));
  CK(cudaMemcpy(t_cold, perm.data(), B * TILES * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(t_hot, hot.data(), B * TILES * 4, cudaMemcpyHostToDevice));
  void* fp = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fp, 12000, cudaEnableDefault, &q));
  EncFn enc = reinterpret_cast<EncFn>(fp);
  CUtensorMap m3, m4;
  {
    cuuint64_t dims[3] = {D, P, (cuuint64_t)npages}, str[2] = {D * 2, (cuuint64_t)P * D * 2};
    cuuint32_t box[3] = {64, 64, 1}, es[3] = {1, 1, 1};
    if (enc(&m3, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, kv, dims, str, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      printf("encode 3d failed\n"); return 1;
    }
  }
  bool have4 = true;
  CUtensorMap m5;
  {  // (64 elems, 64 rows, 9 dim blocks, pages): box (64, 64, 4 or 8, 1) lands as [block][row][64]
    cuuint64_t dims[4] = {64, P, 9, (cuuint64_t)npages}, str[3] = {D * 2, 128, (cuuint64_t)P * D * 2};
    cuuint32_t box[4] = {64, 64, 4, 1}, es[4] = {1, 1, 1, 1};
    if (enc(&m4, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, kv, dims, str, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      printf("encode 4d (non-monotonic strides) failed: no big-box rows\n"); have4 = false;
    }
    box[2] = 5;
    if (enc(&m5, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, kv, dims, str, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      printf("encode 4d box 5 failed\n"); have4 = false;
    }
  }
  const int smem = 220 * 1024;
  CK(cudaFuncSetAttribute(copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  printf("%-44s %9s %9s %9s %9s\n", "layout", "us", "L2->SM GB/s", "hot us", "hot GB/s");
  struct Row { const char* name; Cfg c; };
  const Row rows[] = {
      {"v3: 2 blocks/req, 9 blocks/tile, 2 bufs", {2, 0, 2, 0, 0, 0, 0}},
      {"v3: 2 blocks/req, 9 blocks/tile, 3 bufs", {3, 0, 2, 0, 0, 0, 0}},
      {"one block/req, 9 blocks/tile, 2 bufs", {2, 0, 1, 0, 0, 0, 0}},
      {"one block/req, 9 blocks/tile, 3 bufs", {3, 0, 1, 0, 0, 0, 0}},
      {"v4: pair, 5 blocks/tile, 3 bufs", {3, 1, 2, 0, 0, 0, 0}},
      {"v4: pair, 5 blocks/tile, 5 bufs", {5, 1, 2, 0, 0, 0, 0}},
      {"v4: pair, 5 blocks/tile, 2 bufs", {2, 1, 2, 0, 0, 0, 0}},
      {"v4: pair, 4-D value box + rope, 3 bufs", {3, 1, 2, 1, 0, 0, 0}},
      {"v4: pair, 4-D value box + rope, 5 bufs", {5, 1, 2, 1, 0, 0, 0}},
      // v3's buffers held while the consumers work on them, with and without an L2 prefetch ahead
      {"v3 layout, 2 4-D boxes/tile (0-3, 4-8), 2 bufs", {2, 0, 2, 1, 0, 0, 0}},
      {"v3 layout, 2 4-D boxes/tile, hold 3000", {2, 0, 2, 1, 3000, 0, 0}},
      {"v3 layout, 2 4-D boxes/tile, hold 2000", {2, 0, 2, 1, 2000, 0, 0}},
      {"v3 2 bufs, hold 1500", {2, 0, 2, 0, 1500, 0, 0}},
      {"v3 2 bufs, hold 3000", {2, 0, 2, 0, 3000, 0, 0}},
      {"v3 2 bufs, hold 3000, L2 prefetch +1", {2, 0, 2, 0, 3000, 1, 0}},
      {"v3 2 bufs, hold 3000, L2 prefetch +2", {2, 0, 2, 0, 3000, 2, 0}},
      {"v3 2 bufs, hold 3000, L2 prefetch +2 (1 blk)", {2, 0, 2, 0, 3000, 2, 1}},
      {"v3 2 bufs, hold 3000, L2 prefetch +4", {2, 0, 2, 0, 3000, 4, 0}},
      {"v3 2 bufs, hold 3000, L2 prefetch +4 (1 blk)", {2, 0, 2, 0, 3000, 4, 1}},
      {"v3 2 bufs, hold 2000, L2 prefetch +2", {2, 0, 2, 0, 2000, 2, 0}},
      {"hold 3000, prefetch +1 from another warp", {2, 0, 2, 0, 3000, 1, 0, 1}},
      {"hold 3000, prefetch +2 from another warp", {2, 0, 2, 0, 3000, 2, 0, 1}},
      {"hold 3000, prefetch +2 another warp, 1 blk", {2, 0, 2, 0, 3000, 2, 1, 1}},
      {"hold 3000, prefetch +4 from another warp", {2, 0, 2, 0, 3000, 4, 0, 1}},
      {"hold 2000", {2, 0, 2, 0, 2000, 0, 0}},
      {"hold 2000, prefetch +2 from another warp", {2, 0, 2, 0, 2000, 2, 0, 1}},
      {"hold 2500", {2, 0, 2, 0, 2500, 0, 0}},
      {"hold 2500, prefetch +2 from another warp", {2, 0, 2, 0, 2500, 2, 0, 1}},
      {"v3 2 bufs, hold 4000", {2, 0, 2, 0, 4000, 0, 0}},
      {"v3 2 bufs, hold 4000, L2 prefetch +2", {2, 0, 2, 0, 4000, 2, 0}},
  };
  for (const Row& r : rows) {
    if (r.c.big && !have4) continue;
    const int nb = r.c.mode == 0 ? 9 : 5;
    if (r.c.nbuf * nb * DBB + 1024 > smem) continue;
    float res[2];
    for (int h = 0; h < 2; ++h) {
      const int* tb = h ? t_hot : t_cold;
      std::vector<float> ts;
      for (int it = 0; it < 23; ++it) {
        CK(cudaEventRecord(e0));
        copy_kernel<<<B * r.c.per_req, 64, smem>>>(m3, m4, m5, tb, r.c);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 3) ts.push_back(ms * 1e3f);
      }
      CK(cudaGetLastError());
      std::sort(ts.begin(), ts.end());
      res[h] = ts[ts.size() / 2];
    }
    const double bytes = double(B) * r.c.per_req * TILES * nb * DBB;
    unsigned long long ck[6];
    CK(cudaMemcpyFromSymbol(ck, g_clk, sizeof(ck)));
    printf("%-44s %9.1f %9.0f %9.1f %9.0f   (SM %.2f GHz; hot, block 0, per tile: issue %4.0f clk, wait %4.0f clk)\n", r.name, res[0],
           bytes / res[0] / 1e3, res[1], bytes / res[1] / 1e3, double(ck[2] - ck[0]) / double(ck[3] - ck[1]),
           double(ck[4]) / TILES, double(ck[5]) / TILES);
  }
  return 0;
}
