// CUDA emulation: the CUDA built-ins and runtime calls that csrc/cuda/ uses, for host execution of
// the real kernel sources (docs/emulation.md). Compiled only with PDDM_EXT_CUDA_EMULATION defined
// (csrc/cuda/cuda_compat.cuh includes this header instead of the CUDA headers).
//
// Model: a launch runs its blocks one after another on the calling OS thread; the threads of a
// block are cooperative fibers (csrc/emulation/cuda_emu.cpp) that run one at a time, each until it
// reaches a barrier (__syncthreads, a warp shuffle, __syncwarp), yields (__nanosleep) or returns.
// The order in which the runnable threads run between barriers is PDDM_EMU_ORDER (forward |
// reverse | random[:seed], default random:0x5eed). Shared memory (dynamic and static) starts every
// block filled with 0xff bytes, a NaN in float and double. Asynchronous copies (cp.async) poison
// their destination when they start and land only at the issuing thread's wait. The device model (limits of an H200,
// sm_90) rejects launches the real runtime rejects; a barrier that some threads never reach is
// reported as a deadlock naming the kernel instead of hanging.
#pragma once

#ifndef PDDM_EXT_CUDA_EMULATION
#error "cuda_emu.h is the CUDA emulation: build with PDDM_EXT_CUDA_EMULATION=1 (make cuda-emulate)"
#endif
#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers and vector types ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

// ---- runtime types ------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorInvalidDeviceFunction = 98,
};
using cudaStream_t = struct CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrComputeCapabilityMajor = 75,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0, constSizeBytes = 0, localSizeBytes = 0;
  int maxThreadsPerBlock = 0, numRegs = 0, ptxVersion = 90, binaryVersion = 90, cacheModeCA = 0;
  int maxDynamicSharedSizeBytes = 0, preferredShmemCarveout = -1;
};

namespace pddm_emu {

// The H200 (sm_90) limits of the device model.
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 2147483647u, kMaxGridYZ = 65535u;
constexpr unsigned kMaxBlockXY = 1024u, kMaxBlockZ = 64u;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kMaxSmemPerBlockOptin = 227 * 1024;
constexpr size_t kMaxStaticSmem = 48 * 1024;
constexpr size_t kSmemPerSm = 228 * 1024;
constexpr int kSmCount = 132;  // the default of sm_count()
constexpr int kMaxThreadsPerSm = 2048, kMaxBlocksPerSm = 32;

struct ThreadState;  // one emulated thread (cuda_emu.cpp)
struct BlockState;   // the running block

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Synchronisation points; each may switch to another emulated thread.
void syncthreads();
int syncthreads_count(int predicate);  // a barrier; returns how many threads passed a nonzero predicate
void syncwarp(unsigned mask);
void yield_thread();
// Warp exchange: the calling lane publishes `bytes` bytes, waits for its warp, then reads lane src's.
void warp_exchange(const void* mine, void* theirs, size_t bytes, int src_lane, unsigned mask);
int lane_id();

// Shared memory of the running block: the dynamic buffer, and the next static variable of the
// calling thread (every thread declares the same variables in the same order).
unsigned char* dynamic_shared();
void* static_shared(size_t bytes, size_t align, const char* name);
// PDDM_SHARED_DECLARED(): true in the attribute probe, which stops the kernel there.
bool probing();

// The device's multiprocessor count (cudaDevAttrMultiProcessorCount): PDDM_EMU_SM_COUNT, read at
// every query (so a test can emulate a smaller or larger GPU), default kSmCount.
int sm_count();
// The budget of the CUDA backward's per-block buffers (csrc/cuda/backward_sizing.h):
// PDDM_EMU_BACKWARD_BUDGET bytes, read at every call, default `fallback` (the real build's).
int64_t backward_budget_bytes(int64_t fallback);

// Asynchronous copies global -> shared of the calling thread (cp.async; the hooks copy_async,
// copy_async_commit, copy_async_wait_all of cuda_compat.cuh). copy_async checks the hardware's
// requirements (4, 8 or 16 bytes, both addresses aligned to the size, the destination in the block's
// shared memory, the source outside it), reads the source and fills the destination with poison
// (0xff bytes, NaN) at once: until the copy lands, a read of it returns NaN, as reading a cp.async
// destination before the wait is undefined on a GPU. commit closes the thread's open group (no
// effect here: wait_all commits and lands every copy of the thread, as on a GPU). Copies never
// waited for do not land.
void copy_async(void* dst, const void* src, size_t bytes);
void copy_async_commit();
void copy_async_wait_all();

// ---- launches -----------------------------------------------------------------------------------
struct Launch {
  const char* name;
  const void* func;
  dim3 grid, block;
  size_t smem;
  void (*body)(void*);  // runs the kernel for the current emulated thread
  void* ctx;
  void (*probe)(const void*);  // probe_kernel<Params...>
};

// Calls the kernel func with value-initialised parameters in the attribute probe: the kernel
// declares its shared memory and returns at PDDM_SHARED_DECLARED(), so the device model knows its
// static shared memory before the first launch (what the compiler knows for a real kernel).
template <typename... Params>
void probe_kernel(const void* func) {
  reinterpret_cast<void (*)(Params...)>(const_cast<void*>(func))(std::remove_cvref_t<Params>{}...);
}
// Checks the configuration against the device model, runs every block; returns the launch's error
// (also kept for cudaGetLastError) with a message for check_launch.
cudaError_t launch(const Launch& l);
// The kernel name and grid.x of every launch, and the notes of log_note, since the last call (the
// latest 4096 kept), oldest first; clears the log. Lets the tests see what a launcher chose.
std::vector<std::pair<std::string, int64_t>> take_launch_log();
void log_note(const char* what, int64_t value);

template <typename... Params>
class Launcher {
 public:
  Launcher(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t)
      : name_(name), kernel_(kernel), grid_(grid), block_(block), smem_(smem) {}
  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launch: wrong number of arguments");
    auto call = [&]() { kernel_(args...); };  // each thread gets its own copies of the parameters
    using Call = decltype(call);
    launch(Launch{name_, reinterpret_cast<const void*>(kernel_), grid_, block_, smem_,
                  [](void* c) { (*static_cast<Call*>(c))(); }, &call, &probe_kernel<Params...>});
  }

