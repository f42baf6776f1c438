{#- Host entry points (C ABI) shared by the wgmma latent-MLA kernels. The including template
    defines xqa::xqa_mla_kernel and xqa::launch_mla(params, grid, stream) -> cudaError_t. -#}
// ---------------------------------------------------------------- host entry points (C ABI)
extern "C" {

// Geometry the Python side needs: threads, smem, 0, tile tokens, heads per block (valid rows),
// head groups, the most splits one launch may use.
int xqa_info(int64_t* out, int n) {
  const int64_t v[7] = {xqa::NTHREADS, xqa::SMEM_BYTES, 0, xqa::TILE_N, xqa::HV, xqa::NHG,
                        xqa::MAX_SPLITS};
  for (int i = 0; i < n && i < 7; ++i) out[i] = v[i];
  return 0;
}

static int set_smem_attr(int device) {
  static bool done[64] = {false};
  if (device >= 0 && device < 64 && done[device]) return 0;
  cudaError_t e = cudaFuncSetAttribute(xqa::xqa_mla_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, xqa::SMEM_BYTES);
  if (e == cudaSuccess && device >= 0 && device < 64) done[device] = true;
  return static_cast<int>(e);
}

int xqa_occupancy(int device) {
  int prev = -1;
  cudaGetDevice(&prev);
  if (prev != device) cudaSetDevice(device);
  int nb = 0;
  if (set_smem_attr(device) == 0)
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, xqa::xqa_mla_kernel, xqa::NTHREADS,
                                                  xqa::SMEM_BYTES);
  if (prev != device) cudaSetDevice(prev);
  return nb;
}

// Launch on `stream` of `device` (the tensors' device, which need not be the current one).
int xqa_launch(const char* params, void* stream, int device) {
  xqa::Params p;
  memcpy(&p, params, sizeof(p));
  int prev = -1;
  cudaGetDevice(&prev);
  if (prev != device) cudaSetDevice(device);
  int rc = set_smem_attr(device);
  if (rc == 0) {
    dim3 grid(xqa::NHG, static_cast<unsigned>(p.splits), static_cast<unsigned>(p.batch));
    rc = static_cast<int>(xqa::launch_mla(p, grid, static_cast<cudaStream_t>(stream)));
  }
  if (prev != device) cudaSetDevice(prev);
  return rc;
}

}  // extern "C"
