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
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <set>
#include <type_traits>
#include <utility>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
// at::Context::float32Precision(Float32Backend, Float32Op), the getter of
// torch.backends.cuda.matmul.fp32_precision, as torch 2.13 declares it.
#define PDDM_TORCH_FP32_PRECISION_API (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13))
#else
#define PDDM_TORCH_FP32_PRECISION_API 0
#endif

#include "../pddm_common.h"
#include "cuda_compat.cuh"
#include "smem_layout.h"

namespace pddm_ext::cuda {

// The block shape and the shared-memory layout (which thread touches which staged element) are in
// smem_layout.h, where tests/cpp/test_smem_banks.cpp checks them for bank conflicts.
using layout::kChunk;
using layout::kOutBlock;
using layout::kOutGroups;
using layout::kPairGroups;
using layout::kPairs;
using layout::kThreads;
using layout::kTile;
constexpr int kWarps = kThreads / 32;

// Shared-memory staging of pair_gemm, both chunks stored k-major so that each thread reads its 4
// operands and its 8 weights of one k with 16-byte loads: the operand chunk (kChunk x kPairs) and,
// after it, the weight chunk (kChunk x kOutBlock), rows padded to layout::a_stride / w_stride.
template <typename T>
constexpr size_t staging_a_elems() {
  return size_t(kChunk) * layout::a_stride<T>();
}
// How pair_gemm multiplies float32 tiles (docs/design.md#precision): FP32 FMAs on CUDA cores, or
// tensor cores with TF32 operands: three products per step (a_hi b_hi + a_hi b_lo + a_lo b_hi with
// a = a_hi + a_lo split into two TF32 values, float32-level accuracy) or one (TF32, 10 explicit
// mantissa bits). float64 tiles always use FP64 FMAs. Chosen per call by tile_math(). kFp16 / kBf16:
// the tiles of half inputs (float32 tensors holding float16 / bfloat16 values, the op's
// product_dtype): operands rounded to float16 / bfloat16, float32 accumulation (HalfTensorCoreBlock).
enum class TileMath : int { kFp32 = 0, kTf32x3 = 1, kTf32 = 2, kFp16 = 3, kBf16 = 4 };

__host__ __device__ constexpr bool half_tile_math(TileMath math) {
  return math == TileMath::kFp16 || math == TileMath::kBf16;
}

// The tensor-core path exists where the device code can use TF32 WMMA (sm_80 and later) and in the
// emulation (csrc/emulation/cuda_emu.h models it); tile_math() never selects it elsewhere.
#if defined(PDDM_EXT_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define PDDM_TENSOR_CORES 1
#else
#define PDDM_TENSOR_CORES 0
#endif

template <typename T>
constexpr size_t pair_gemm_staging_elems() {
  return staging_a_elems<T>() + size_t(kChunk) * layout::w_stride<T>();
}
// The tensor-core path's output passes (TensorCoreBlock::outputs) reuse the staging buffer.
static_assert(size_t(kPairs) * layout::tensor_output_stride() <= pair_gemm_staging_elems<float>(),
              "a tensor-core output pass fits in the pair_gemm staging");

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

// dst[0, 16 bytes) = src[0, 16 bytes) with one 16-byte load; src 16-byte aligned (shared memory).
template <typename T>
__device__ __forceinline__ void load_vector(T* dst, const T* src) {
  using V = typename Vec16<T>::type;
  const V v = *reinterpret_cast<const V*>(src);
  memcpy(dst, &v, sizeof(V));
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

// The (row, col) = (e / cols, e % cols) of the elements e = threadIdx.x, + kThreads, ... < rows * cols
// of a row-major (rows, cols) index space, walked without a 64-bit division per element: the start
// and the step (kThreads / cols, kThreads % cols) take one 32-bit division when cols <= kThreads (the
// quotient and remainder of a number below kThreads = 256 fit in 32 bits; a wider row steps by
// (0, kThreads)), and each next() adds the step with at most one carry (col < cols and the column
// step < cols, so col + step < 2 cols). A loop over e calls next() with every e += kThreads.
struct RowColWalk {
  int64_t row, col, cols;
  int row_step, col_step;
  __device__ __forceinline__ RowColWalk(int64_t rows, int64_t columns) : cols(columns) {
    const int tid = threadIdx.x;
    if (columns <= 0) {  // an empty space: no element (the loops over e do not run either)
      row = rows, col = 0, row_step = 0, col_step = 0;
    } else if (columns > kThreads) {
      row = 0, col = tid, row_step = 0, col_step = kThreads;
    } else {
      const int c32 = int(columns), r = tid / c32;
      row = r, col = tid - r * c32, row_step = kThreads / c32, col_step = kThreads - row_step * c32;
    }
  }
  __device__ __forceinline__ void next() {
    row += row_step;
    col += col_step;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

// Pointers into the (contiguous, device) parameters of a PDDM unit, and its form (docs/design.md "The two
// forms"). W_v serves only the near-antipodal pairs (mean_branch_direct); the others use P = x W_v^T.
template <typename T>
struct PddmParams {
  const T *W_u, *b_u, *b_v, *W_c, *b_c, *w_s, *b_s;
  int64_t d, h, c;
  const T* W_v;
  bool normalize_inputs;
  TileMath math;   // how pair_gemm multiplies (tile_math)
  int stages = 1;  // pair_gemm's staging buffers: 2 (double-buffered) where shared memory allows (plan_launch)
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
  int64_t row[kPairs], col[kPairs];    // pair p is (x row[p], y row col[p]) (TilePairs)
  T norm_u[kPairs], norm_v[kPairs];    // ||u||, ||v||
  T inv_u[kPairs], inv_v[kPairs];      // diff_scale, mean_scale (pddm_common.h)
  bool direct[kPairs];                 // mean_branch_direct: W_v (x + y) from x + y, not P_i + P_r
  T norm_u1[kPairs], norm_v1[kPairs];  // ||u'||, ||v'||
  T score[kPairs];
  T partial[kPairs][kOutGroups + 1];   // per-output-group partial scores (summed in a fixed order;
                                       // the odd row stride keeps the 64 summing threads conflict-free)
};

// Half tile math (TileMath::kFp16 / kBf16) scales a pair's phase-1 operand |x_i - y_r| by 2^-e with
// ||x_i - y_r|| 2^-e in [0.5, 1) and its product back by 2^e (both exact in float32): float16 (max
// 65504) cannot hold |x_i - y_r| of rows near its range, and its rounding is relative, so the product
// loses nothing by the scaling. e is clamped to [-125, 125] (2^e and 2^-e normal floats).
__device__ __forceinline__ int half_operand_exponent(float norm) {
  int e = 0;
  if (norm > 0.0f) frexpf(norm, &e);
  return e < -125 ? -125 : (e > 125 ? 125 : e);
}

#if PDDM_TENSOR_CORES
// pair_gemm's tensor-core product of one kOutBlock-wide output block: warp w owns pairs
// [16 (w % 4), + 16) x outputs [64 (w / 4), + 64) as four 16 x 16 float accumulators (WMMA
// m16n16k8, TF32 operands). The staged chunks are the FP32 loop's: the operand chunk is the
// column-major matrix_a (pairs x k, ldm a_stride), the weight chunk the row-major matrix_b
// (k x outputs, ldm w_stride). Only float has it; the double instantiation is empty.
// The accumulators of a tensor-core product (four 16 x 16 float fragments per warp, TensorCoreBlock
// and HalfTensorCoreBlock) into the FP32 loop's registers: out[q][t] = output (4 pg + q,
// out_column(og, t)), through the staging buffer in four passes: in pass f every warp stores its
// accumulator f (16 pairs x 16 outputs), which together hold the outputs of the threads with
// out_group / 4 == f (smem_layout.h tensor_output_index), and those threads read theirs. The staging
// buffer needs no more room than the FP32 path's. Ends synchronised.
template <typename Fragment>
__device__ __forceinline__ void tensor_core_outputs(const Fragment (&acc)[4], float (&out)[4][8], float* staging,
                                                    int pair_group, int out_group) {
  constexpr int ld = layout::tensor_output_stride();
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    nvcuda::wmma::store_matrix_sync(staging + layout::tensor_output_offset(warp), acc[f], ld,
                                    nvcuda::wmma::mem_row_major);
    __syncthreads();
    if (layout::tensor_output_pass(out_group) == f) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int v = 0; v < 8 / 4; ++v) {
          load_vector(&out[q][4 * v], staging + layout::tensor_output_index(pair_group, out_group, q, v));
        }
      }
    }
    __syncthreads();
  }
}

