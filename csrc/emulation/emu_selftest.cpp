// Small kernels that test the CUDA emulation itself (tests/test_cuda.py, emulated backend only):
// the thread orders, the NaN-poisoned shared memory, the deadlock report, the launch limits of the
// device model, the warp shuffle, the atomics, the warp matrix functions (WMMA) and the asynchronous
// copies (cp.async). Registered as
// torch.ops.pddm_emu_test.* in the emulation build only (setup.py compiles csrc/emulation/ only there).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cuda/backward_sizing.h"
#include "../cuda/cuda_compat.cuh"
#include "../cuda/pddm_tile.cuh"  // round_operand, as HalfTensorCoreBlock rounds

namespace pddm_emu_test {
namespace {

// Each thread appends its index to `order` between two barriers: the order threads ran in.
__global__ void order_kernel(int64_t* order, int* count) {
  PDDM_SHARED_DECLARED();
  __syncthreads();
  order[atomicAdd(count, 1)] = threadIdx.x;
  __syncthreads();
}

// out[0, t] = the unwritten dynamic shared float of thread t; out[1, t] = the unwritten static one.
__global__ void unwritten_shared_kernel(float* out) {
  PDDM_DYNAMIC_SHARED(smem);
  PDDM_SHARED(stat, float[64]);
  PDDM_SHARED_DECLARED();
  const int t = threadIdx.x;
  out[t] = reinterpret_cast<float*>(smem)[t];
  out[blockDim.x + t] = stat[t % 64];
}

// mode 0: thread 5 skips the barrier; mode 1: half a warp skips a shuffle; mode 2: every thread
// spins on a flag nobody sets.
__global__ void divergent_barrier_kernel(int mode, int* flag) {
  PDDM_SHARED_DECLARED();
  if (mode == 0) {
    if (threadIdx.x != 5) __syncthreads();
  } else if (mode == 1) {
    int v = int(threadIdx.x);
    if (threadIdx.x % 32 < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);
    flag[1] = v;
  } else {
    while (atomicCAS(flag, 1, 1) == 0) __nanosleep(10);
  }
}

// Every thread of every block adds 1: out[0] = the number of threads that ran.
__global__ void count_kernel(int* out) {
  PDDM_SHARED_DECLARED();
  atomicAdd(out, 1);
}

// sums[t] = sum over the lanes of t's warp of (lane + 1), by butterfly shuffles.
__global__ void warp_sum_kernel(double* sums) {
  PDDM_SHARED_DECLARED();
  double v = double(threadIdx.x % 32 + 1);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  sums[threadIdx.x] = v;
}

// The atomics the kernels use, from every thread of every block.
__global__ void atomics_kernel(float* f, double* d, int* i, unsigned long long* u, int* lock, int* exch) {
  PDDM_SHARED_DECLARED();
  const unsigned long long id = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  atomicAdd(f, 0.5f);
  atomicAdd(d, 0.25);
  atomicAdd(i, 1);
  atomicAdd(u, 1ull);
  atomicMin(u + 1, 1000 + id);
  atomicMax(u + 2, 1000 + id);
  while (atomicCAS(lock, 0, 1) != 0) __nanosleep(10);
  __threadfence();
  *(lock + 1) += 1;  // guarded by the lock
  __threadfence();
  atomicExch(lock, 0);
  atomicExch(exch, 7);
}

// One warp multiplies a (16 x 8, row-major) by b (8 x 16, row-major) with a TF32 WMMA staged in
// shared memory; out[lane] = the 16 x 16 product as lane read it back. mode 0: as the tile kernels
// do it (operands converted by __float_to_tf32, a __syncwarp between the store and the reads);
// 1: operands not converted; 2: no __syncwarp before the reads; 3: a misaligned operand pointer;
// 4: lanes 16-31 skip the mma.
__global__ void wmma_kernel(const float* a, const float* b, float* out, int mode) {
  PDDM_DYNAMIC_SHARED(smem);
  PDDM_SHARED_DECLARED();
  using namespace nvcuda::wmma;
  float* sa = reinterpret_cast<float*>(smem) + (mode == 3 ? 4 : 0);
  float* sb = reinterpret_cast<float*>(smem) + 256;
  float* sc = reinterpret_cast<float*>(smem) + 512;
  const int lane = threadIdx.x;
  for (int e = lane; e < 128; e += 32) {
    sa[e] = a[e];
    sb[e] = b[e];
  }
  __syncwarp();
  fragment<matrix_a, 16, 16, 8, precision::tf32, row_major> fa;
  fragment<matrix_b, 16, 16, 8, precision::tf32, row_major> fb;
  fragment<accumulator, 16, 16, 8, float> fc;
  fill_fragment(fc, 0.0f);
  load_matrix_sync(fa, sa, 8);
  load_matrix_sync(fb, sb, 16);
  if (mode != 1) {
    for (int t = 0; t < fa.num_elements; ++t) fa.x[t] = __float_to_tf32(fa.x[t]);
    for (int t = 0; t < fb.num_elements; ++t) fb.x[t] = __float_to_tf32(fb.x[t]);
  }
  if (mode != 4 || lane < 16) mma_sync(fc, fa, fb, fc);
  store_matrix_sync(sc, fc, 16, mem_row_major);
  if (mode != 2) __syncwarp();
  for (int e = 0; e < 256; ++e) out[lane * 256 + e] = sc[e];
}

// One warp multiplies a (16 x 16) by b (16 x 16) with a 16-bit WMMA (H = __half or __nv_bfloat16) as
// the tile kernels' HalfTensorCoreBlock does: float32 operands rounded to H into shared memory
// (__float2half_rn / __float2bfloat16_rn), a column-major matrix_a, a row-major matrix_b, float
// accumulators; out[lane] = the product as lane read it back. mode 1: a misaligned matrix_a pointer.
template <typename H>
__global__ void wmma_half_kernel(const float* a, const float* b, float* out, int mode) {
  PDDM_DYNAMIC_SHARED(smem);
  PDDM_SHARED_DECLARED();
  using namespace nvcuda::wmma;
  H* sa = reinterpret_cast<H*>(smem) + (mode == 1 ? 8 : 0);  // 16 bytes off: not 256-bit aligned
  H* sb = reinterpret_cast<H*>(smem) + 512;
  float* sc = reinterpret_cast<float*>(smem) + 512;
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    sa[c * 16 + r] = pddm_ext::cuda::round_operand<H>(a[e]);  // a column-major
    sb[e] = pddm_ext::cuda::round_operand<H>(b[e]);
  }
  __syncwarp();
  fragment<matrix_a, 16, 16, 16, H, col_major> fa;
  fragment<matrix_b, 16, 16, 16, H, row_major> fb;
  fragment<accumulator, 16, 16, 16, float> fc;
  fill_fragment(fc, 0.0f);
  load_matrix_sync(fa, sa, 16);
  load_matrix_sync(fb, sb, 16);
  mma_sync(fc, fa, fb, fc);
  store_matrix_sync(sc, fc, 16, mem_row_major);
  __syncwarp();
  for (int e = 0; e < 256; ++e) out[lane * 256 + e] = sc[e];
}

at::Tensor wmma_half(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype, int64_t mode) {
  TORCH_CHECK(a.dtype() == at::kFloat && b.dtype() == at::kFloat && a.numel() == 256 && b.numel() == 256,
              "wmma_half: a and b (16, 16) float32");
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "wmma_half: dtype float16 or bfloat16");
  auto out = at::empty({32, 16, 16}, at::kFloat);
  const auto ac = a.contiguous(), bc = b.contiguous();
  const auto kernel = dtype == at::kHalf ? wmma_half_kernel<__half> : wmma_half_kernel<__nv_bfloat16>;
  PDDM_LAUNCH(kernel, 1, 32, 1024 * sizeof(float), nullptr)(ac.data_ptr<float>(), bc.data_ptr<float>(),
                                                            out.data_ptr<float>(), int(mode));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// 64 threads; thread t copies src[t] into shared element t with copy_async. mode 0: out[t] = shared
// element t before the wait, out[64 + t] = shared element (t + 1) % 64 after the wait and a barrier;
// 1: no wait (out[64 + t] read after the barrier); 2: a destination 2 bytes off alignment; 3: a
// source in shared memory; 4: a destination in global memory.
__global__ void copy_async_kernel(const float* src, float* out, int mode) {
  PDDM_DYNAMIC_SHARED(smem);
  PDDM_SHARED_DECLARED();
  using pddm_ext::cuda::copy_async;
  float* sm = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  if (mode == 2) copy_async(reinterpret_cast<float*>(smem + 2), src);
  if (mode == 3) copy_async(sm + 64 + t, sm + t);
  if (mode == 4) copy_async(out + t, src + t);
  copy_async(sm + t, src + t);
  pddm_ext::cuda::copy_async_commit();
  out[t] = sm[t];
  if (mode != 1) pddm_ext::cuda::copy_async_wait_all();
  __syncthreads();
  out[64 + t] = sm[(t + 1) % 64];
}

at::Tensor thread_order(int64_t threads) {
  auto order = at::full({threads}, -1, at::kLong);
  auto count = at::zeros({1}, at::kInt);
  PDDM_LAUNCH(order_kernel, 1, unsigned(threads), 0, nullptr)(order.data_ptr<int64_t>(), count.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return order;
}

at::Tensor unwritten_shared(int64_t threads) {
  auto out = at::zeros({2, threads}, at::kFloat);
  PDDM_LAUNCH(unwritten_shared_kernel, 1, unsigned(threads), size_t(threads) * sizeof(float), nullptr)(
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void divergent_barrier(int64_t mode) {
  auto flag = at::zeros({2}, at::kInt);
  PDDM_LAUNCH(divergent_barrier_kernel, 2, 64, 0, nullptr)(int(mode), flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches count_kernel; opt_in >= 0 first sets cudaFuncAttributeMaxDynamicSharedMemorySize.
int64_t launch_count(int64_t grid_x, int64_t grid_y, int64_t threads, int64_t smem, int64_t opt_in) {
  if (opt_in >= 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(count_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(opt_in)));
  }
  auto out = at::zeros({1}, at::kInt);
  PDDM_LAUNCH(count_kernel, dim3(unsigned(grid_x), unsigned(grid_y)), unsigned(threads), size_t(smem), nullptr)(
      out.data_ptr<int>());
  // Whatever happens, leave the kernel at the default limit for the next test.
  const cudaError_t err = cudaGetLastError();
  C10_CUDA_CHECK(cudaFuncSetAttribute(count_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024));
  C10_CUDA_CHECK(err);
  return out.item<int>();
}

at::Tensor warp_sums(int64_t threads) {
  auto sums = at::zeros({threads}, at::kDouble);
  PDDM_LAUNCH(warp_sum_kernel, 1, unsigned(threads), 0, nullptr)(sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

// (float sum, double sum, int sum, u64 sum, u64 min, u64 max, guarded counter, exchanged value)
at::Tensor atomics(int64_t blocks, int64_t threads) {
  auto f = at::zeros({1}, at::kFloat);
  auto d = at::zeros({1}, at::kDouble);
  auto i = at::zeros({1}, at::kInt);
  auto u = at::tensor({int64_t(0), int64_t(1) << 40, int64_t(0)}, at::kLong);
  auto lock = at::zeros({2}, at::kInt);
  auto exch = at::zeros({1}, at::kInt);
  PDDM_LAUNCH(atomics_kernel, unsigned(blocks), unsigned(threads), 0, nullptr)(
      f.data_ptr<float>(), d.data_ptr<double>(), i.data_ptr<int>(),
      reinterpret_cast<unsigned long long*>(u.data_ptr<int64_t>()), lock.data_ptr<int>(), exch.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return at::stack({f.to(at::kDouble)[0], d[0], i.to(at::kDouble)[0], u.to(at::kDouble)[0], u.to(at::kDouble)[1],
                    u.to(at::kDouble)[2], lock.to(at::kDouble)[1], exch.to(at::kDouble)[0]});
}

at::Tensor copy_async_model(const at::Tensor& src, int64_t mode) {
  TORCH_CHECK(src.dtype() == at::kFloat && src.numel() == 64, "copy_async_model: src (64,) float32");
  auto out = at::empty({2, 64}, at::kFloat);
  const auto s = src.contiguous();
  PDDM_LAUNCH(copy_async_kernel, 1, 64, 128 * sizeof(float), nullptr)(s.data_ptr<float>(), out.data_ptr<float>(),
                                                                       int(mode));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

int64_t last_launch_smem(c10::string_view kernel) {
  return pddm_emu::last_launch_smem(std::string(kernel.data(), kernel.size()));
}

at::Tensor wmma_tf32(const at::Tensor& a, const at::Tensor& b, int64_t mode) {
  TORCH_CHECK(a.dtype() == at::kFloat && b.dtype() == at::kFloat && a.numel() == 128 && b.numel() == 128,
              "wmma_tf32: a (16, 8) and b (8, 16) float32");
  auto out = at::empty({32, 16, 16}, at::kFloat);
  const auto ac = a.contiguous(), bc = b.contiguous();
  PDDM_LAUNCH(wmma_kernel, 1, 32, 768 * sizeof(float), nullptr)(ac.data_ptr<float>(), bc.data_ptr<float>(),
                                                                 out.data_ptr<float>(), int(mode));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// grid.x of the launches (and the values of the notes) since the last call whose kernel name (note)
// contains `name`, oldest first; clears the whole log (pddm_emu::take_launch_log).
std::vector<int64_t> launch_log(c10::string_view name) {
  std::vector<int64_t> grids;
  for (const auto& entry : pddm_emu::take_launch_log()) {
    if (entry.first.find(std::string(name)) != std::string::npos) grids.push_back(entry.second);
  }
  return grids;
}

// The CUDA backward's sizing (csrc/cuda/backward_sizing.h) for shapes too large to run here:
// [grid, columns per launch, per-block buffer bytes of all blocks]. resident: the blocks the device
// holds at once (SMs times blocks per SM), elem_bytes: 4 (float32) or 8 (float64).
std::vector<int64_t> backward_sizing(bool batch, int64_t m, int64_t n, int64_t d, int64_t h, int64_t c, bool need_x,
                                     bool need_y, bool need_params, bool deterministic, int64_t elem_bytes,
                                     int64_t sms, int64_t resident) {
  using namespace pddm_ext::cuda;
  if (batch) n = m, need_y = need_x;
  BackwardBuffers b;
  if (need_params) b.slab_bytes = (2 * h * d + 2 * c * h + 2 * h + 2 * c + 1) * elem_bytes;  // SlabLayout
  if (deterministic) {
    b.row_x_bytes = ((need_x ? d : 0) + (need_x || need_params ? h : 0)) * elem_bytes;
    b.row_y_bytes = batch ? 0 : ((need_y ? d : 0) + (need_y || need_params ? h : 0)) * elem_bytes;
  }
  const int64_t tile = layout::kTile, rt = (m + tile - 1) / tile, ct = (n + tile - 1) / tile;
  const int64_t tiles = batch ? rt * (rt + 1) / 2 : rt * ct;
  const int64_t cap = backward_block_cap(b, m, n, sms, kBackwardBudgetBytes);
  const int64_t blocks = std::max<int64_t>(1, std::min({tiles, resident, cap}));  // plan_launch
  const int64_t chunk = backward_column_chunk(b, batch, m, n, blocks, kBackwardBudgetBytes);
  const int64_t bytes = blocks * (b.slab_bytes + m * b.row_x_bytes + chunk * b.row_y_bytes);
  return {blocks, chunk, bytes};
}

}  // namespace

TORCH_LIBRARY(pddm_emu_test, m) {
  m.def("wmma_tf32(Tensor a, Tensor b, int mode) -> Tensor", &wmma_tf32);
  m.def("wmma_half(Tensor a, Tensor b, ScalarType dtype, int mode) -> Tensor", &wmma_half);
  m.def("copy_async_model(Tensor src, int mode) -> Tensor", &copy_async_model);
  m.def("last_launch_smem(str kernel) -> int", &last_launch_smem);
  m.def("thread_order(int threads) -> Tensor", &thread_order);
  m.def("unwritten_shared(int threads) -> Tensor", &unwritten_shared);
  m.def("divergent_barrier(int mode) -> ()", &divergent_barrier);
  m.def("launch_count(int grid_x, int grid_y, int threads, int smem, int opt_in) -> int", &launch_count);
  m.def("warp_sums(int threads) -> Tensor", &warp_sums);
  m.def("atomics(int blocks, int threads) -> Tensor", &atomics);
  m.def("launch_log(str name) -> int[]", &launch_log);
  m.def("backward_sizing(bool batch, int m, int n, int d, int h, int c, bool need_x, bool need_y, bool need_params, "
        "bool deterministic, int elem_bytes, int sms, int resident) -> int[]", &backward_sizing);
}

}  // namespace pddm_emu_test
