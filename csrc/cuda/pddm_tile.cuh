// Tiled pair scoring on the GPU, shared by the scores forward/backward and the mining kernels.
//
// One thread block (kThreads threads) owns a tile of kTile x kTile pairs at a time: rows
// [i0, i0 + kTile) of x against rows [r0, r0 + kTile) of y, pair p = a * kTile + b for
// (i0 + a, r0 + b). Blocks are persistent: each walks tiles t = blockIdx.x, + gridDim.x, ... so the
// tile count may exceed any grid limit and per-block state (mining heaps, gradient partials) lives
// across tiles. Per tile (docs/design.md#the-pddm-unit):
//   phase 0  ||u|| and ||v|| of every pair (one warp per pair);
//   phase 1  A = W_u |x_i - y_r|: |x_i - y_r| is built on the fly, chunk by chunk of d, into shared
//            memory next to a chunk of W_u, and multiplied in registers (pair_gemm); the epilogue
//            writes u' = relu(A / max(||u||, eps) + b_u) into the tile's activation block Z;
//   phase 1b v' = relu((P_i + P_r) / (2 max(||v||, eps)) + b_v) from the projections P = x W_v^T;
//   phase 2  Z = [normalize(u'); normalize(v')];
//   phase 3  q = relu(W_c Z + b_c) (pair_gemm again), S = w_s . q + b_s.
// Z (kPairs x 2h) lives in dynamic shared memory when it fits, else in a per-block slice of a
// global scratch buffer: bounded by the grid, never (m, n, h). All row/pair index math is int64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <set>
#include <type_traits>
#include <utility>

#include "../pddm_common.h"
#include "cuda_compat.cuh"

namespace pddm_ext::cuda {

constexpr int kThreads = 256;          // threads per block (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 8;               // PDDM tiles are kTile x kTile pairs
constexpr int kPairs = kTile * kTile;  // 64
constexpr int kChunk = 16;             // reduction chunk staged in shared memory (pair_gemm)
constexpr int kOutBlock = 128;         // outputs per pass of pair_gemm (16 groups x 8)
constexpr int kPairGroups = 16;        // pair_gemm: 16 groups of 4 pairs ...
constexpr int kOutGroups = 16;         // ... times 16 groups of 8 outputs = 256 threads
static_assert(kPairGroups * 4 == kPairs && kPairGroups * kOutGroups == kThreads, "pair_gemm layout");
static_assert(kOutGroups * 8 == kOutBlock, "pair_gemm layout");

// Shared-memory staging of pair_gemm, both chunks stored k-major so that each thread reads its 4
// operands and its 8 weights of one k with 16-byte loads: the operand chunk (kChunk x kPairs) and
// the weight chunk (kChunk x kOutBlock). Rows are padded by 4 elements (kept 16-byte aligned)
// against bank conflicts when the chunks are filled.
constexpr int kAStride = kPairs + 4;
constexpr int kWStride = kOutBlock + 4;
constexpr int kStagingA = kChunk * kAStride;  // elements of the operand chunk; the weight chunk follows
template <typename T>
constexpr size_t pair_gemm_staging_elems() {
  return size_t(kStagingA) + size_t(kChunk) * kWStride;
}

template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
};
template <>
struct Vec16<double> {
  using type = double2;
};

// dst = src[0, N) with 16-byte loads; src must be 16-byte aligned (shared memory).
template <int N, typename T>
__device__ __forceinline__ void load_aligned(T (&dst)[N], const T* src) {
  using V = typename Vec16<T>::type;
  constexpr int per = int(sizeof(V) / sizeof(T));
  static_assert(N % per == 0, "whole 16-byte vectors");
#pragma unroll
  for (int j = 0; j < N; j += per) {
    const V v = *reinterpret_cast<const V*>(src + j);
    memcpy(&dst[j], &v, sizeof(V));
  }
}

template <typename T>
__device__ __forceinline__ T abs_value(T z) {
  return z < T(0) ? -z : z;
}

template <typename T>
__device__ __forceinline__ T sign_of(T z) {
  return z > T(0) ? T(1) : (z < T(0) ? T(-1) : T(0));
}