 private:
  const char* name_;
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t smem_;
};

template <typename... Params>
Launcher<Params...> make_launcher(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t stream) {
  return Launcher<Params...>(name, kernel, grid, block, smem, stream);
}

// cudaGetLastError with the message of the failed launch; throws c10::Error on an error.
void check_launch(const char* file, int line);
void check_call(cudaError_t err, const char* expr, const char* file, int line);

// Per-kernel attributes of the device model.
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* func, void (*probe)(const void*));
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value, void (*probe)(const void*));
cudaError_t occupancy(int* blocks, const void* func, int threads, size_t smem, void (*probe)(const void*));
// The dynamic shared memory of the last launch of the kernel of that name (PDDM_LAUNCH's spelling,
// e.g. "scores_kernel<T>") in this process; -1 if none. For tests of the launchers' plans.
int64_t last_launch_smem(const std::string& name);

// The device the emulated kernels accept: CPU tensors (an emulation build has no CUDA kernels).
void check_device(const c10::Device& device);

}  // namespace pddm_emu

// ---- built-in variables -----------------------------------------------------------------------
#define threadIdx (::pddm_emu::thread_idx())
#define blockIdx (::pddm_emu::block_idx())
#define blockDim (::pddm_emu::block_dim())
#define gridDim (::pddm_emu::grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads() { ::pddm_emu::syncthreads(); }
inline int __syncthreads_count(int predicate) { return ::pddm_emu::syncthreads_count(predicate); }
inline int __syncthreads_or(int predicate) { return ::pddm_emu::syncthreads_count(predicate) != 0; }
inline int __syncthreads_and(int predicate) {
  return ::pddm_emu::syncthreads_count(predicate) == int(blockDim.x * blockDim.y * blockDim.z);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::pddm_emu::syncwarp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { ::pddm_emu::yield_thread(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "__shfl_xor_sync: 16-byte values at most");
  const int lane = ::pddm_emu::lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the lane's segment: own value
  T out;
  ::pddm_emu::warp_exchange(&v, &out, sizeof(T), src, mask);
  return out;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "__shfl_sync: 16-byte values at most");
  const int lane = ::pddm_emu::lane_id();
  T out;
  ::pddm_emu::warp_exchange(&v, &out, sizeof(T), (lane & ~(width - 1)) + (src_lane & (width - 1)), mask);
  return out;
}