template <typename T>
struct TensorCoreBlock {
  __device__ __forceinline__ void zero() {}
  __device__ __forceinline__ void chunk(const T*, const T*, bool) {}
  __device__ __forceinline__ void outputs(T (&)[4][8], T*, int, int) {}
};

template <>
struct TensorCoreBlock<float> {
  using Tf32 = nvcuda::wmma::precision::tf32;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> acc[4];

  // v = hi + lo with hi = tf32(v) and lo = tf32(v - hi); the low 13 bits of hi are cleared (the
  // tensor cores ignore them, so that v - hi is exactly the part they do not see). lo = 0 for a
  // non-finite v, where v - hi is NaN. Non-finite operands are not otherwise handled: a product of an
  // infinite operand and a TF32-exact one is NaN under 3xTF32 (0 * inf in a cross term) where FP32
  // gives inf. The public ops reject non-finite inputs and parameters before any kernel runs.
  template <typename Fragment>
  __device__ __forceinline__ static void split(Fragment& hi, Fragment& lo, bool three) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float v = hi.x[t], big = __uint_as_float(__float_as_uint(nvcuda::wmma::__float_to_tf32(v)) & 0xffffe000u);
      hi.x[t] = big;
      if (three) lo.x[t] = (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u ? nvcuda::wmma::__float_to_tf32(v - big) : 0.0f;
    }
  }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (auto& f : acc) nvcuda::wmma::fill_fragment(f, 0.0f);
  }

  // acc += this chunk's kChunk reduction steps; three: 3xTF32 (the two small cross terms first).
  __device__ __forceinline__ void chunk(const float* sm_a, const float* sm_w, bool three) {
    using namespace nvcuda::wmma;
    constexpr int a_stride = layout::a_stride<float>(), w_stride = layout::w_stride<float>();
    const int warp = threadIdx.x / 32, pairs0 = 16 * (warp % 4), outs0 = 64 * (warp / 4);
#pragma unroll 1
    for (int ks = 0; ks < kChunk; ks += 8) {
      fragment<matrix_a, 16, 16, 8, Tf32, col_major> a_hi, a_lo;
      load_matrix_sync(a_hi, sm_a + ks * a_stride + pairs0, a_stride);
      split(a_hi, a_lo, three);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        fragment<matrix_b, 16, 16, 8, Tf32, row_major> b_hi, b_lo;
        load_matrix_sync(b_hi, sm_w + ks * w_stride + outs0 + 16 * f, w_stride);
        split(b_hi, b_lo, three);
        if (three) {
          mma_sync(acc[f], a_lo, b_hi, acc[f]);
          mma_sync(acc[f], a_hi, b_lo, acc[f]);
        }
        mma_sync(acc[f], a_hi, b_hi, acc[f]);
      }
    }
  }

  // After the last chunk (staging free): out[q][t] = output (4 pg + q, out_column(og, t)), the
  // values the FP32 loop leaves in the same thread's registers (tensor_core_outputs). Ends synchronised.
  __device__ __forceinline__ void outputs(float (&out)[4][8], float* staging, int pair_group, int out_group) {
    tensor_core_outputs(acc, out, staging, pair_group, out_group);
  }
};
// pair_gemm's tensor-core product for half inputs (TileMath::kFp16 / kBf16; H = __half or
// __nv_bfloat16): WMMA m16n16k16 with H operands and float accumulators, warp w owning pairs
// [16 (w % 4), + 16) x outputs [64 (w / 4), + 64) as TensorCoreBlock does. The staged chunks are
// the FP32 loop's float32 ones; chunk() rounds them to H (round to nearest even) in place, each
// into the start of its own region (the operand chunk as a column-major matrix_a with
// kHalfAStride, the weight chunk as a row-major matrix_b with kHalfWStride), and multiplies: one
// k16 step per staged chunk. Everything else of the tile stays float32.
constexpr int kHalfAStride = kPairs + 8;     // 16-bit elements: ldm a multiple of 8, rows 16 bytes apart
constexpr int kHalfWStride = kOutBlock + 8;
static_assert(kChunk == 16, "one m16n16k16 step per staged chunk");
static_assert(size_t(kChunk) * kHalfAStride * 2 <= staging_a_elems<float>() * sizeof(float) &&
                  size_t(kChunk) * kHalfWStride * 2 <= size_t(kChunk) * layout::w_stride<float>() * sizeof(float),
              "the rounded chunks fit in the float32 chunks they replace");