// Sum over the 32 lanes of a warp; every lane gets the same, order-independent-of-lane result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Pointers into the (contiguous, device) parameters of a PDDM unit, and its form (docs/design.md "The two
// forms"). W_v serves only the near-antipodal pairs (mean_branch_direct); the others use P = x W_v^T.
template <typename T>
struct PddmParams {
  const T *W_u, *b_u, *b_v, *W_c, *b_c, *w_s, *b_s;
  int64_t d, h, c;
  const T* W_v;
  bool normalize_inputs;
};

// The two sides of the pair space and their projections P = rows W_v^T.
template <typename T>
struct PairRows {
  const T *x, *Px;
  int64_t m;
  const T *y, *Py;
  int64_t n;
};

// TileGrid (the tiles of the pair space) is in pddm_common.h, shared with the CPU kernels.

// Per-pair scalars of the current tile (static shared memory).
template <typename T>
struct TileScalars {
  T norm_u[kPairs], norm_v[kPairs];    // ||u||, ||v||
  T inv_u[kPairs], inv_v[kPairs];      // diff_scale, mean_scale (pddm_common.h)
  bool direct[kPairs];                 // mean_branch_direct: W_v (x + y) from x + y, not P_i + P_r
  T norm_u1[kPairs], norm_v1[kPairs];  // ||u'||, ||v'||
  T score[kPairs];
  T partial[kPairs][kOutGroups];       // per-output-group partial scores (summed in a fixed order)
};

// out(p, o) = sum_k operand(p, k) * W(o, k) for the kPairs pairs of the tile and o < N, with
// W(o, k) = W[o * w_out_stride + k * w_red_stride] (so W_c^T and W_u^T need no copy). Calls
// epilogue(p, o, value) once for every (p, o), o < N, or epilogue(p, o, value, q) when it takes a
// fourth argument: q in [0, 4) is p's slot among the calling thread's 4 pairs, a compile-time
// constant after unrolling (an epilogue that indexes its own per-pair registers with it keeps them
// in registers; p - first_pair would be a dynamic index, i.e. local memory). The reduction order
// over k is fixed, so the result is deterministic. Must be called by all threads of the block; ends
// synchronised.
template <typename T, typename Operand, typename Epilogue>
__device__ void pair_gemm(int64_t N, int64_t K, const T* __restrict__ W, int64_t w_out_stride,
                          int64_t w_red_stride, Operand operand, Epilogue epilogue, T* sm_a, T* sm_w) {
  const int tid = threadIdx.x;
  const int pair_group = tid / kOutGroups, out_group = tid % kOutGroups;  // pairs 4 pg.., outputs 8 og..
  const bool w_rows_contiguous = w_red_stride == 1;
  for (int64_t o0 = 0; o0 < N; o0 += kOutBlock) {
    T acc[4][8];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int t = 0; t < 8; ++t) acc[q][t] = T(0);
    }
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      for (int e = tid; e < kPairs * kChunk; e += kThreads) {
        const int p = e / kChunk, kk = e % kChunk;  // consecutive threads: consecutive k of one pair
        sm_a[kk * kAStride + p] = k0 + kk < K ? operand(p, k0 + kk) : T(0);
      }
      for (int e = tid; e < kOutBlock * kChunk; e += kThreads) {
        // Walk the weight chunk along whichever of its axes is contiguous in memory (coalescing).
        const int oo = w_rows_contiguous ? e / kChunk : e % kOutBlock;
        const int kk = w_rows_contiguous ? e % kChunk : e / kOutBlock;
        const int64_t o = o0 + oo, k = k0 + kk;
        sm_w[kk * kWStride + oo] = (o < N && k < K) ? W[o * w_out_stride + k * w_red_stride] : T(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kChunk; ++kk) {
        T a[4], w[8];
        load_aligned(a, sm_a + kk * kAStride + pair_group * 4);
        load_aligned(w, sm_w + kk * kWStride + out_group * 8);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
#pragma unroll
          for (int t = 0; t < 8; ++t) acc[q][t] += a[q] * w[t];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int64_t o = o0 + out_group * 8 + t;
        if (o < N) {
          if constexpr (std::is_invocable_v<Epilogue, int, int64_t, T, int>) {
            epilogue(pair_group * 4 + q, o, acc[q][t], q);
          } else {
            epilogue(pair_group * 4 + q, o, acc[q][t]);
          }
        }
      }
    }
  }
  __syncthreads();
}

