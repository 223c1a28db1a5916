// Shared-memory layout of the tile kernels' GEMMs (pair_gemm in pddm_tile.cuh): which thread touches
// which element of pair_gemm's staging and of the tile workspace it reads and writes, as constexpr
// functions of thread and element indices. pair_gemm indexes shared memory only through these, and
// tests/cpp/test_smem_banks.cpp evaluates the same functions on the host for every lane of a warp and
// checks that each of its access patterns is free of bank conflicts under the hardware's rule (32
// banks of 4 bytes; a warp's 4-, 8- and 16-byte accesses are served per 32, 16 and 8 lanes; lanes
// reading one address share it). The per-tile reductions outside pair_gemm (norms, the score sum,
// the backward's dP/dx sums) are not modelled: they run once per tile, not once per reduction step,
// and may conflict 2-way for h or d below 32 or not a multiple of it.
//
// Plain C++ (no CUDA headers), so that the host test needs neither nvcc nor torch.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PDDM_HOST_DEVICE __host__ __device__
#else
#define PDDM_HOST_DEVICE
#endif

namespace pddm_ext::cuda::layout {

// The tile shapes of the CUDA kernels are these constants, the one place to change them (the CPU
// kernels choose theirs in csrc/cpu/tile_shapes.h); torch.ops.pddm_ext.tile_shapes reports them in
// every build, so that tests can pick sizes on either side of a tile edge.
constexpr int kThreads = 256;          // threads per block (8 warps)
constexpr int kTile = 8;               // PDDM tiles (scores, backward, mining) are kTile x kTile pairs
constexpr int kPairs = kTile * kTile;  // 64
constexpr int kChunk = 16;             // reduction chunk staged in shared memory (pair_gemm)
constexpr int kOutBlock = 128;         // outputs per pass of pair_gemm (16 groups x 8)
constexpr int kPairGroups = 16;        // pair_gemm: 16 groups of 4 pairs ...
constexpr int kOutGroups = 16;         // ... times 16 groups of 8 outputs = 256 threads
static_assert(kPairGroups * 4 == kPairs && kPairGroups * kOutGroups == kThreads, "pair_gemm layout");
static_assert(kOutGroups * 8 == kOutBlock, "pair_gemm layout");
// Euclidean mining tiles are kEuclidTile x kEuclidTile pairs (2d flops a pair need big tiles), the
// rows' coordinates staged kEuclidChunk at a time; each of the 16 x 16 threads owns 2 x 2 pairs.
constexpr int kEuclidTile = 32;
constexpr int kEuclidChunk = 32;
static_assert(kEuclidTile == 2 * 16 && kThreads == 16 * 16, "mine_euclidean_kernel: 2 x 2 pairs per thread");

// Elements per 16-byte access (float4 / double2).
template <typename T>
PDDM_HOST_DEVICE constexpr int vec_elems() {
  return int(16 / sizeof(T));
}

// Row strides of the two staging chunks, both stored k-major (row kk holds reduction index k0 + kk of
// every pair / output): padded by 16 bytes, which keeps rows 16-byte aligned and shifts consecutive
// rows by 4 banks.
template <typename T>
PDDM_HOST_DEVICE constexpr int a_stride() {
  return kPairs + vec_elems<T>();
}
template <typename T>
PDDM_HOST_DEVICE constexpr int w_stride() {
  return kOutBlock + vec_elems<T>();
}

// Filling a staging chunk whose source is contiguous along k: element e (e = tid, tid + kThreads, ...)
// goes to row fill_k(e) and column fill_col(e). A warp covers 8 consecutive k of 4 consecutive
// columns: coalesced 8-element runs from global memory, and with 4-bank row shifts its stores hit 32
// distinct banks (16 k of 2 columns, the obvious order, hit 16 banks twice).
PDDM_HOST_DEVICE constexpr int fill_k(int e) {
  return e % 8 + 8 * ((e / 32) % 2);
}
PDDM_HOST_DEVICE constexpr int fill_col(int e) {
  return (e % 32) / 8 + 4 * (e / 64);
}

// Output t in [0, 8) of out_group og is column out_column<T>(og, t) of the kOutBlock outputs: a
// thread's 8 outputs are 8 / vec_elems 16-byte vectors kOutGroups vectors apart (not 8 adjacent
// columns), so that the 8 lanes of each 16-byte load read 8 consecutive vectors: 32 distinct banks.
template <typename T>
PDDM_HOST_DEVICE constexpr int out_column(int og, int t) {
  return (t / vec_elems<T>()) * (kOutGroups * vec_elems<T>()) + og * vec_elems<T>() + t % vec_elems<T>();
}

// The epilogue visits a thread's 8 outputs in a lane-dependent order: at step t, thread (pg, og)
// takes its output epilogue_slot<T>(pg, og, t). The XOR spreads one step's stores over all banks: og
// and og + 8 would otherwise hit the same bank, and for 4-byte elements so would the two pair groups
// of a warp (their rows are 4 rows apart). A permutation of [0, 8) that stays within each vector.
template <typename T>
PDDM_HOST_DEVICE constexpr int epilogue_flip(int pg, int og) {
  return (og >= 8 ? 1 : 0) | (vec_elems<T>() >= 4 && pg % 2 == 1 ? 2 : 0);
}
template <typename T>
PDDM_HOST_DEVICE constexpr int epilogue_slot(int pg, int og, int t) {
  return (t / vec_elems<T>()) * vec_elems<T>() + ((t % vec_elems<T>()) ^ epilogue_flip<T>(pg, og));
}

// The tensor-core path of pair_gemm (TensorCoreBlock in pddm_tile.cuh, float only) hands its outputs
// to the FP32 path's epilogue through the staging buffer in four passes f: every warp w stores its
// accumulator f (pairs 16 (w % 4) .. + 16, outputs 64 (w / 4) + 16 f .. + 16) row-major at
// tensor_output_offset(w) with rows tensor_output_stride() apart (store_matrix_sync, whose per-lane
// pattern NVIDIA does not document, so it is not modelled), and the threads of out_group og with
// tensor_output_pass(og) == f read their outputs of pair 4 pg + q, out_column(og, 4 v) .. + 4, as
// 16-byte vectors at element tensor_output_index(pg, og, q, v).
PDDM_HOST_DEVICE constexpr int tensor_output_stride() {
  return 32 + 4;  // two 16-wide fragments side by side, padded by 16 bytes
}
PDDM_HOST_DEVICE constexpr int tensor_output_offset(int warp) {
  return 16 * (warp % 4) * tensor_output_stride() + 16 * (warp / 4);
}
PDDM_HOST_DEVICE constexpr int tensor_output_pass(int og) {
  return og / 4;
}
PDDM_HOST_DEVICE constexpr int tensor_output_index(int pg, int og, int q, int v) {
  return (pg * 4 + q) * tensor_output_stride() + 16 * v + 4 * (og % 4);
}

// Row stride (elements) of a tile-workspace matrix with n columns (Z, dZ, Q, dU): a multiple of 32
// plus 8, so that rows start 8 elements apart modulo 32 and the staging fill above reads 4 rows x 8
// consecutive columns from 32 distinct banks (8-byte elements: 2 rows x 8 per half-warp).
PDDM_HOST_DEVICE constexpr int64_t workspace_stride(int64_t n) {
  return (n + 31) / 32 * 32 + 8;
}

}  // namespace pddm_ext::cuda::layout