static_assert(staging_a_elems<float>() * sizeof(float) % 32 == 0, "the weight chunk stays 256-bit aligned");

template <typename H>
__device__ __forceinline__ H round_operand(float v);
template <>
__device__ __forceinline__ __half round_operand<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 round_operand<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename H>
struct HalfTensorCoreBlock {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (auto& f : acc) nvcuda::wmma::fill_fragment(f, 0.0f);
  }

  // acc += this chunk's kChunk reduction steps. Rounds the staged float32 chunks to H in place
  // (all reads, a barrier, all writes, a barrier), then one m16n16k16 step.
  __device__ __forceinline__ void chunk(float* sm_a, float* sm_w) {
    using namespace nvcuda::wmma;
    constexpr int a_stride = layout::a_stride<float>(), w_stride = layout::w_stride<float>();
    constexpr int a_per = kChunk * kPairs / kThreads, w_per = kChunk * kOutBlock / kThreads;
    static_assert(a_per * kThreads == kChunk * kPairs && w_per * kThreads == kChunk * kOutBlock, "whole chunks");
    const int tid = threadIdx.x;
    float va[a_per], vw[w_per];
#pragma unroll
    for (int j = 0; j < a_per; ++j) {
      const int e = tid + j * kThreads;
      va[j] = sm_a[(e / kPairs) * a_stride + e % kPairs];
    }
#pragma unroll
    for (int j = 0; j < w_per; ++j) {
      const int e = tid + j * kThreads;
      vw[j] = sm_w[(e / kOutBlock) * w_stride + e % kOutBlock];
    }
    __syncthreads();
    H* const ha = reinterpret_cast<H*>(sm_a);
    H* const hw = reinterpret_cast<H*>(sm_w);
#pragma unroll
    for (int j = 0; j < a_per; ++j) {
      const int e = tid + j * kThreads;
      ha[(e / kPairs) * kHalfAStride + e % kPairs] = round_operand<H>(va[j]);
    }
#pragma unroll
    for (int j = 0; j < w_per; ++j) {
      const int e = tid + j * kThreads;
      hw[(e / kOutBlock) * kHalfWStride + e % kOutBlock] = round_operand<H>(vw[j]);
    }
    __syncthreads();
    const int warp = tid / 32, pairs0 = 16 * (warp % 4), outs0 = 64 * (warp / 4);
    fragment<matrix_a, 16, 16, 16, H, col_major> a;
    load_matrix_sync(a, ha + pairs0, kHalfAStride);
#pragma unroll
    for (int f = 0; f < 4; ++f) {
      fragment<matrix_b, 16, 16, 16, H, row_major> b;
      load_matrix_sync(b, hw + outs0 + 16 * f, kHalfWStride);
      mma_sync(acc[f], a, b, acc[f]);
    }
  }

  __device__ __forceinline__ void outputs(float (&out)[4][8], float* staging, int pair_group, int out_group) {
    tensor_core_outputs(acc, out, staging, pair_group, out_group);
  }
};
#endif

