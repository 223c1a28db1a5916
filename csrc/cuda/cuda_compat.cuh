// The source hooks of the CUDA emulation (docs/emulation.md): the few constructs of csrc/cuda/ that
// plain C++ cannot spell are written with these macros. In a CUDA build they are the CUDA syntax;
// with PDDM_EXT_CUDA_EMULATION (make cuda-emulate) they map to csrc/emulation/cuda_emu.h, which
// runs the same kernel bodies on the CPU.
//
//   PDDM_LAUNCH(kernel, grid, block, smem, stream)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   PDDM_DYNAMIC_SHARED(name);                                extern __shared__ __align__(128) unsigned char name[];
//   PDDM_SHARED(name, type);                                  __shared__ type name;  (type may be an array type)
//   PDDM_SHARED_DECLARED();                                   after a kernel's shared declarations, before anything else
//   DeviceGuard, current_stream()                             c10::cuda::CUDAGuard, the current CUDA stream
//   TORCH_LIBRARY_IMPL(pddm_ext, PDDM_CUDA_DISPATCH_KEY, m)   the CUDA key (the CPU key in the emulation)
//
// and the asynchronous copies from global to shared memory of pair_gemm's staging (functions in
// pddm_ext::cuda; per thread, as cp.async):
//   copy_async(dst, src)      starts copying *src (global) to *dst (shared), sizeof(T) = 4, 8 or 16
//                             bytes, both aligned to it: cp.async.ca.shared.global on sm_80 and later,
//                             a plain copy (*dst = *src) before
//   copy_async_commit()       closes the group of the calling thread's copies started since the last
//                             one: cp.async.commit_group (nothing before sm_80)
//   copy_async_wait_all()     returns when all of the calling thread's copies are complete:
//                             cp.async.wait_all (nothing before sm_80); other threads see them after
//                             a barrier that follows it
// The emulation models them (cuda_emu.h): a copy's destination reads as poison (NaN) from its start
// until the calling thread's wait.
#pragma once

#include <c10/core/Device.h>

namespace pddm_ext::cuda {
template <typename T>
using shared_type_t = T;  // lets PDDM_SHARED declare arrays: shared_type_t<float[8][8]> name
}  // namespace pddm_ext::cuda

#ifdef PDDM_EXT_CUDA_EMULATION
#ifdef PDDM_EXT_WITH_CUDA
#error "PDDM_EXT_CUDA_EMULATION and a real CUDA build exclude each other"
#endif
#include "../emulation/cuda_emu.h"

namespace pddm_ext::cuda {
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device& device) { ::pddm_emu::check_device(device); }
};
inline cudaStream_t current_stream() { return nullptr; }
}  // namespace pddm_ext::cuda

#define PDDM_CUDA_DISPATCH_KEY CPU
#define PDDM_LAUNCH(kernel, grid, block, smem, stream) ::pddm_emu::make_launcher(#kernel, kernel, grid, block, smem, stream)
#define PDDM_DYNAMIC_SHARED(name) unsigned char* const name = ::pddm_emu::dynamic_shared()
#define PDDM_SHARED(name, ...)                                                                         \
  auto& name = *static_cast<::pddm_ext::cuda::shared_type_t<__VA_ARGS__>*>(                            \
      ::pddm_emu::static_shared(sizeof(::pddm_ext::cuda::shared_type_t<__VA_ARGS__>),                  \
                                alignof(::pddm_ext::cuda::shared_type_t<__VA_ARGS__>), #name))
#define PDDM_SHARED_DECLARED() \
  if (::pddm_emu::probing()) return

namespace pddm_ext::cuda {
template <typename T>
inline void copy_async(T* dst, const T* src) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16, "cp.async copies 4, 8 or 16 bytes");
  ::pddm_emu::copy_async(dst, src, sizeof(T));
}
inline void copy_async_commit() { ::pddm_emu::copy_async_commit(); }
inline void copy_async_wait_all() { ::pddm_emu::copy_async_wait_all(); }
}  // namespace pddm_ext::cuda

#else  // a real CUDA build
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

namespace pddm_ext::cuda {
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace pddm_ext::cuda

#define PDDM_CUDA_DISPATCH_KEY CUDA
#define PDDM_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define PDDM_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define PDDM_SHARED(name, ...) __shared__ ::pddm_ext::cuda::shared_type_t<__VA_ARGS__> name
#define PDDM_SHARED_DECLARED() \
  do {                         \
  } while (0)

namespace pddm_ext::cuda {
template <typename T>
__device__ __forceinline__ void copy_async(T* dst, const T* src) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst_shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst_shared), "l"(__cvta_generic_to_global(src)),
               "n"(int(sizeof(T))));
#else
  *dst = *src;
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n");
#endif
}
__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
}  // namespace pddm_ext::cuda
#endif
