{#- Host side of the TMA latent-MLA kernels: the cache as a tensor map (see mla_tma.cuh). -#}
// ---------------------------------------------------------------- the tensor map
// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
typedef CUresult (*EncodeTiledFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                  const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                  const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static EncodeTiledFn encode_fn() {
  static EncodeTiledFn fn = nullptr;
  if (fn == nullptr) {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiledFn>(f);
  }
  return fn;
}

// The cache (num_pages, P, 576) with element strides kv_sp, kv_ss as a 3-D map (dims innermost
// first); the last map is kept per thread (a serving loop calls with the same cache every step).
static cudaError_t cache_map(const Params& p, CUtensorMap* out) {
  struct Last {
    const void* kv = nullptr;
    int64_t n = -1, lp = -1, sp = -1, ss = -1;
    CUtensorMap map;
  };
  static thread_local Last last;
  if (last.kv == p.kv && last.n == p.num_pages && last.lp == p.log2_page && last.sp == p.kv_sp &&
      last.ss == p.kv_ss) {
    *out = last.map;
    return cudaSuccess;
  }
  EncodeTiledFn fn = encode_fn();
  if (fn == nullptr) return cudaErrorNotSupported;
  const int64_t page = int64_t(1) << p.log2_page;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(DK), static_cast<cuuint64_t>(page),
                              static_cast<cuuint64_t>(p.num_pages)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.kv_ss) * sizeof(KT),
                                 static_cast<cuuint64_t>(p.kv_sp) * sizeof(KT)};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(page < TILE_N ? page : TILE_N), 1};
  const cuuint32_t estr[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult r = fn(&map,
                        std::is_same<KT, __nv_bfloat16>::value ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                               : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        3, const_cast<void*>(static_cast<const void*>(p.kv)), dims, strides, box,
                        estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return cudaErrorInvalidValue;
  last.kv = p.kv; last.n = p.num_pages; last.lp = p.log2_page; last.sp = p.kv_sp; last.ss = p.kv_ss;
  last.map = map;
  *out = map;
  return cudaSuccess;
}