// out(p, o) = sum_k operand(p, k) * W(o, k) for the kPairs pairs of the tile and o < N, with
// W(o, k) = W[o * w_out_stride + k * w_red_stride] (so W_c^T and W_u^T need no copy). Calls
// epilogue(p, o, value) once for every (p, o), o < N, or epilogue(p, o, value, q) when it takes a
// fourth argument: q in [0, 4) is p's slot among the calling thread's 4 pairs, a compile-time
// constant after unrolling (an epilogue that indexes its own per-pair registers with it keeps them
// in registers; p - first_pair would be a dynamic index, i.e. local memory). The reduction order
// over k is fixed, so the result is deterministic. math (tile_math) chooses FP32 FMAs or tensor
// cores (TensorCoreBlock, float only). kHalf: the instantiation of the half kernels, the only one
// with the half tensor-core code (HalfTensorCoreBlock), and where tensor cores exist (sm_80+, the
// emulation) nothing else: it multiplies in float16 when math is kFp16, else in bfloat16 (the
// launchers run it for those two maths and no other; the other instantiations compute a half math
// in FP32, which no launcher asks for). stages (PddmParams::stages) is 1 or 2: with 2 the chunks are double-buffered (every path:
// FP32, TF32 and half tensor cores), the second staging buffer at sm_a + pair_gemm_staging_elems<T>()
// (operand) and sm_w + pair_gemm_staging_elems<T>() (weights). kMaxStages 1 compiles the single
// buffer alone (stages is then ignored), staged by plain loads and stores without asynchronous
// copies: the backward kernel's, where the double buffer's code spilled. Must be called by all
// threads of the block; ends synchronised.
template <typename T, bool kHalf = false, int kMaxStages = 2, typename Operand, typename Epilogue>
__device__ void pair_gemm(int64_t N, int64_t K, const T* __restrict__ W, int64_t w_out_stride,
                          int64_t w_red_stride, Operand operand, Epilogue epilogue, T* sm_a, T* sm_w,
                          TileMath math, int stages) {
  const int tid = threadIdx.x;
  const int pair_group = tid / kOutGroups, out_group = tid % kOutGroups;  // pairs 4 pg.., outputs (out_column)
  constexpr int per = layout::vec_elems<T>(), a_stride = layout::a_stride<T>(), w_stride = layout::w_stride<T>();
  // An epilogue that takes the pair's slot accumulates in registers (no shared stores to spread):
  // it visits the outputs in one order for every pair, so that a pair's result does not depend on
  // its place in the tile (duplicate rows and columns score identically).
  constexpr bool accumulates = std::is_invocable_v<Epilogue, int, int64_t, T, int>;
  const int flip = accumulates ? 0 : layout::epilogue_flip<T>(pair_group, out_group);
  const bool w_rows_contiguous = w_red_stride == 1;
  // The half instantiation (float, with tensor cores) compiles the half product alone: its kernels run
  // for a half math only, and the FP32 and TF32 code beside it spilled the half backward (sm_90).
  const bool half_tensor = kHalf && std::is_same_v<T, float> && PDDM_TENSOR_CORES;
  const bool tensor =
      !kHalf && std::is_same_v<T, float> && PDDM_TENSOR_CORES && math != TileMath::kFp32 && !half_tile_math(math);
  constexpr int stage_elems = int(pair_gemm_staging_elems<T>());  // buffer 1 - buffer 0
  for (int64_t o0 = 0; o0 < N; o0 += kOutBlock) {
    // Stages reduction chunk k0 of this output block's weights and of the operand into staging
    // buffer s: the weights by asynchronous copies (copy_async, cuda_compat.cuh: cp.async on sm_80
    // and later, else plain copies) committed as one group, the operand (computed) by plain stores.
    // kMaxStages 1: into the one buffer, the operand first, then the weights by plain loads and stores.
    const auto stage = [&](int64_t k0, int s) {
      if constexpr (kMaxStages == 1) {
        (void)s;
        for (int e = tid; e < kPairs * kChunk; e += kThreads) {
          const int p = layout::fill_col(e), kk = layout::fill_k(e);
          sm_a[kk * a_stride + p] = k0 + kk < K ? operand(p, k0 + kk) : T(0);
        }
        for (int e = tid; e < kOutBlock * kChunk; e += kThreads) {
          const int oo = w_rows_contiguous ? layout::fill_col(e) : e % kOutBlock;
          const int kk = w_rows_contiguous ? layout::fill_k(e) : e / kOutBlock;
          const int64_t o = o0 + oo, k = k0 + kk;
          sm_w[kk * w_stride + oo] = (o < N && k < K) ? W[o * w_out_stride + k * w_red_stride] : T(0);
        }
      } else {
        T* const st_a = sm_a + s * stage_elems;
        T* const st_w = sm_w + s * stage_elems;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#pragma unroll 2  // ptxas of nvcc 13.0 spills less for sm_75 and sm_80 (make cuda-resources), more for sm_90
#endif
        for (int e = tid; e < kOutBlock * kChunk; e += kThreads) {
          // Walk the weight chunk along whichever of its axes is contiguous in memory (coalescing).
          const int oo = w_rows_contiguous ? layout::fill_col(e) : e % kOutBlock;
          const int kk = w_rows_contiguous ? layout::fill_k(e) : e / kOutBlock;
          const int64_t o = o0 + oo, k = k0 + kk;
          if (o < N && k < K) {
            copy_async(st_w + kk * w_stride + oo, W + o * w_out_stride + k * w_red_stride);
          } else {
            st_w[kk * w_stride + oo] = T(0);
          }
        }
        copy_async_commit();
        for (int e = tid; e < kPairs * kChunk; e += kThreads) {
          const int p = layout::fill_col(e), kk = layout::fill_k(e);  // runs of consecutive k (smem_layout.h)
          st_a[kk * a_stride + p] = k0 + kk < K ? operand(p, k0 + kk) : T(0);
        }
      }
    };
    // Every thread's copies and stores so far complete and visible to the block.
    const auto staged = [] {
#ifndef PDDM_EXT_TEST_DROP_COPY_WAIT  // compiled out only by the emulation's self-test (docs/emulation.md)
      if constexpr (kMaxStages > 1) copy_async_wait_all();
#endif
      __syncthreads();
    };
    // Runs compute(operand chunk, weight chunk) on the reduction chunks of this output block in order
    // of k. One buffer (stages 1), per chunk: stage, staged, compute, barrier. Two: step i stages chunk
    // i into buffer i % 2 (its copies in flight) while chunk i - 1 is computed from the other, then
    // staged: chunk i is complete and visible, and every thread is done with chunk i - 1, whose buffer
    // step i + 1 overwrites. Ends synchronised.
    const auto over_chunks = [&](auto&& compute) {
      if constexpr (kMaxStages == 1) {
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
          stage(k0, 0);
          staged();
          compute(sm_a, sm_w);
          staged();
        }
      } else {
        const int lag = stages - 1, chunks = int((K + kChunk - 1) / kChunk);
        for (int i = 0; i < chunks + lag; ++i) {
          if (i < chunks) stage(int64_t(i) * kChunk, i & lag);
          if (lag == 0) staged();
          if (i >= lag) {
            const int off = ((i - lag) & lag) * stage_elems;
            compute(sm_a + off, sm_w + off);
          }
          staged();
        }
      }
    };
    T acc[4][8];
#if PDDM_TENSOR_CORES
    if (tensor) {  // a separate loop, so that the fragments and the FP32 accumulators never live together
      TensorCoreBlock<T> tc;
      tc.zero();
      over_chunks([&](const T* st_a, const T* st_w) { tc.chunk(st_a, st_w, math == TileMath::kTf32x3); });
      tc.outputs(acc, sm_a, pair_group, out_group);  // the same acc[q][t] as the FP32 loop's
    } else if (half_tensor) {  // float16 / bfloat16 operands (HalfTensorCoreBlock)
      if constexpr (kHalf && std::is_same_v<T, float>) {
        const auto run = [&](auto block) {
          block.zero();
          over_chunks([&](T* st_a, T* st_w) { block.chunk(st_a, st_w); });  // rounds its own buffer in place
          block.outputs(acc, sm_a, pair_group, out_group);
        };
        if (math == TileMath::kFp16) {
          run(HalfTensorCoreBlock<__half>{});
        } else {
          run(HalfTensorCoreBlock<__nv_bfloat16>{});
        }
      }
    } else
#endif
    {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int t = 0; t < 8; ++t) acc[q][t] = T(0);
      }
      over_chunks([&](const T* st_a, const T* st_w) {
#pragma unroll 4
        for (int kk = 0; kk < kChunk; ++kk) {
          T a[4], w[8];
          load_aligned(a, st_a + kk * a_stride + pair_group * 4);
#pragma unroll
          for (int v = 0; v < 8 / per; ++v) {  // w[t] = column out_column(out_group, t)
            load_vector(w + v * per, st_w + kk * w_stride + layout::out_column<T>(out_group, v * per));
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int t = 0; t < 8; ++t) acc[q][t] += a[q] * w[t];
          }
        }
      });
    }
    // Step t takes output epilogue_slot(t) (a lane-dependent order that spreads the epilogues' shared
    // stores over the banks); the value is selected among compile-time indices of acc, so acc stays
    // in registers.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int base = (t / per) * per, lane_t = t % per;
        T value = acc[q][t];