// The lanes of mask whose predicate is nonzero, as a bit mask (a warp barrier: butterfly shuffles).
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  unsigned bits = predicate != 0 ? 1u << ::pddm_emu::lane_id() : 0u;
  for (int offset = 16; offset > 0; offset >>= 1) bits |= __shfl_xor_sync(mask, bits, offset);
  return bits & mask;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- atomics (real atomics: launches from several host threads run concurrently) --------------
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <typename F, typename U>
inline F pddm_emu_atomic_add_float(F* p, F v) {
  static_assert(sizeof(F) == sizeof(U), "same width");
  U* bits = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(bits, __ATOMIC_SEQ_CST);
  while (true) {
    F f;
    std::memcpy(&f, &old, sizeof(F));
    const F sum = f + v;
    U next;
    std::memcpy(&next, &sum, sizeof(F));
    if (__atomic_compare_exchange_n(bits, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return f;
  }
}
inline float atomicAdd(float* p, float v) { return pddm_emu_atomic_add_float<float, uint32_t>(p, v); }
inline double atomicAdd(double* p, double v) { return pddm_emu_atomic_add_float<double, uint64_t>(p, v); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicCAS(int* p, int compare, int value) {
  __atomic_compare_exchange_n(p, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // the old value, whether or not the exchange happened
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long value) {
  __atomic_compare_exchange_n(p, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }

// ---- runtime calls ------------------------------------------------------------------------------
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = pddm_emu::kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = int(pddm_emu::kMaxGridX); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(pddm_emu::kDefaultDynamicSmem); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = pddm_emu::sm_count(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = int(pddm_emu::kSmemPerSm); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(pddm_emu::kMaxSmemPerBlockOptin); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename... P>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(P...)) {
  return pddm_emu::func_get_attributes(attr, reinterpret_cast<const void*>(kernel), &pddm_emu::probe_kernel<P...>);
}
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return pddm_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value, &pddm_emu::probe_kernel<P...>);
}
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...), int threads,
                                                                 size_t smem) {
  return pddm_emu::occupancy(blocks, reinterpret_cast<const void*>(kernel), threads, smem,
                             &pddm_emu::probe_kernel<P...>);
}
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();

#define C10_CUDA_CHECK(EXPR) ::pddm_emu::check_call((EXPR), #EXPR, __FILE__, __LINE__)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::pddm_emu::check_launch(__FILE__, __LINE__)

// ---- 16-bit floating types (cuda_fp16.h, cuda_bf16.h) -----------------------------------------------
// c10's types have the same bits and round float to nearest even, as __float2half_rn and
// __float2bfloat16_rn do (overflow to inf, subnormals kept).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) {
  return __half(v);
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  return __nv_bfloat16(v);
}

// ---- warp matrix functions (nvcuda::wmma) ------------------------------------------------------------
// The subset of <mma.h> the tile kernels use: TF32 m16n16k8 fragments (matrix_a, matrix_b with
// precision::tf32, float accumulators), float16 / bfloat16 m16n16k16 fragments (__half /
// __nv_bfloat16 operands, float accumulators), fill_fragment, load_matrix_sync, mma_sync,
// store_matrix_sync and __float_to_tf32. Model:
// - every call is warp-collective: a warp barrier of all 32 lanes at which all must be in the same
//   function (divergent .sync.aligned code is undefined on a GPU; here an error or a deadlock);
// - load/store check the hardware's requirements: a 256-bit aligned pointer and ldm a multiple of
//   16 bytes;
// - an operand fragment holds its whole matrix in every lane (num_elements = rows * cols; on a GPU
//   each lane holds a share of unspecified layout); an accumulator fragment holds elements
//   lane + 32 t of its row-major matrix (8 per lane, as on a GPU, whose layout is also unspecified):
//   code may only apply element-wise operations to x[], as on a GPU;
// - store_matrix_sync writes only the calling lane's accumulator elements, so a lane that reads
//   another lane's stored elements without a barrier in between reads poison (NaN);
// - __float_to_tf32 rounds to 10 explicit mantissa bits, to nearest with ties away from zero
//   (cvt.rna.tf32.f32); mma_sync requires its TF32 operands to be such values (an unconverted
//   operand is undefined behaviour in CUDA's documentation: here an error) and computes each
//   d = c + sum_k a_k b_k with the products exact (11-bit significands) and one rounding toward zero
//   to float (Ampere/Hopper tensor cores truncate rather than round: Fasi et al., "Numerical behavior
//   of NVIDIA tensor cores", 2021; they also truncate while aligning the terms, which this model does
//   not, so the hardware's error per call can exceed this one's by about a float32 ulp). The dominant
//   error, the TF32 rounding of the operands, is the hardware's exactly;
// - with __half / __nv_bfloat16 operands the operands are already of their type (rounded by the
//   code that stored them: __float2half_rn / __float2bfloat16_rn), and mma_sync computes the same
//   way: exact products (11- and 8-bit significands), one rounding toward zero to float per call.
namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};
// A warp barrier at which every lane must have called the same function (.sync.aligned).
inline void collective(const char* what) {
  const char* lane0 = nullptr;
  ::pddm_emu::warp_exchange(&what, &lane0, sizeof(what), 0, 0xffffffffu);
  TORCH_CHECK(std::strcmp(lane0, what) == 0, "CUDA emulation: ", what, " is warp-collective: lane ",
              ::pddm_emu::lane_id(), " reached it while lane 0 was at ", lane0);
}
inline void check_pointer(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % 32 == 0, "CUDA emulation: ", what,
              ": the pointer must be 256-bit (32-byte) aligned");
  TORCH_CHECK((size_t(ldm) * elem_bytes) % 16 == 0, "CUDA emulation: ", what, ": ldm (", ldm,
              " elements) must be a multiple of 16 bytes");
}
inline bool is_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x1fffu) == 0 || (u & 0x7f800000u) == 0x7f800000u;
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows, cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr bool is_accumulator = std::is_same_v<Use, accumulator>;
  static constexpr int num_elements = is_accumulator ? rows * cols / 32 : rows * cols;
  element_type x[num_elements];
};

inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;  // magnitude rounds half away from zero
  std::memcpy(&v, &u, sizeof(u));
  return v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  detail::collective("fill_fragment");
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(v);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                             const typename fragment<Use, M, N, K, T, Layout>::element_type* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!F::is_accumulator, "load_matrix_sync of an accumulator takes a layout_t");
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>, "an operand layout");
  detail::check_pointer(p, ldm, sizeof(typename F::element_type), "load_matrix_sync");
  detail::collective("load_matrix_sync");
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
    }
  }
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, T>;
  detail::check_pointer(p, ldm, sizeof(T), "store_matrix_sync");
  detail::collective("store_matrix_sync");
  const int lane = ::pddm_emu::lane_id();
  for (int t = 0; t < F::num_elements; ++t) {
    const int e = lane + 32 * t, r = e / F::cols, c = e % F::cols;
    p[layout == mem_row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r] = f.x[t];
  }
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  constexpr bool tf32 = std::is_same_v<TA, precision::tf32> && std::is_same_v<TB, precision::tf32>;
  constexpr bool half16 = (std::is_same_v<TA, __half> && std::is_same_v<TB, __half>) ||
                          (std::is_same_v<TA, __nv_bfloat16> && std::is_same_v<TB, __nv_bfloat16>);
  static_assert((tf32 || half16) && std::is_same_v<TC, float>,
                "the emulation models TF32, float16 and bfloat16 operands (one type for both) with float accumulators");
  static_assert(M == 16 && N == 16 && K == (tf32 ? 8 : 16), "the emulation models m16n16k8 (TF32) and m16n16k16 (16-bit)");
  detail::collective("mma_sync");
  if constexpr (tf32) {
    for (const float v : a.x) TORCH_CHECK(detail::is_tf32(v), "CUDA emulation: mma_sync: a matrix_a element is not a TF32 value (convert it with __float_to_tf32)");
    for (const float v : b.x) TORCH_CHECK(detail::is_tf32(v), "CUDA emulation: mma_sync: a matrix_b element is not a TF32 value (convert it with __float_to_tf32)");
  }
  const int lane = ::pddm_emu::lane_id();
  using D = fragment<accumulator, M, N, K, TC>;
  float out[D::num_elements];
  for (int t = 0; t < D::num_elements; ++t) {
    const int e = lane + 32 * t, r = e / N, col = e % N;
    double s = c.x[t];
    for (int k = 0; k < K; ++k) s += double(float(a.x[r * K + k])) * double(float(b.x[k * N + col]));
    float rounded = float(s);
    if (std::fabs(double(rounded)) > std::fabs(s)) rounded = std::nextafter(rounded, 0.0f);  // toward zero
    out[t] = rounded;
  }
  for (int t = 0; t < D::num_elements; ++t) d.x[t] = out[t];
}
}  // namespace nvcuda::wmma