// Row of pair p's x side / y side, clamped into range so padded pairs of edge tiles read valid
// memory (their results are never used).
__device__ __forceinline__ int64_t pair_row(int64_t i0, int p, int64_t m) {
  const int64_t i = i0 + p / kTile;
  return i < m ? i : m - 1;
}
__device__ __forceinline__ int64_t pair_col(int64_t r0, int p, int64_t n) {
  const int64_t r = r0 + p % kTile;
  return r < n ? r : n - 1;
}

// Row k of W_v (x_i + y_r) for pair p: P_i + P_r, or for a near-antipodal pair the direct product.
template <typename T>
__device__ __forceinline__ T mean_pre_projection(const PddmParams<T>& w, const PairRows<T>& rows,
                                                 const TileScalars<T>& ts, int64_t i0, int64_t r0, int p, int64_t k) {
  const int64_t i = pair_row(i0, p, rows.m), r = pair_col(r0, p, rows.n);
  if (ts.direct[p]) return mean_projection_direct(w.W_v + k * w.d, rows.x + i * w.d, rows.y + r * w.d, w.d);
  return rows.Px[i * w.h + k] + rows.Py[r * w.h + k];
}

// Phases 0-2: leaves Z[p * 2h + k] = [normalize(u'); normalize(v')] of every pair of the tile and
// the per-pair norms in ts. All threads call it; ends synchronised.
template <typename T>
__device__ void pddm_tile_activations(const PddmParams<T>& w, const PairRows<T>& rows, int64_t i0, int64_t r0,
                                      T* Z, TileScalars<T>& ts, T* sm_a, T* sm_w) {
  const int64_t d = w.d, h = w.h, ldz = 2 * h;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Phase 0: ||x_i - y_r|| and ||(x_i + y_r) / 2||.
  for (int p = warp; p < kPairs; p += kWarps) {
    const T* xi = rows.x + pair_row(i0, p, rows.m) * d;
    const T* yr = rows.y + pair_col(r0, p, rows.n) * d;
    T sq_u = 0, sq_s = 0;
    for (int64_t k = lane; k < d; k += 32) {
      const T diff = xi[k] - yr[k], sum = xi[k] + yr[k];
      sq_u += diff * diff;
      sq_s += sum * sum;
    }
    sq_u = warp_sum(sq_u);
    sq_s = warp_sum(sq_s);
    if (lane == 0) {
      const T nu = pddm_sqrt(sq_u), nv = T(0.5) * pddm_sqrt(sq_s);
      ts.norm_u[p] = nu;
      ts.norm_v[p] = nv;
      ts.inv_u[p] = diff_scale(nu, w.normalize_inputs);
      ts.inv_v[p] = mean_scale(nv, w.normalize_inputs);
      ts.direct[p] = mean_branch_direct(sq_u, sq_s);
    }
  }
  __syncthreads();
  // Phase 1: u' = relu(W_u |x_i - y_r| * diff_scale + b_u).
  pair_gemm<T>(
      h, d, w.W_u, d, 1,
      [&](int p, int64_t k) {
        const int64_t i = pair_row(i0, p, rows.m), r = pair_col(r0, p, rows.n);
        return abs_value(rows.x[i * d + k] - rows.y[r * d + k]);
      },
      [&](int p, int64_t k, T a) { Z[p * ldz + k] = branch_unit(a, ts.inv_u[p], w.b_u[k]); }, sm_a, sm_w);
  // Phase 1b: v' = relu(W_v (x_i + y_r) * mean_scale + b_v).
  for (int64_t e = threadIdx.x; e < int64_t(kPairs) * h; e += kThreads) {
    const int p = int(e / h);
    const int64_t k = e - int64_t(p) * h;
    Z[p * ldz + h + k] = branch_unit(mean_pre_projection(w, rows, ts, i0, r0, p, k), ts.inv_v[p], w.b_v[k]);
  }
#ifndef PDDM_EXT_TEST_DROP_TILE_BARRIER  // compiled out only by the emulation's self-test (docs/emulation.md)
  __syncthreads();
#endif
  // Phase 2: normalise both halves.
  for (int p = warp; p < kPairs; p += kWarps) {
    T sq_u1 = 0, sq_v1 = 0;
    for (int64_t k = lane; k < h; k += 32) {
      const T zu = Z[p * ldz + k], zv = Z[p * ldz + h + k];
      sq_u1 += zu * zu;
      sq_v1 += zv * zv;
    }
    sq_u1 = warp_sum(sq_u1);
    sq_v1 = warp_sum(sq_v1);
    const T n1u = pddm_sqrt(sq_u1), n1v = pddm_sqrt(sq_v1);
    const T inv_u1 = T(1) / clamped_norm(n1u), inv_v1 = T(1) / clamped_norm(n1v);
    for (int64_t k = lane; k < h; k += 32) {
      Z[p * ldz + k] *= inv_u1;
      Z[p * ldz + h + k] *= inv_v1;
    }
    if (lane == 0) {
      ts.norm_u1[p] = n1u;
      ts.norm_v1[p] = n1v;
    }
  }
  __syncthreads();
}