#pragma unroll
        for (int f = 1; f < per; ++f) {
          if (flip == f) value = acc[q][base + (lane_t ^ f)];
        }
        const int slot = accumulates ? t : layout::epilogue_slot<T>(pair_group, out_group, t);  // base + (lane_t ^ flip)
        const int64_t o = o0 + layout::out_column<T>(out_group, slot);
        if (o < N) {
          if constexpr (accumulates) {
            epilogue(pair_group * 4 + q, o, value, q);
          } else {
            epilogue(pair_group * 4 + q, o, value);
          }
        }
      }
    }
  }
  __syncthreads();
}

// The kPairs pairs of one tile. A dense tile: pair p = a * kTile + b is (i0 + a, r0 + b), clamped
// into range so that the padded pairs of edge tiles read valid rows (their results are never used).
// A list tile (list != nullptr): pairs [begin, begin + kPairs) of a (count, 2) row-major list of
// (i, r), the live pairs of a sparse backward; slots past its end repeat its last pair (the backward
// gives them a zero gradient).
struct TilePairs {
  int64_t i0 = 0, r0 = 0;
  const int64_t* list = nullptr;
  int64_t begin = 0, count = 0;

  __device__ __forceinline__ void pair(int p, int64_t m, int64_t n, int64_t* i, int64_t* r) const {
    if (list != nullptr) {
      const int64_t e = begin + p < count ? begin + p : count - 1;
      *i = list[2 * e];
      *r = list[2 * e + 1];
    } else {
      *i = i0 + p / kTile < m ? i0 + p / kTile : m - 1;
      *r = r0 + p % kTile < n ? r0 + p % kTile : n - 1;
    }
  }
};

// Row k of W_v (x_i + y_r) for pair p: P_i + P_r, or for a near-antipodal pair the direct product.
template <typename T>
__device__ __forceinline__ T mean_pre_projection(const PddmParams<T>& w, const PairRows<T>& rows,
                                                 const TileScalars<T>& ts, int p, int64_t k) {
  const int64_t i = ts.row[p], r = ts.col[p];
  if (ts.direct[p]) return mean_projection_direct(w.W_v + k * w.d, rows.x + i * w.d, rows.y + r * w.d, w.d);
  return rows.Px[i * w.h + k] + rows.Py[r * w.h + k];
}

