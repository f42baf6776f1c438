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

// The cache (num_pages, P, 576) with element strides kv_sp, kv_ss as the maps of KParams (dims
// innermost first); the last maps are kept per thread (a serving loop calls with the same cache
// every step).
static cudaError_t cache_map(const Params& p, KParams* kp) {
  struct Last {
    const void* kv = nullptr;
    int64_t n = -1, lp = -1, sp = -1, ss = -1;
    CUtensorMap map, map4, map5;
  };
  static thread_local Last last;
  if (last.kv == p.kv && last.n == p.num_pages && last.lp == p.log2_page && last.sp == p.kv_sp &&
      last.ss == p.kv_ss) {
    kp->tmap = last.map;
    kp->tmap4 = last.map4;
    kp->tmap5 = last.map5;
    return cudaSuccess;
  }
  EncodeTiledFn fn = encode_fn();
  if (fn == nullptr) return cudaErrorNotSupported;
  // FP8 (v3): bytes, no swizzle (the kernel expands each group to the 16-bit swizzled layout)
  const CUtensorMapDataType dt = KV_FP8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                 : std::is_same<KT, __nv_bfloat16>::value ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUtensorMapSwizzle swz = KV_FP8 ? CU_TENSOR_MAP_SWIZZLE_NONE : CU_TENSOR_MAP_SWIZZLE_128B;
  void* base = const_cast<void*>(static_cast<const void*>(p.kv));
  const int64_t page = int64_t(1) << p.log2_page;
  const cuuint32_t rows = static_cast<cuuint32_t>(page < TILE_N ? page : TILE_N);
  const cuuint64_t row_b = static_cast<cuuint64_t>(p.kv_ss) * sizeof(KT);
  const cuuint64_t page_b = static_cast<cuuint64_t>(p.kv_sp) * sizeof(KT);
  const cuuint32_t estr[4] = {1, 1, 1, 1};
  CUtensorMap map, map4, map5;
  {
    const cuuint64_t dims[3] = {static_cast<cuuint64_t>(DK), static_cast<cuuint64_t>(page),
                                static_cast<cuuint64_t>(p.num_pages)};
    const cuuint64_t strides[2] = {row_b, page_b};
    const cuuint32_t box[3] = {64, rows, 1};
    if (fn(&map, dt, 3, base, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
           swz, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      return cudaErrorInvalidValue;
  }
  {  // the dim blocks as a dimension of their own, 128 bytes apart
    const cuuint64_t dims[4] = {64, static_cast<cuuint64_t>(page), static_cast<cuuint64_t>(DK / 64),
                                static_cast<cuuint64_t>(p.num_pages)};
    const cuuint64_t strides[3] = {row_b, 64 * sizeof(KT), page_b};
    cuuint32_t box[4] = {64, rows, 4, 1};
    if (fn(&map4, dt, 4, base, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
           swz, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      return cudaErrorInvalidValue;
    box[2] = 5;
    if (fn(&map5, dt, 4, base, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
           swz, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      return cudaErrorInvalidValue;
  }
  last.kv = p.kv; last.n = p.num_pages; last.lp = p.log2_page; last.sp = p.kv_sp; last.ss = p.kv_ss;
  last.map = map;
  last.map4 = map4;
  last.map5 = map5;
  kp->tmap = map;
  kp->tmap4 = map4;
  kp->tmap5 = map5;
  return cudaSuccess;
}