// Phase 3 after pddm_tile_activations: ts.score[p] = w_s . relu(W_c Z_p + b_c) + b_s. Ends synchronised.
template <typename T>
__device__ void pddm_tile_scores(const PddmParams<T>& w, const T* Z, TileScalars<T>& ts, T* sm_a, T* sm_w) {
  const int64_t h = w.h, ldz = 2 * h;
  const int out_group = threadIdx.x % kOutGroups;
  T part[4] = {T(0), T(0), T(0), T(0)};  // this thread's partial scores of its 4 pairs
  const int first_pair = (threadIdx.x / kOutGroups) * 4;
  pair_gemm<T>(
      w.c, 2 * h, w.W_c, 2 * h, 1, [&](int p, int64_t k) { return Z[p * ldz + k]; },
      [&](int, int64_t j, T q, int slot) { part[slot] += w.w_s[j] * relu(q + w.b_c[j]); }, sm_a, sm_w);
#pragma unroll
  for (int q = 0; q < 4; ++q) ts.partial[first_pair + q][out_group] = part[q];
  __syncthreads();
  if (threadIdx.x < kPairs) {
    T s = 0;
#pragma unroll
    for (int g = 0; g < kOutGroups; ++g) s += ts.partial[threadIdx.x][g];
    ts.score[threadIdx.x] = s + w.b_s[0];
  }
  __syncthreads();
}

// Where a block's tile workspace lives: in dynamic shared memory after the pair_gemm staging when
// it fits, else in the block's slice of a global scratch buffer.
template <typename T>
__device__ __forceinline__ T* block_workspace(T* dynamic_smem, T* global_scratch, int64_t ws_elems) {
  return global_scratch == nullptr ? dynamic_smem + pair_gemm_staging_elems<T>()
                                   : global_scratch + int64_t(blockIdx.x) * ws_elems;
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per device and kernel, to the largest size
// any plan can ask for (the whole budget). Set per call to that call's size, two host threads with
// different h could race: one lowers the limit between the other's set and its launch.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int device, size_t budget) {
  static std::mutex mutex;
  static std::set<std::pair<int, const void*>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  const std::pair<int, const void*> key{device, reinterpret_cast<const void*>(kernel)};
  if (done.count(key) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(budget)));
  done.insert(key);
}

// Launch shape of a persistent tile kernel.
struct LaunchPlan {
  int blocks = 1;
  size_t smem_bytes = 0;
  bool workspace_in_shared = true;
};

// Chooses the dynamic shared memory (staging + workspace if it fits) and as many blocks as fit on
// the device at once (at most one per tile). max_blocks caps the grid where per-block state is big.
template <typename Kernel>
LaunchPlan plan_launch(Kernel kernel, int device, int64_t tiles, size_t staging_bytes, size_t workspace_bytes,
                       int64_t max_blocks = int64_t(1) << 30) {
  int optin = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t budget = size_t(optin) > attr.sharedSizeBytes ? size_t(optin) - attr.sharedSizeBytes : 0;
  LaunchPlan plan;
  plan.workspace_in_shared = staging_bytes + workspace_bytes <= budget;
  plan.smem_bytes = staging_bytes + (plan.workspace_in_shared ? workspace_bytes : 0);
  TORCH_CHECK(plan.smem_bytes <= budget, "pddm_ext: tile staging needs ", plan.smem_bytes,
              " bytes of shared memory, the device allows ", budget);
  allow_dynamic_smem(kernel, device, budget);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem_bytes));
  const int64_t resident = int64_t(sms) * std::max(per_sm, 1);
  plan.blocks = int(std::max<int64_t>(1, std::min({tiles, resident, max_blocks})));
  return plan;
}