// Phases 0-2: leaves Z[p * ldz + k] = [normalize(u'); normalize(v')] (k < 2h, ldz =
// layout::workspace_stride(2h), tile_workspace_elems) of every pair of the tile and
// the per-pair norms and the pairs' rows (ts.row, ts.col) in ts. All threads call it, after a
// barrier that ends the previous tile's reads of ts and Z; ends synchronised. kHalf: the
// instantiation of the half kernels (pair_gemm), which scales the phase-1 operand (float only).
// kMaxStages 1: pair_gemm stages one buffer whatever w.stages says (a compile-time constant: the
// backward kernel, compiled without the double buffer); 2: w.stages buffers.
template <typename T, bool kHalf = false, int kMaxStages = 2>
__device__ void pddm_tile_activations(const PddmParams<T>& w, const PairRows<T>& rows, const TilePairs& pairs,
                                      T* Z, TileScalars<T>& ts, T* sm_a, T* sm_w) {
  static_assert(kMaxStages == 1 || kMaxStages == 2, "one or two staging buffers");
  const int stages = kMaxStages == 1 ? 1 : w.stages;
  const int64_t d = w.d, h = w.h, ldz = layout::workspace_stride(2 * h);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x < kPairs) pairs.pair(threadIdx.x, rows.m, rows.n, &ts.row[threadIdx.x], &ts.col[threadIdx.x]);
  __syncthreads();
  // Phase 0: ||x_i - y_r|| and ||(x_i + y_r) / 2||.
  for (int p = warp; p < kPairs; p += kWarps) {
    const T* xi = rows.x + ts.row[p] * d;
    const T* yr = rows.y + ts.col[p] * d;
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
  // Phase 1: u' = relu(W_u |x_i - y_r| * diff_scale + b_u). The half kernels scale the operand by a
  // power of two per pair (half_operand_exponent) and the product back.
  if constexpr (kHalf) {
    pair_gemm<T, kHalf, kMaxStages>(
        h, d, w.W_u, d, 1,
        [&](int p, int64_t k) {
          const T u = abs_value(rows.x[ts.row[p] * d + k] - rows.y[ts.col[p] * d + k]);
          return ldexpf(u, -half_operand_exponent(ts.norm_u[p]));
        },
        [&](int p, int64_t k, T a) {
          Z[p * ldz + k] = branch_unit(ldexpf(a, half_operand_exponent(ts.norm_u[p])), ts.inv_u[p], w.b_u[k]);
        },
        sm_a, sm_w, w.math, stages);
  } else {
    pair_gemm<T, false, kMaxStages>(
        h, d, w.W_u, d, 1,
        [&](int p, int64_t k) { return abs_value(rows.x[ts.row[p] * d + k] - rows.y[ts.col[p] * d + k]); },
        [&](int p, int64_t k, T a) { Z[p * ldz + k] = branch_unit(a, ts.inv_u[p], w.b_u[k]); }, sm_a, sm_w, w.math,
        stages);
  }
  // Phase 1b: v' = relu(W_v (x_i + y_r) * mean_scale + b_v).
  RowColWalk pk(kPairs, h);
  for (int64_t e = threadIdx.x; e < int64_t(kPairs) * h; e += kThreads, pk.next()) {
    const int p = int(pk.row);  // < kPairs
    const int64_t k = pk.col;
    Z[p * ldz + h + k] = branch_unit(mean_pre_projection(w, rows, ts, p, k), ts.inv_v[p], w.b_v[k]);
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
template <typename T, bool kHalf = false>
__device__ void pddm_tile_scores(const PddmParams<T>& w, const T* Z, TileScalars<T>& ts, T* sm_a, T* sm_w) {
  const int64_t h = w.h, ldz = layout::workspace_stride(2 * h);
  const int out_group = threadIdx.x % kOutGroups;
  T part[4] = {T(0), T(0), T(0), T(0)};  // this thread's partial scores of its 4 pairs
  const int first_pair = (threadIdx.x / kOutGroups) * 4;
  pair_gemm<T, kHalf>(
      w.c, 2 * h, w.W_c, 2 * h, 1, [&](int p, int64_t k) { return Z[p * ldz + k]; },
      [&](int, int64_t j, T q, int slot) { part[slot] += w.w_s[j] * relu(q + w.b_c[j]); }, sm_a, sm_w, w.math,
      w.stages);
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

// Elements of a tile workspace of kPairs rows for matrices of the given column counts (each row
// padded to layout::workspace_stride).
inline int64_t tile_workspace_elems(std::initializer_list<int64_t> columns) {
  int64_t rows = 0;
  for (const int64_t n : columns) rows += layout::workspace_stride(n);
  return int64_t(kPairs) * rows;
}

// Where a block's tile workspace lives: in dynamic shared memory after the pair_gemm staging (stages
// buffers, PddmParams::stages) when it fits, else in the block's slice of a global scratch buffer.
template <typename T>
__device__ __forceinline__ T* block_workspace(T* dynamic_smem, T* global_scratch, int64_t ws_elems, int stages) {
  return global_scratch == nullptr ? dynamic_smem + stages * pair_gemm_staging_elems<T>()
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
  int stages = 1;  // pair_gemm staging buffers (PddmParams::stages)
};

// Chooses the dynamic shared memory (staging + workspace if it fits) and as many blocks as fit on
// the device at once (at most one per tile). max_blocks caps the grid where per-block state is big.
// A second staging buffer (pair_gemm double-buffered, stages = 2) is added where max_stages allows it
// (a kernel compiled for one buffer passes 1) and it fits next to the same workspace placement
// without fewer resident blocks per SM.
template <typename Kernel>
LaunchPlan plan_launch(Kernel kernel, int device, int64_t tiles, size_t staging_bytes, size_t workspace_bytes,
                       int64_t max_blocks = int64_t(1) << 30, TileMath math = TileMath::kFp32, int max_stages = 2) {
  int optin = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  // The device code has tensor cores only where it was compiled for compute_80 or later: a build for
  // older architectures JIT-compiled for this GPU would compute FP32 under "high" / "medium".
  TORCH_CHECK(math == TileMath::kFp32 || half_tile_math(math) || attr.ptxVersion >= 80,
              "pddm_ext: the float32 matmul precision asks for TF32 tensor cores, but this build's kernels "
              "for this GPU were compiled for compute_", attr.ptxVersion,
              ", which has none: rebuild with TORCH_CUDA_ARCH_LIST including 8.0 or later, or use "
              "torch.set_float32_matmul_precision('highest')");
  TORCH_CHECK(!half_tile_math(math) || attr.ptxVersion >= 80, "pddm_ext: ",
              math == TileMath::kFp16 ? "float16" : "bfloat16",
              " inputs run their tile products on tensor cores on this GPU (sm_80 or later), but this build's "
              "kernels for it were compiled for compute_", attr.ptxVersion,
              ", which has none: rebuild with TORCH_CUDA_ARCH_LIST including 8.0 or later, or upcast the "
              "inputs to float32 (x.float()) to compute them in float32");
  const size_t budget = size_t(optin) > attr.sharedSizeBytes ? size_t(optin) - attr.sharedSizeBytes : 0;
  LaunchPlan plan;
  plan.workspace_in_shared = staging_bytes + workspace_bytes <= budget;
  plan.smem_bytes = staging_bytes + (plan.workspace_in_shared ? workspace_bytes : 0);
  TORCH_CHECK(plan.smem_bytes <= budget, "pddm_ext: tile staging needs ", plan.smem_bytes,
              " bytes of shared memory, the device allows ", budget);
  allow_dynamic_smem(kernel, device, budget);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem_bytes));
  if (max_stages >= 2 && staging_bytes > 0 && plan.smem_bytes + staging_bytes <= budget) {
    int per_sm_double = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_double, kernel, kThreads,
                                                                 plan.smem_bytes + staging_bytes));
    if (per_sm_double >= per_sm) {
      plan.stages = 2;
      plan.smem_bytes += staging_bytes;
    }
  }
  const int64_t resident = int64_t(sms) * std::max(per_sm, 1);
  plan.blocks = int(std::max<int64_t>(1, std::min({tiles, resident, max_blocks})));
  return plan;
}

