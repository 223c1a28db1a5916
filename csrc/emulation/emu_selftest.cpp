// Small kernels that test the CUDA emulation itself (tests/test_cuda.py, emulated backend only):
// the thread orders, the NaN-poisoned shared memory, the deadlock report, the launch limits of the
// device model, the warp shuffle and the atomics. Registered as torch.ops.pddm_emu_test.* in the
// emulation build only (setup.py compiles csrc/emulation/ only there).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cuda/cuda_compat.cuh"

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

}  // namespace

TORCH_LIBRARY(pddm_emu_test, m) {
  m.def("thread_order(int threads) -> Tensor", &thread_order);
  m.def("unwritten_shared(int threads) -> Tensor", &unwritten_shared);
  m.def("divergent_barrier(int mode) -> ()", &divergent_barrier);
  m.def("launch_count(int grid_x, int grid_y, int threads, int smem, int opt_in) -> int", &launch_count);
  m.def("warp_sums(int threads) -> Tensor", &warp_sums);
  m.def("atomics(int blocks, int threads) -> Tensor", &atomics);
}

}  // namespace pddm_emu_test