// P[i, k] = sum_j rows[i, j] W_v[k, j], one output per thread, j in order: the kernels' own
// arithmetic (as the CPU path, duplicate rows project identically) instead of cuBLAS, which runs
// float32 in TF32 under allow_tf32 / set_float32_matmul_precision("high") (~1e-3 relative error).
template <typename T>
__global__ void __launch_bounds__(kThreads) project_kernel(const T* __restrict__ rows, const T* __restrict__ W_v,
                                                            int64_t count, int64_t d, int64_t h, T* __restrict__ P) {
  PDDM_SHARED_DECLARED();
  const int64_t total = count * h, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / h, k = e - i * h;
    T acc = 0;
    for (int64_t j = 0; j < d; ++j) acc += rows[i * d + j] * W_v[k * d + j];
    P[e] = acc;
  }
}

// P = rows W_v^T (rows (count, d) and W_v (h, d) contiguous, on the current device) by project_kernel.
inline at::Tensor project_rows(const at::Tensor& rows, const at::Tensor& W_v) {
  auto P = at::empty({rows.size(0), W_v.size(0)}, rows.options());
  const int64_t total = P.numel();
  if (total == 0) return P;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "pddm_project_cuda", [&] {
    const int blocks = int(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
    PDDM_LAUNCH(project_kernel<scalar_t>, blocks, kThreads, 0, current_stream())(
        rows.data_ptr<scalar_t>(), W_v.data_ptr<scalar_t>(), rows.size(0), rows.size(1), W_v.size(0),
        P.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return P;
}

// The inputs of the PDDM launchers (scores, its backward, mining), prepared once: contiguous rows
// and parameters, the sizes, and the projections P = rows W_v^T (project_rows).
struct PddmInputs {
  bool batch = true;
  int64_t m = 0, n = 0, d = 0, h = 0, c = 0;
  at::Tensor x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, Px, Py;

  template <typename T>
  PddmParams<T> params(bool normalize_inputs) const {
    return {W_u.data_ptr<T>(), b_u.data_ptr<T>(), b_v.data_ptr<T>(), W_c.data_ptr<T>(), b_c.data_ptr<T>(),
            w_s.data_ptr<T>(), b_s.data_ptr<T>(), d,                  h,                  c,
            W_v.data_ptr<T>(), normalize_inputs};
  }
  template <typename T>
  PairRows<T> rows() const {
    return {x.data_ptr<T>(), Px.data_ptr<T>(), m, y.data_ptr<T>(), Py.data_ptr<T>(), n};
  }
};

inline PddmInputs prepare_inputs(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& W_u,
                                 const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v,
                                 const at::Tensor& W_c, const at::Tensor& b_c, const at::Tensor& w_s,
                                 const at::Tensor& b_s) {
  PddmInputs in;
  in.batch = !y.has_value();
  in.x = x.contiguous();
  in.y = in.batch ? in.x : y->contiguous();
  in.W_u = W_u.contiguous(), in.b_u = b_u.contiguous(), in.W_v = W_v.contiguous(), in.b_v = b_v.contiguous();
  in.W_c = W_c.contiguous(), in.b_c = b_c.contiguous(), in.w_s = w_s.contiguous(), in.b_s = b_s.contiguous();
  in.m = in.x.size(0), in.n = in.y.size(0), in.d = W_u.size(1), in.h = W_u.size(0), in.c = W_c.size(0);
  in.Px = project_rows(in.x, in.W_v);
  in.Py = in.batch ? in.Px : project_rows(in.y, in.W_v);
  return in;
}

}  // namespace pddm_ext::cuda