// The dense products around the tile kernels (P = x W_v^T before them; dx += dP W_v and
// dW_v = dP_x^T x + dP_y^T y after the backward) in the kernels' own arithmetic instead of at::mm /
// cuBLAS, which runs float32 in TF32 under allow_tf32 / set_float32_matmul_precision("high") (~1e-3
// relative error) and may pick a split-K algorithm: every output C[i, j] is one accumulator summed
// over k in increasing order (as the CPU path computes P: duplicate rows project identically), and
// the result is deterministic. One block per 16 x 16 output tile (persistent: tiles t = blockIdx.x,
// + gridDim.x, ...), the reduction staged 16 at a time in shared memory along whichever axis of
// each operand is contiguous in global memory.
constexpr int kGemmTile = 16;
static_assert(kGemmTile * kGemmTile == kThreads, "gemm_kernel: one output per thread");

// A (M, K) and B (K, N) as strided views: element (r, k) of A is A[r * row + k * red].
template <typename T>
struct StridedMatrix {
  const T* data;
  int64_t row, red;
  __device__ __forceinline__ T at(int64_t r, int64_t k) const { return data[r * row + k * red]; }
};

template <typename T>
struct GemmStage {
  T a[kGemmTile][kGemmTile + 1];  // a[r][kk] = A(i0 + r, k0 + kk)
  T b[kGemmTile][kGemmTile + 1];  // b[c][kk] = B(k0 + kk, j0 + c)
};

// C(i, j) = (accumulate ? C(i, j) : 0) + sum_k A(i, k) B(k, j), C (M, N) at C[i * c_row + j * c_col].
// B is passed as B^T: element (c, k) = B(k, c).
// grid: TileGrid::make(false, M, N, kGemmTile, kGemmTile), the output tiles row by row.
template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_kernel(StridedMatrix<T> A, StridedMatrix<T> Bt, T* __restrict__ C,
                                                         int64_t c_row, int64_t c_col, int64_t M, int64_t N,
                                                         int64_t K, bool accumulate, TileGrid grid) {
  PDDM_SHARED(st, GemmStage<T>);
  PDDM_SHARED_DECLARED();
  const int tid = threadIdx.x, tx = tid % kGemmTile, ty = tid / kGemmTile;
  const int64_t tiles = grid.count();  // grid: the row-major 16 x 16 output tiles of C
#pragma unroll 1  // no trip-count division (a 64-bit div.s64) before the loop
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int64_t i0, j0;
    grid.tile(t, &i0, &j0);
    T acc = 0;
    for (int64_t k0 = 0; k0 < K; k0 += kGemmTile) {
      // Consecutive threads walk the contiguous axis of each operand (coalesced loads).
      const int ar = A.red == 1 ? ty : tx, ak = A.red == 1 ? tx : ty;
      const int bc = Bt.red == 1 ? ty : tx, bk = Bt.red == 1 ? tx : ty;
      st.a[ar][ak] = i0 + ar < M && k0 + ak < K ? A.at(i0 + ar, k0 + ak) : T(0);
      st.b[bc][bk] = j0 + bc < N && k0 + bk < K ? Bt.at(j0 + bc, k0 + bk) : T(0);
      __syncthreads();
      const int kn = K - k0 < kGemmTile ? int(K - k0) : kGemmTile;  // no padded terms: exactly the k < K sum
      for (int kk = 0; kk < kn; ++kk) acc += st.a[ty][kk] * st.b[tx][kk];
      __syncthreads();
    }
    const int64_t i = i0 + ty, j = j0 + tx;
    if (i < M && j < N) {
      T* out = C + i * c_row + j * c_col;
      *out = accumulate ? *out + acc : acc;
    }
  }
}

