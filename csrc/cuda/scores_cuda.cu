// All-pairs PDDM scores on the GPU: the fused forward and its fused backward (docs/design.md#the-pddm-unit, #memory-and-speed).
//
// Both are persistent tile kernels (pddm_tile.cuh). The backward recomputes each tile's forward,
// then walks it back in the tile's workspace: gradients of the inputs and of the projections
// P = x W_v^T go to global memory with atomics (O((m + n)(d + h))), or, under
// torch.use_deterministic_algorithms(True), to per-block slices summed in a fixed order; parameter
// gradients to a per-block slab that only its block touches, summed over blocks at the end.
// Nothing is (m, n, d) or (m, n, h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <array>
#include <tuple>

#include "../op_checks.h"
#include "backward_sizing.h"
#include "pddm_tile.cuh"

namespace pddm_ext::cuda {
namespace {

// kHalf: the instantiation for half inputs (pair_gemm), launched only for them.
template <typename T, bool kHalf = false>
__global__ void __launch_bounds__(kThreads) scores_kernel(PddmParams<T> w, PairRows<T> rows, TileGrid grid,
                                                           T* __restrict__ out, T* scratch, int64_t ws_elems) {
  PDDM_DYNAMIC_SHARED(smem_raw);
  PDDM_SHARED(ts, TileScalars<T>);
  PDDM_SHARED_DECLARED();
  T* sm = reinterpret_cast<T*>(smem_raw);
  T* sm_a = sm;
  T* sm_w = sm + staging_a_elems<T>();
  T* Z = block_workspace(sm, scratch, ws_elems, w.stages);
#pragma unroll 1  // no trip-count division (a 64-bit div.s64) before the loop
  for (int64_t t = blockIdx.x; t < grid.count(); t += gridDim.x) {
    int64_t i0, r0;
    grid.tile(t, &i0, &r0);
    __syncthreads();  // the previous tile's readers of shared memory are done
    pddm_tile_activations<T, kHalf>(w, rows, TilePairs{i0, r0}, Z, ts, sm_a, sm_w);
    pddm_tile_scores<T, kHalf>(w, Z, ts, sm_a, sm_w);
    if (threadIdx.x < kPairs) {
      const int p = threadIdx.x;
      const int64_t i = i0 + p / kTile, r = r0 + p % kTile;
      if (i < rows.m && r < rows.n && !(grid.batch && r < i)) {
        out[i * rows.n + r] = ts.score[p];
        if (grid.batch) out[r * rows.n + i] = ts.score[p];  // S is symmetric: one triangle computed
      }
    }
  }
}

// The kernel instantiation for a tile math: half inputs run their own (kHalf).
template <typename T>
auto scores_kernel_for(TileMath math) {
  if constexpr (std::is_same_v<T, float>) {
    if (half_tile_math(math)) return &scores_kernel<float, true>;
  }
  return &scores_kernel<T>;
}

at::Tensor scores_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, const at::Tensor& W_u,
                       const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v, const at::Tensor& W_c,
                       const at::Tensor& b_c, const at::Tensor& w_s, const at::Tensor& b_s,
                       bool normalize_inputs, std::optional<at::ScalarType> product_dtype) {
  check_pddm_args("pddm_ext::scores", x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  check_product_dtype("pddm_ext::scores", product_dtype, x_in);
  const DeviceGuard guard(x_in.device());
  const auto in = prepare_inputs(x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, product_dtype);
  const auto& x = in.x;
  const int64_t m = in.m, n = in.n, h = in.h;
  auto out = at::empty({m, n}, x.options());
  const auto grid = TileGrid::make(in.batch, m, n, kTile, kTile);
  if (grid.count() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_scores_cuda", [&] {
    using T = scalar_t;
    auto w = in.params<T>(normalize_inputs);
    const auto rows = in.rows<T>();
    const int64_t ws_elems = tile_workspace_elems({2 * h});  // Z
    const auto scores_tile_kernel = scores_kernel_for<T>(w.math);
    const auto plan = plan_launch(scores_tile_kernel, x.get_device(), grid.count(),
                                  pair_gemm_staging_elems<T>() * sizeof(T), size_t(ws_elems) * sizeof(T),
                                  int64_t(1) << 30, w.math);
    w.stages = plan.stages;
    at::Tensor scratch;
    if (!plan.workspace_in_shared) scratch = at::empty({int64_t(plan.blocks) * ws_elems}, x.options());
    PDDM_LAUNCH(scores_tile_kernel, plan.blocks, kThreads, plan.smem_bytes, current_stream())(
        w, rows, grid, out.data_ptr<T>(), plan.workspace_in_shared ? nullptr : scratch.data_ptr<T>(), ws_elems);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The memory budget of the backward's per-block buffers (backward_sizing.h). The emulation takes it
// from PDDM_EMU_BACKWARD_BUDGET (docs/emulation.md), so that small tests reach the column chunks.
inline int64_t backward_budget_bytes() {
#ifdef PDDM_EXT_CUDA_EMULATION
  return ::pddm_emu::backward_budget_bytes(kBackwardBudgetBytes);
#else
  return kBackwardBudgetBytes;
#endif
}

// Layout of a block's parameter-gradient slab. W_v: the near-antipodal pairs' share of dW_v (the
// others reach it through dP).
struct SlabLayout {
  int64_t W_u, W_c, b_u, b_v, b_c, w_s, b_s, W_v, size;
  static SlabLayout make(int64_t d, int64_t h, int64_t c) {
    SlabLayout s;
    s.W_u = 0;
    s.W_c = s.W_u + h * d;
    s.b_u = s.W_c + c * 2 * h;
    s.b_v = s.b_u + h;
    s.b_c = s.b_v + h;
    s.w_s = s.b_c + c;
    s.b_s = s.w_s + c;
    s.W_v = s.b_s + 1;
    s.size = s.W_v + h * d;
    return s;
  }
};

// Where the backward writes. dy/dPy alias dx/dPx in batch mode; a null dx / dy / dPx / dPy: that
// gradient is not needed; slab == nullptr: no parameter gradients. per_block: dx, dy, dPx, dPy are
// (gridDim.x, rows, cols) buffers, one slice per block, which only that block writes (plain adds,
// in its fixed tile order), summed over blocks afterwards: deterministic, for
// torch.use_deterministic_algorithms(True). Otherwise one (rows, cols) buffer updated with atomics.
template <typename T>
struct BackwardOut {
  const T* grad;
  int64_t grad_stride0, grad_stride1;
  T *dx, *dy, *dPx, *dPy, *slab;
  SlabLayout layout;
  bool per_block;
};

// Component j of W_v^T g_v with g_v = dZ_v * inv_v (dZ_v: the pair's dL/dpre_v): a near-antipodal
// pair's mean-branch gradient of x and of y.
template <typename T>
__device__ __forceinline__ T mean_direct_input_grad(const PddmParams<T>& w, const T* dZ_v, T inv_v, int64_t j) {
  T s = 0;
  for (int64_t k = 0; k < w.h; ++k) s += w.W_v[k * w.d + j] * dZ_v[k];
  return s * inv_v;
}

// Adds v to a gradient: a plain add into the block's own slice, or an atomic add into the shared
// buffer. Within one tile no two threads of a block update the same element (each thread owns a
// row of the tile and a column of features; in batch mode a diagonal tile's row and column are the
// same thread's), so the plain add needs no atomics.
template <typename T>
__device__ __forceinline__ void add_gradient(T* p, T v, bool per_block) {
  if (per_block) {
    *p += v;
  } else {
    atomicAdd(p, v);
  }
}

// Per-pair scalars of the backward (in addition to the forward's TileScalars).
template <typename T>
struct BackwardScalars {
  T g[kPairs];       // dL/dS of the pair (batch mode: dS[i, r] + dS[r, i], once per unordered pair)
  T s_u[kPairs], s_v[kPairs];  // z . dz of the two halves of Z
  T coef_v[kPairs];  // d/d(x + y) of the mean branch's clamped norm, per unit of (x + y)
  T s_hat[kPairs];   // normalize(u) . dL/dnormalize(u)
};

// A backward block's workspace matrices, parameter-gradient slab and input-gradient buffers (null:
// not needed).
template <typename T>
struct BlockPointers {
  T *Z, *dZ, *Q, *dU, *slab, *dx, *dy, *dPx, *dPy;
};

// The pairs the backward walks: the dense tiles of grid, or (count >= 0) the live pairs of a sparse
// dS, kPairs at a time (live_pair_list in scores_backward_cuda). Which, the device chose: the kernel
// first loads it from *listed (resolved()), so the host never reads it.
struct BackwardPairs {
  TileGrid grid;
  const int64_t* list;    // (capacity, 2) row-major (i, r), batch mode r >= i
  const int64_t* listed;  // device memory: the number of listed pairs, or -1: walk the dense tiles
  int64_t count = -1;     // *listed once resolved
  __device__ __forceinline__ BackwardPairs resolved() const {
    BackwardPairs p = *this;
    p.count = list != nullptr ? *listed : -1;
    return p;
  }
  __device__ __forceinline__ int64_t tiles() const { return count >= 0 ? (count + kPairs - 1) / kPairs : grid.count(); }
  __device__ __forceinline__ TilePairs tile(int64_t t) const {
    TilePairs tp;
    if (count >= 0) {
      tp.list = list, tp.begin = t * kPairs, tp.count = count;
    } else {
      grid.tile(t, &tp.i0, &tp.r0);
    }
    return tp;
  }
};

// The live pairs of dS (a nonzero gradient; batch mode: dS[i, r] or dS[r, i] nonzero, upper
// triangle, diagonal included) as a (capacity, 2) row-major list of (i, r), and in `listed` (one
// int64 in device memory) their count when walking them kPairs at a time beats walking the dense
// tiles: when they fill at most a quarter of the tiles that hold any (a sparse dS, e.g. a margin
// loss over mined pairs). Else listed = -1 (dense tiles). Decided on the device: no host read, no
// synchronisation. So the list has a size fixed by the shapes (nonzero_static): a quarter of the
// grid's pairs, the most the rule lists, 4 bytes per pair of the grid, allocated whichever walk is
// chosen. A pair whose dS[i, r] + dS[r, i] cancels is listed and gets g = 0 in the kernel, which
// skips it. Also costs (m, n) bool temporaries and elementwise passes over dS; an expanded dS (a
// zero stride, e.g. the gradient of S.sum()) is dense and skips the probe (undefined tensors:
// dense tiles).
struct LivePairs {
  at::Tensor list, listed;
};
// torch 2.6 added nonzero_static for CUDA tensors; with an older torch the list comes from nonzero,
// padded to the capacity, whose size the host reads (one synchronisation; docs/design.md).
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6))
#define PDDM_TORCH_CUDA_NONZERO_STATIC 1
#else
#define PDDM_TORCH_CUDA_NONZERO_STATIC 0
#endif
inline at::Tensor listed_pairs(const at::Tensor& live, int64_t capacity) {
  if (PDDM_TORCH_CUDA_NONZERO_STATIC || live.is_cpu()) return at::nonzero_static(live, capacity, -1);
  const auto found = at::nonzero(live);
  const int64_t kept = std::min(found.size(0), capacity);
  auto list = at::full({capacity, 2}, -1, found.options());
  list.narrow(0, 0, kept).copy_(found.narrow(0, 0, kept));
  return list;
}
inline LivePairs live_pair_list(const at::Tensor& grad, bool batch, int64_t grid_tiles) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const int64_t capacity = grid_tiles * int64_t(kPairs) / 4;  // 4 count <= live tiles * kPairs
  if (rows == 0 || cols == 0 || grad.stride(0) == 0 || grad.stride(1) == 0 || capacity == 0) return {};
  auto live = grad != 0;
  if (batch) live = live.logical_or(live.t()).triu();
  const int64_t tile_rows = (rows + kTile - 1) / kTile, tile_cols = (cols + kTile - 1) / kTile;
  auto padded = at::zeros({tile_rows * kTile, tile_cols * kTile}, live.options());
  padded.narrow(0, 0, rows).narrow(1, 0, cols).copy_(live);
  const auto count = live.sum().to(at::kLong).reshape({1});
  const auto live_tiles = padded.view({tile_rows, kTile, tile_cols, kTile}).any(3).any(1).sum().to(at::kLong).reshape({1});
  const auto walk = count.gt(0).logical_and(count.mul(4).le(live_tiles.mul(int64_t(kPairs))));
  return {listed_pairs(live, capacity).contiguous(),  // row-major order of (i, r)
          at::where(walk, count, at::full_like(count, -1))};
}

// The backward's pair_gemm staging keeps one buffer (a compile-time constant, so that none of the
// double-buffering code is compiled into it): with two, ptxas (nvcc 13.0, sm_90) spilled the float
// backward, already at 255 registers, to local memory (make cuda-resources).
constexpr int kBackwardStages = 1;

template <typename T>
__global__ void __launch_bounds__(kThreads) scores_backward_kernel(PddmParams<T> w, PairRows<T> rows, BackwardPairs pairs,
                                                                    BackwardOut<T> out, T* scratch, int64_t ws_elems) {
  PDDM_DYNAMIC_SHARED(smem_raw);
  PDDM_SHARED(ts, TileScalars<T>);
  PDDM_SHARED(bs, BackwardScalars<T>);
  PDDM_SHARED(bp, BlockPointers<T>);
  PDDM_SHARED_DECLARED();
  T* sm = reinterpret_cast<T*>(smem_raw);
  T* sm_a = sm;
  T* sm_w = sm + staging_a_elems<T>();
  const int64_t d = w.d, h = w.h, c = w.c;
  // Row strides of the workspace matrices (tile_workspace_elems, smem_layout.h).
  const int64_t ldz = layout::workspace_stride(2 * h), ldq = layout::workspace_stride(c), ldu = layout::workspace_stride(d);
  // The block's pointers live in shared memory (bp, set by thread 0 before the first tile's barrier)
  // and are read where used: kept in registers across the tile loop, they pushed it past 255.
  if (threadIdx.x == 0) {
    bp.Z = block_workspace(sm, scratch, ws_elems, kBackwardStages);  // (kPairs, 2h) activations, then kept for dW_c
    bp.dZ = bp.Z + kPairs * ldz;                     // (kPairs, 2h) dL/dZ, then dL/d(branch pre-activations)
    bp.Q = bp.dZ + kPairs * ldz;                     // (kPairs, c) q = relu(W_c Z + b_c), then dL/d(W_c Z)
    bp.dU = bp.Q + kPairs * ldq;                     // (kPairs, d) dL/dnormalize(u)
    bp.slab = out.slab == nullptr ? nullptr : out.slab + int64_t(blockIdx.x) * out.layout.size;
    // This block's slices of the input-side gradients (per_block), else the shared buffers.
    const int64_t slice = out.per_block ? int64_t(blockIdx.x) : 0;
    bp.dx = out.dx == nullptr ? nullptr : out.dx + slice * rows.m * w.d;
    bp.dy = out.dy == nullptr ? nullptr : out.dy + slice * rows.n * w.d;
    bp.dPx = out.dPx == nullptr ? nullptr : out.dPx + slice * rows.m * w.h;
    bp.dPy = out.dPy == nullptr ? nullptr : out.dPy + slice * rows.n * w.h;
  }
  T* const &Z = bp.Z, *const &dZ = bp.dZ, *const &Q = bp.Q, *const &dU = bp.dU, *const &slab = bp.slab;
  T* const &g_dx = bp.dx, *const &g_dy = bp.dy, *const &g_dPx = bp.dPx, *const &g_dPy = bp.dPy;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool need_inputs = out.dx != nullptr || out.dy != nullptr;
  pairs = pairs.resolved();  // the walk the device chose
  const bool batch = pairs.grid.batch, listed = pairs.count >= 0;
  const int64_t tiles = pairs.tiles();

#pragma unroll 1  // no trip-count division (a 64-bit div.s64) before the loop
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const TilePairs tp = pairs.tile(t);
    __syncthreads();
    if (tid < kPairs) {
      int64_t i = tp.i0 + tid / kTile, r = tp.r0 + tid % kTile;
      bool live = i < rows.m && r < rows.n;
      if (listed) {
        live = tp.begin + tid < tp.count;
        tp.pair(tid, rows.m, rows.n, &i, &r);
      }
      T g = 0;
      if (live) {
        g = out.grad[i * out.grad_stride0 + r * out.grad_stride1];
        // Batch mode computes each unordered pair once: it carries dS[i, r] + dS[r, i].
        if (batch) g = r < i ? T(0) : (r == i ? g : g + out.grad[r * out.grad_stride0 + i * out.grad_stride1]);
      }
      bs.g[tid] = g;
    }
    __syncthreads();
    // Pairs with a zero gradient contribute nothing (as on the CPU path): a tile without any is
    // skipped (every thread reads the same bs.g, so the whole block skips it together), and within a
    // tile every sum over pairs below skips them, so that their activations (which may be inf or
    // NaN, say for a row of x that only such pairs touch) never reach a gradient.
    bool tile_has_gradient = false;
    for (int p = 0; p < kPairs; ++p) tile_has_gradient |= bs.g[p] != T(0);
    if (!tile_has_gradient) continue;
    pddm_tile_activations<T, false, kBackwardStages>(w, rows, tp, Z, ts, sm_a, sm_w);

    // Joint and score layers: q = relu(W_c Z + b_c), S = w_s . q + b_s.
    pair_gemm<T, false, kBackwardStages>(
        c, 2 * h, w.W_c, 2 * h, 1, [&](int p, int64_t k) { return Z[p * ldz + k]; },
        [&](int p, int64_t j, T q) { Q[p * ldq + j] = relu(q + w.b_c[j]); }, sm_a, sm_w, w.math, kBackwardStages);
    if (slab != nullptr) {
      for (int64_t j = tid; j < c; j += kThreads) {
        T dws = 0, dbc = 0;
        for (int p = 0; p < kPairs; ++p) {
          if (bs.g[p] == T(0)) continue;
          const T q = Q[p * ldq + j];
          dws += bs.g[p] * q;
          dbc += q > T(0) ? bs.g[p] * w.w_s[j] : T(0);
        }
        slab[out.layout.w_s + j] += dws;
        slab[out.layout.b_c + j] += dbc;
      }
      if (tid == 0) {
        T dbs = 0;
        for (int p = 0; p < kPairs; ++p) dbs += bs.g[p];
        slab[out.layout.b_s] += dbs;
      }
    }
    __syncthreads();
    RowColWalk pj(kPairs, c);
    for (int64_t e = tid; e < int64_t(kPairs) * c; e += kThreads, pj.next()) {
      const int p = int(pj.row);  // < kPairs
      const int64_t j = pj.col;
      T& q = Q[p * ldq + j];
      q = q > T(0) && bs.g[p] != T(0) ? bs.g[p] * w.w_s[j] : T(0);  // dL/d(W_c Z + b_c)
    }
    __syncthreads();
    if (slab != nullptr) {  // dW_c += dQ^T Z over the tile's live pairs
      RowColWalk jk(c, 2 * h);
      for (int64_t e = tid; e < c * 2 * h; e += kThreads, jk.next()) {
        const int64_t j = jk.row, k = jk.col;
        T acc = 0;
        for (int p = 0; p < kPairs; ++p) {
          if (bs.g[p] != T(0)) acc += Q[p * ldq + j] * Z[p * ldz + k];
        }
        slab[out.layout.W_c + e] += acc;
      }
    }
    // dZ = dQ W_c: W(o = k, red = j) = W_c[j, k].
    pair_gemm<T, false, kBackwardStages>(
        2 * h, c, w.W_c, 1, 2 * h, [&](int p, int64_t j) { return Q[p * ldq + j]; },
        [&](int p, int64_t k, T v) { dZ[p * ldz + k] = v; }, sm_a, sm_w, w.math, kBackwardStages);

    // Backward of the two normalisations and the branch ReLUs (z > 0 exactly where the ReLU was active).
    for (int p = warp; p < kPairs; p += kWarps) {
      T su = 0, sv = 0;
      for (int64_t k = lane; k < h; k += 32) {
        su += Z[p * ldz + k] * dZ[p * ldz + k];
        sv += Z[p * ldz + h + k] * dZ[p * ldz + h + k];
      }
      su = warp_sum(su);
      sv = warp_sum(sv);
      if (lane == 0) {
        bs.s_u[p] = su;
        bs.s_v[p] = sv;
      }
    }
    __syncthreads();
    RowColWalk pk(kPairs, 2 * h);
    for (int64_t e = tid; e < int64_t(kPairs) * 2 * h; e += kThreads, pk.next()) {
      const int p = int(pk.row);  // < kPairs
      const int64_t k = pk.col;
      const bool u_half = k < h;
      const T z = Z[p * ldz + k];
      T& dz = dZ[p * ldz + k];
      dz = z > T(0) && bs.g[p] != T(0)
               ? normalize_backward(dz, z, u_half ? bs.s_u[p] : bs.s_v[p], u_half ? ts.norm_u1[p] : ts.norm_v1[p])
               : T(0);
    }
    __syncthreads();
    // Now dZ holds dpre: (kPairs, h) for the difference branch, (kPairs, h) for the mean branch; 0 for
    // the pairs without gradient.
    if (slab != nullptr) {
      for (int64_t k = tid; k < h; k += kThreads) {
        T dbu = 0, dbv = 0;
        for (int p = 0; p < kPairs; ++p) {
          dbu += dZ[p * ldz + k];
          dbv += dZ[p * ldz + h + k];
        }
        slab[out.layout.b_u + k] += dbu;
        slab[out.layout.b_v + k] += dbv;
      }
    }
    // Mean branch: pre_v = (P_i + P_r) * inv_v + b_v with inv_v = mean_scale (pddm_common.h).
    for (int p = warp; p < kPairs; p += kWarps) {
      T dinv_v = 0;
      for (int64_t k = lane; k < h; k += 32) dinv_v += dZ[p * ldz + h + k] * mean_pre_projection(w, rows, ts, p, k);
      dinv_v = warp_sum(dinv_v);
      if (lane == 0) bs.coef_v[p] = mean_scale_coef(dinv_v, ts.norm_v[p], w.normalize_inputs);
    }
    // Near-antipodal pairs take their mean-branch gradient g_v from x + y directly (below); through
    // dP_x and dP_y, dW_v = dP_x^T x + dP_y^T y would cancel.
    const bool any_direct = __syncthreads_or(tid < kPairs && ts.direct[tid] && bs.g[tid] != T(0));
    const auto dP_of = [&](int p, int64_t k) {  // pair p's share of dP_i and dP_r (0: none)
      return ts.direct[p] || bs.g[p] == T(0) ? T(0) : dZ[p * ldz + h + k] * ts.inv_v[p];
    };
    if (!listed) {
      RowColWalk ak(kTile, h);
      for (int64_t e = tid; e < int64_t(kTile) * h; e += kThreads, ak.next()) {
        const int a = int(ak.row);  // < kTile
        const int64_t k = ak.col;
        if (g_dPx != nullptr && tp.i0 + a < rows.m) {  // dP_i += sum over the tile's columns
          T acc = 0;
          for (int b = 0; b < kTile; ++b) acc += dP_of(a * kTile + b, k);
          add_gradient(g_dPx + (tp.i0 + a) * h + k, acc, out.per_block);
        }
        const int b = a;
        if (g_dPy != nullptr && tp.r0 + b < rows.n) {  // dP_r += sum over the tile's rows
          T acc = 0;
          for (int a2 = 0; a2 < kTile; ++a2) acc += dP_of(a2 * kTile + b, k);
          add_gradient(g_dPy + (tp.r0 + b) * h + k, acc, out.per_block);
        }
      }
    } else {
      // A list tile: each thread owns features k and walks the pairs in order (no two threads of the
      // block touch one element, so per_block needs no atomics; the order is fixed).
      for (int64_t k = tid; k < h; k += kThreads) {
        for (int p = 0; p < kPairs; ++p) {
          if (bs.g[p] == T(0) || ts.direct[p]) continue;
          const T v = dP_of(p, k);
          if (g_dPx != nullptr) add_gradient(g_dPx + ts.row[p] * h + k, v, out.per_block);
          if (g_dPy != nullptr) add_gradient(g_dPy + ts.col[p] * h + k, v, out.per_block);
        }
      }
    }
    if (need_inputs) {
      // dL/dnormalize(u) = W_u^T dpre_u: W(o = j, red = k) = W_u[k, j].
      pair_gemm<T, false, kBackwardStages>(
          d, h, w.W_u, 1, d, [&](int p, int64_t k) { return dZ[p * ldz + k]; },
          [&](int p, int64_t j, T v) { dU[p * ldu + j] = v; }, sm_a, sm_w, w.math, kBackwardStages);
      for (int p = warp; p < kPairs; p += kWarps) {
        const int64_t i = ts.row[p], r = ts.col[p];
        T s = 0;
        for (int64_t j = lane; j < d; j += 32) s += abs_value(rows.x[i * d + j] - rows.y[r * d + j]) * dU[p * ldu + j];
        s = warp_sum(s);
        if (lane == 0) bs.s_hat[p] = s * ts.inv_u[p];
      }
      __syncthreads();
      // Pair p's gradient of x_i (x_side) or of y_r at feature j: u = |x - y| (d/dx = sign(x - y),
      // sign(0) = 0) and x + y of the mean branch; 0 for a pair without gradient.
      const auto input_grad = [&](int p, int64_t j, bool x_side) {
        if (bs.g[p] == T(0)) return T(0);
        const T xj = rows.x[ts.row[p] * d + j], yj = rows.y[ts.col[p] * d + j], diff = xj - yj;
        const T du = w.normalize_inputs
                         ? normalize_backward(dU[p * ldu + j], abs_value(diff) * ts.inv_u[p], bs.s_hat[p], ts.norm_u[p])
                         : dU[p * ldu + j];
        T v = (x_side ? sign_of(diff) : -sign_of(diff)) * du + bs.coef_v[p] * (xj + yj);
        if (any_direct && ts.direct[p]) v += mean_direct_input_grad(w, dZ + p * ldz + h, ts.inv_v[p], j);
        return v;
      };
      if (!listed) {
        RowColWalk aj(kTile, d);
        for (int64_t e = tid; e < int64_t(kTile) * d; e += kThreads, aj.next()) {
          const int a = int(aj.row);  // < kTile
          const int64_t j = aj.col;
          if (g_dx != nullptr && tp.i0 + a < rows.m) {
            T acc = 0;
            for (int b = 0; b < kTile && tp.r0 + b < rows.n; ++b) acc += input_grad(a * kTile + b, j, true);
            add_gradient(g_dx + (tp.i0 + a) * d + j, acc, out.per_block);
          }
          const int b = a;
          if (g_dy != nullptr && tp.r0 + b < rows.n) {
            T acc = 0;
            for (int a2 = 0; a2 < kTile && tp.i0 + a2 < rows.m; ++a2) acc += input_grad(a2 * kTile + b, j, false);
            add_gradient(g_dy + (tp.r0 + b) * d + j, acc, out.per_block);
          }
        }
      } else {
        for (int64_t j = tid; j < d; j += kThreads) {
          for (int p = 0; p < kPairs; ++p) {
            if (bs.g[p] == T(0)) continue;
            if (g_dx != nullptr) add_gradient(g_dx + ts.row[p] * d + j, input_grad(p, j, true), out.per_block);
            if (g_dy != nullptr) add_gradient(g_dy + ts.col[p] * d + j, input_grad(p, j, false), out.per_block);
          }
        }
      }
    }
    if (slab != nullptr) {
      // dW_u += sum_p (dpre_u[p] / max(||u_p||, eps)) |x_i - y_r|^T over the live pairs.
      RowColWalk kj(h, d);
      for (int64_t e = tid; e < h * d; e += kThreads, kj.next()) {
        const int64_t k = kj.row, j = kj.col;
        T acc = 0;
        if (!listed) {  // a dense tile: its 8 rows and 8 columns read once
          T xa[kTile], yb[kTile];
#pragma unroll
          for (int a = 0; a < kTile; ++a) xa[a] = rows.x[ts.row[a * kTile] * d + j];
#pragma unroll
          for (int b = 0; b < kTile; ++b) yb[b] = rows.y[ts.col[b] * d + j];
#pragma unroll
          for (int a = 0; a < kTile; ++a) {
#pragma unroll
            for (int b = 0; b < kTile; ++b) {
              const int p = a * kTile + b;
              if (bs.g[p] != T(0)) acc += dZ[p * ldz + k] * ts.inv_u[p] * abs_value(xa[a] - yb[b]);
            }
          }
        } else {
          for (int p = 0; p < kPairs; ++p) {
            if (bs.g[p] != T(0)) {
              acc += dZ[p * ldz + k] * ts.inv_u[p] * abs_value(rows.x[ts.row[p] * d + j] - rows.y[ts.col[p] * d + j]);
            }
          }
        }
        slab[out.layout.W_u + e] += acc;
      }
      if (any_direct) {  // dW_v += g_v (x_i + y_r)^T over the tile's near-antipodal live pairs
        RowColWalk kj_direct(h, d);
        for (int64_t e = tid; e < h * d; e += kThreads, kj_direct.next()) {
          const int64_t k = kj_direct.row, j = kj_direct.col;
          T acc = 0;
          for (int p = 0; p < kPairs; ++p) {
            if (!ts.direct[p] || bs.g[p] == T(0)) continue;
            acc += dZ[p * ldz + h + k] * ts.inv_v[p] * (rows.x[ts.row[p] * d + j] + rows.y[ts.col[p] * d + j]);
          }
          slab[out.layout.W_v + e] += acc;
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
scores_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                     const at::Tensor& W_u, const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v,
                     const at::Tensor& W_c, const at::Tensor& b_c, const at::Tensor& w_s, const at::Tensor& b_s,
                     std::array<bool, 3> output_mask, bool normalize_inputs) {
  check_pddm_args("pddm_ext::scores_backward", x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  check_scores_grad("pddm_ext::scores_backward", grad, x_in, y_in);
  const DeviceGuard guard(x_in.device());
  const bool batch = !y_in.has_value();
  // The two sides of the pair space: batch mode's column side is x again.
  const bool need_x = output_mask[0], need_y = batch ? output_mask[0] : output_mask[1];
  const bool need_inputs = need_x || need_y, need_params = output_mask[2];
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto opts = x_in.options();
  const int64_t m = x_in.size(0), n = batch ? m : y_in->size(0), d = W_u.size(1), h = W_u.size(0), c = W_c.size(0);
  // Gradient buffers only for what is needed: a frozen bank (reference mode, y needs no gradient)
  // gets no (n, d) buffer, and no (n, h) one unless the parameters (W_v) need it.
  at::Tensor gx = need_x ? at::zeros({m, d}, opts) : at::zeros({0}, opts);
  at::Tensor gy = !batch && need_y ? at::zeros({n, d}, opts) : at::zeros({0}, opts);
  at::Tensor gW_u = at::zeros_like(W_u), gb_u = at::zeros_like(b_u), gW_v = at::zeros_like(W_v);
  at::Tensor gb_v = at::zeros_like(b_v), gW_c = at::zeros_like(W_c), gb_c = at::zeros_like(b_c);
  at::Tensor gw_s = at::zeros_like(w_s), gb_s = at::zeros_like(b_s);
  // As on the CPU: an input that needs no gradient gets an empty (0,) tensor back.
  const auto result = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                          at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    return {output_mask[0] ? gx : at::zeros({0}, opts), !batch && output_mask[1] ? gy : at::zeros({0}, opts),
            gW_u, gb_u, gW_v, gb_v, gW_c, gb_c, gw_s, gb_s};
  };
  if (!need_inputs && !need_params) return result();

  const auto in = prepare_inputs(x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  const auto &x = in.x, &y = in.y, &W_vc = in.W_v;
  const auto dPx = need_x || need_params ? at::zeros({m, h}, opts) : at::Tensor();
  const auto dPy = batch ? dPx : (need_y || need_params ? at::zeros({n, h}, opts) : at::Tensor());
  const auto grid = TileGrid::make(batch, m, n, kTile, kTile);
  const auto layout = SlabLayout::make(d, h, c);
  at::Tensor slab;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_scores_backward_cuda", [&] {
    using T = scalar_t;
    auto w = in.params<T>(normalize_inputs);
    const auto rows = in.rows<T>();
    const int64_t ws_elems = tile_workspace_elems({2 * h, 2 * h, c, d});  // Z, dZ, Q, dU
    // The grid and the column chunks from the shapes and the SM count (backward_sizing.h).
    const int64_t bytes = sizeof(T);
    BackwardBuffers buffers;
    if (need_params) buffers.slab_bytes = layout.size * bytes;
    if (deterministic) {
      buffers.row_x_bytes = ((need_x ? d : 0) + (dPx.defined() ? h : 0)) * bytes;
      buffers.row_y_bytes = batch ? 0 : ((need_y ? d : 0) + (dPy.defined() ? h : 0)) * bytes;
    }
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
    const int64_t budget = backward_budget_bytes();
    const auto plan = plan_launch(scores_backward_kernel<T>, x.get_device(), grid.count(),
                                  pair_gemm_staging_elems<T>() * sizeof(T), size_t(ws_elems) * sizeof(T),
                                  backward_block_cap(buffers, m, n, sms, budget), w.math, kBackwardStages);
    w.stages = plan.stages;
    const int64_t blocks = plan.blocks;
    const int64_t chunk = backward_column_chunk(buffers, batch, m, n, blocks, budget);
    at::Tensor scratch;
    if (!plan.workspace_in_shared) scratch = at::empty({blocks * ws_elems}, opts);
    if (need_params) slab = at::zeros({blocks, layout.size}, opts);
    // The input-side gradient buffers: shared (atomics), or one slice per block (deterministic); the
    // y side's slices hold one column chunk.
    auto buffer = [&](const at::Tensor& shared, bool needed, int64_t rows_, int64_t cols) {
      return !needed ? at::Tensor() : deterministic ? at::zeros({blocks, rows_, cols}, opts) : shared;
    };
    const auto bx = buffer(gx, need_x, m, d), by = batch ? bx : buffer(gy, need_y, chunk, d);
    const auto bPx = buffer(dPx, dPx.defined(), m, h), bPy = batch ? bPx : buffer(dPy, dPy.defined(), chunk, h);
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    // Columns [c0, c0 + nc) per launch (all of them but under deterministic algorithms with a big
    // bank): the chunk's rows of y and of P_y, its columns of dS, its rows of the y-side gradients.
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t nc = std::min(chunk, n - c0);
      const bool whole = nc == n;
      const auto g = whole ? grad : grad.narrow(1, c0, nc);
      const auto chunk_grid = whole ? grid : TileGrid::make(false, m, nc, kTile, kTile);
      const auto live = live_pair_list(g, batch, chunk_grid.count());
#ifdef PDDM_EXT_CUDA_EMULATION
      // The emulated device memory is the host's: the tests read the walk the device chose.
      ::pddm_emu::log_note("scores_backward listed pairs", live.list.defined() ? *live.listed.data_ptr<int64_t>() : -1);
#endif
      const BackwardPairs pairs{chunk_grid, live.list.defined() ? live.list.data_ptr<int64_t>() : nullptr,
                                live.list.defined() ? live.listed.data_ptr<int64_t>() : nullptr};
      PairRows<T> chunk_rows = rows;
      chunk_rows.y += c0 * d, chunk_rows.Py += c0 * h, chunk_rows.n = nc;
      // The y side: the shared buffers (atomics: one chunk, all columns), or per-block slices of the
      // chunk, (blocks, nc, cols) in the first blocks * nc rows of the buffer.
      const BackwardOut<T> out{g.data_ptr<T>(), g.stride(0), g.stride(1), ptr(bx), ptr(by), ptr(bPx), ptr(bPy),
                               need_params ? slab.data_ptr<T>() : nullptr, layout, deterministic};
      const int64_t launch_blocks = std::min<int64_t>(blocks, chunk_grid.count());
      PDDM_LAUNCH(scores_backward_kernel<T>, unsigned(launch_blocks), kThreads, plan.smem_bytes, current_stream())(
          w, chunk_rows, pairs, out, plan.workspace_in_shared ? nullptr : scratch.data_ptr<T>(), ws_elems);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (deterministic && !batch) {  // this chunk's y slices, summed in a fixed order
        if (by.defined()) gy.narrow(0, c0, nc).copy_(by.flatten().narrow(0, 0, blocks * nc * d).view({blocks, nc, d}).sum(0));
        if (bPy.defined()) {
          dPy.narrow(0, c0, nc).copy_(bPy.flatten().narrow(0, 0, blocks * nc * h).view({blocks, nc, h}).sum(0));
        }
        if (c0 + nc < n) {
          if (by.defined()) by.zero_();
          if (bPy.defined()) bPy.zero_();
        }
      }
    }
    if (deterministic) {  // the blocks' x slices, summed in a fixed order
      if (bx.defined()) gx.copy_(bx.sum(0));
      if (bPx.defined()) dPx.copy_(bPx.sum(0));
    }
  });

  // The dense products in the kernels' own arithmetic (matmul_into), not cuBLAS: no TF32, fixed order.
  if (need_x) matmul_into(gx, dPx, W_vc, true);
  if (!batch && need_y) matmul_into(gy, dPy, W_vc, true);
  if (need_params) {
    const auto total = slab.sum(0);
    matmul_into(gW_v, dPx.t(), x, false);
    if (!batch) matmul_into(gW_v, dPy.t(), y, true);
    gW_v.add_(total.narrow(0, layout.W_v, h * d).view({h, d}));
    gW_u.copy_(total.narrow(0, layout.W_u, h * d).view({h, d}));
    gW_c.copy_(total.narrow(0, layout.W_c, c * 2 * h).view({c, 2 * h}));
    gb_u.copy_(total.narrow(0, layout.b_u, h));
    gb_v.copy_(total.narrow(0, layout.b_v, h));
    gb_c.copy_(total.narrow(0, layout.b_c, c));
    gw_s.copy_(total.narrow(0, layout.w_s, c));
    gb_s.copy_(total.narrow(0, layout.b_s, 1).reshape(b_s.sizes()));
  }
  return result();
}

}  // namespace

TORCH_LIBRARY_IMPL(pddm_ext, PDDM_CUDA_DISPATCH_KEY, m) {
  m.impl("scores", &scores_cuda);
  m.impl("scores_backward", &scores_backward_cuda);
}

}  // namespace pddm_ext::cuda