// C = A B, or C += A B with accumulate (A (M, K), B (K, N), C (M, N): any strides, one device,
// one floating dtype), by gemm_kernel.
inline void matmul_into(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool accumulate) {
  const int64_t M = A.size(0), K = A.size(1), N = B.size(1);
  TORCH_CHECK(B.size(0) == K && C.size(0) == M && C.size(1) == N, "pddm_ext: matmul_into: shapes do not match");
  if (M == 0 || N == 0) return;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "pddm_matmul_cuda", [&] {
    using T = scalar_t;
    const auto grid = TileGrid::make(false, M, N, kGemmTile, kGemmTile);
    const int64_t tiles = grid.count();
    const int blocks = int(std::min<int64_t>(tiles, 65535));
    PDDM_LAUNCH(gemm_kernel<T>, blocks, kThreads, 0, current_stream())(
        StridedMatrix<T>{A.data_ptr<T>(), A.stride(0), A.stride(1)},
        StridedMatrix<T>{B.data_ptr<T>(), B.stride(1), B.stride(0)}, C.data_ptr<T>(), C.stride(0), C.stride(1), M, N,
        K, accumulate, grid);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// P = rows W_v^T (rows (count, d), W_v (h, d)).
inline at::Tensor project_rows(const at::Tensor& rows, const at::Tensor& W_v) {
  auto P = at::empty({rows.size(0), W_v.size(0)}, rows.options());
  matmul_into(P, rows, W_v.t(), false);
  return P;
}

// The arithmetic of the tile products for inputs of dtype T on device (docs/design.md#precision):
// float64 always FP64; float32 follows torch.get_float32_matmul_precision() as PyTorch's own float32
// matmuls do: "highest" FP32 (the default), "high" 3xTF32 (float32-level accuracy), "medium" TF32;
// torch.backends.cuda.matmul.fp32_precision "ieee" FP32, "tf32" TF32 (3xTF32 under "high").
// A GPU before sm_80 has no TF32 tensor cores: FP32 there under every setting (as cuBLAS).
// product_dtype float16 / bfloat16 (float32 tensors of half inputs, op_checks.h check_product_dtype):
// float16 / bfloat16 tile products (kFp16 / kBf16) on sm_80 and later whatever the float32 setting,
// FP32 before sm_80.
template <typename T>
inline TileMath tile_math(const c10::Device& device, std::optional<at::ScalarType> product_dtype = std::nullopt) {
  if constexpr (!std::is_same_v<T, float>) {
    return TileMath::kFp32;
  } else {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, int(device.index())));
    if (major < 8) return TileMath::kFp32;
    if (product_dtype.has_value()) {
      TORCH_CHECK(*product_dtype == at::kHalf || *product_dtype == at::kBFloat16,
                  "pddm_ext: product_dtype must be float16 or bfloat16, got ", *product_dtype);
      return *product_dtype == at::kHalf ? TileMath::kFp16 : TileMath::kBf16;
    }
#if PDDM_TORCH_FP32_PRECISION_API
    // torch.backends.cuda.matmul.fp32_precision (the newer API) first: "ieee" is FP32 whatever the
    // legacy setting says, "tf32" is tensor cores; which of them (3xTF32 for "high", one TF32 pass for
    // "medium") the legacy setting tells, and one TF32 pass when only the newer API was used.
    switch (at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL)) {
      case at::Float32Precision::IEEE: return TileMath::kFp32;
      case at::Float32Precision::BF16:
        TORCH_CHECK(false, "pddm_ext: torch.backends.cuda.matmul.fp32_precision = 'bf16' is not supported by the "
                           "fused kernels (docs/design.md#precision): use 'tf32' or 'ieee', or "
                           "torch.set_float32_matmul_precision('highest' | 'high' | 'medium')");
      case at::Float32Precision::TF32: {
        std::optional<at::Float32MatmulPrecision> legacy;
        try {
          legacy = at::globalContext().float32MatmulPrecision();
        } catch (const c10::Error&) {  // torch refuses the legacy getter once the newer API was used
        }
        return legacy == at::Float32MatmulPrecision::HIGH ? TileMath::kTf32x3 : TileMath::kTf32;
      }
      default: break;  // NONE / DEFAULT: the legacy setting decides
    }
#endif
    at::Float32MatmulPrecision precision;
    try {
      precision = at::globalContext().float32MatmulPrecision();
    } catch (const c10::Error&) {
      TORCH_CHECK(false, "pddm_ext: the float32 matmul precision was set with "
                         "torch.backends.cuda.matmul.fp32_precision, which the fused kernels read only with "
                         "torch 2.13 or later: set it with torch.set_float32_matmul_precision() instead");
    }
    switch (precision) {
      case at::Float32MatmulPrecision::HIGHEST: return TileMath::kFp32;
      case at::Float32MatmulPrecision::HIGH: return TileMath::kTf32x3;
      case at::Float32MatmulPrecision::MEDIUM: return TileMath::kTf32;
    }
    TORCH_CHECK(false, "pddm_ext: unknown float32 matmul precision");
  }
}

// The inputs of the PDDM launchers (scores, its backward, mining), prepared once: contiguous rows
// and parameters, the sizes, and the projections P = rows W_v^T (project_rows).
struct PddmInputs {
  bool batch = true;
  int64_t m = 0, n = 0, d = 0, h = 0, c = 0;
  at::Tensor x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, Px, Py;
  std::optional<at::ScalarType> product_dtype;  // the op's product_dtype (tile_math)

  template <typename T>
  PddmParams<T> params(bool normalize_inputs) const {
    return {W_u.data_ptr<T>(), b_u.data_ptr<T>(), b_v.data_ptr<T>(), W_c.data_ptr<T>(), b_c.data_ptr<T>(),
            w_s.data_ptr<T>(), b_s.data_ptr<T>(), d,                  h,                  c,
            W_v.data_ptr<T>(), normalize_inputs,  tile_math<T>(x.device(), product_dtype)};
  }
  template <typename T>
  PairRows<T> rows() const {
    return {x.data_ptr<T>(), Px.data_ptr<T>(), m, y.data_ptr<T>(), Py.data_ptr<T>(), n};
  }
};

inline PddmInputs prepare_inputs(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& W_u,
                                 const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v,
                                 const at::Tensor& W_c, const at::Tensor& b_c, const at::Tensor& w_s,
                                 const at::Tensor& b_s,
                                 std::optional<at::ScalarType> product_dtype = std::nullopt) {
  PddmInputs in;
  in.product_dtype = product_dtype;
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
