// The fused backward of one tile on the GPU, in the phases of its CPU twin pddm_tile_backward
// (csrc/cpu/scores_cpu.cpp), named and ordered as there (docs/design.md#the-pddm-unit):
//   tile_pair_gradients         g[p] = dL/dS of the tile's pairs (the walk skips a tile without any);
//   (pddm_tile_activations, pddm_tile.cuh: the forward's phases 0-2 recomputed into Z)
//   tile_score_layer_backward   q = relu(W_c Z + b_c) recomputed, then dw_s, db_c, db_s, dW_c and
//                               dZ = dQ W_c;
//   tile_branches_backward      the normalisations of u' and v', the branch ReLUs and the clamped
//                               input norms: dpre, db_u, db_v, dP_x, dP_y and the near-antipodal
//                               pairs' share of dW_v;
//   tile_W_u_backward           dW_u;
//   tile_inputs_backward        dU = dpre_u W_u, then dx and dy.
// scores_backward_kernel (scores_cuda.cu) walks the tiles and calls them in this order. All threads
// of the block call a phase or none does (most hold barriers); each phase reads the per-block pointers from
// shared memory (BlockPointers) where it uses them, as the kernel did before it was split: kept in
// registers across the tile loop, they pushed the kernel past 255 registers. kHalf: the half kernel's
// instantiation (docs/design.md#precision): every pair_gemm runs the half product, the recomputed
// forward's as the forward runs it, the gradient products with per-pair operand exponents
// (half_row_exponents); the per-pair sums stay float32.
#pragma once

#include "pddm_tile.cuh"

namespace pddm_ext::cuda {

// The backward's pair_gemm staging keeps one buffer (a compile-time constant, so that none of the
// double-buffering code is compiled into it): with two, ptxas (nvcc 13.0, sm_90) spilled the float
// backward, already at 255 registers, to local memory (make cuda-resources).
constexpr int kBackwardStages = 1;

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

// The half kernels' per-pair power-of-two scales of a gradient product's operand (half_operand_exponent):
// the dQ rows for dZ = dQ W_c, then the dpre_u rows for dU = dpre_u W_u.
struct HalfOperandExponents {
  int e[kPairs];
};
struct NoOperandExponents {};

// Per-pair scalars of the backward (in addition to the forward's TileScalars); kHalf: with the half
// kernels' operand exponents.
template <typename T, bool kHalf = false>
struct BackwardScalars : std::conditional_t<kHalf, HalfOperandExponents, NoOperandExponents> {
  T g[kPairs];       // dL/dS of the pair (batch mode: dS[i, r] + dS[r, i], once per unordered pair)
  T s_u[kPairs], s_v[kPairs];  // z . dz of the two halves of Z
  T coef_v[kPairs];  // d/d(x + y) of the mean branch's clamped norm, per unit of (x + y)
  T s_hat[kPairs];   // normalize(u) . dL/dnormalize(u)
};

// A backward block's workspace matrices, parameter-gradient slab and input-gradient buffers (null:
// not needed). Set by thread 0 before the first tile's barrier; in shared memory.
template <typename T>
struct BlockPointers {
  T *Z, *dZ, *Q, *dU, *slab, *dx, *dy, *dPx, *dPy;
};

// Row strides of the backward's workspace matrices (tile_workspace_elems, smem_layout.h): Z and dZ
// (2h columns), Q (c), dU (d).
struct BackwardStrides {
  int64_t z, q, u;
  __device__ __forceinline__ static BackwardStrides of(int64_t d, int64_t h, int64_t c) {
    return {layout::workspace_stride(2 * h), layout::workspace_stride(c), layout::workspace_stride(d)};
  }
};

// The half kernels' operand exponents: e[p] = half_operand_exponent(max_k |M[p * ld + k]|), k < cols
// (0 for a zero row), one warp per pair; M's rows complete (after a barrier). Read after the next one.
template <typename T>
__device__ __forceinline__ void half_row_exponents(const T* M, int64_t ld, int64_t cols, int* e) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int p = warp; p < kPairs; p += kWarps) {
    T largest = 0;
    for (int64_t k = lane; k < cols; k += 32) largest = fmaxf(largest, abs_value(M[p * ld + k]));
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
    if (lane == 0) e[p] = half_operand_exponent(largest);
  }
}

// g[p] = dL/dS of the tile's pairs into bs.g (0 for the padded pairs of an edge tile and the slots
// past a list's end); returns whether any is nonzero (every thread reads the same bs.g, so the whole
// block agrees). Pairs with a zero gradient contribute nothing (as on the CPU path): the walk skips a
// tile without any, and within a tile every sum over pairs in the phases below skips them, so that
// their activations (which may be inf or NaN, say for a row of x that only such pairs touch) never
// reach a gradient. Called after the barrier that ends the previous tile's reads of bs.
template <typename T, bool kHalf>
__device__ __forceinline__ bool tile_pair_gradients(const BackwardOut<T>& out, const PairRows<T>& rows,
                                                    const TilePairs& tp, bool batch, bool listed,
                                                    BackwardScalars<T, kHalf>& bs) {
  const int tid = threadIdx.x;
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
  bool tile_has_gradient = false;
  for (int p = 0; p < kPairs; ++p) tile_has_gradient |= bs.g[p] != T(0);
  return tile_has_gradient;
}

// Score layer: S = w_s . relu(W_c Z + b_c) + b_s, after pddm_tile_activations left Z. Recomputes
// q = relu(W_c Z + b_c) into Q, adds the tile's dw_s, db_c, db_s and dW_c = dQ^T Z to the slab, and
// leaves dQ = dL/d(W_c Z + b_c) in Q and dZ = dQ W_c in dZ. Ends synchronised.
template <typename T, bool kHalf>
__device__ __forceinline__ void tile_score_layer_backward(const PddmParams<T>& w, const BackwardOut<T>& out,
                                                          const BlockPointers<T>& bp, BackwardScalars<T, kHalf>& bs,
                                                          T* sm_a, T* sm_w) {
  T* const &Z = bp.Z, *const &dZ = bp.dZ, *const &Q = bp.Q, *const &slab = bp.slab;
  const int64_t h = w.h, c = w.c;
  const auto ld = BackwardStrides::of(w.d, h, c);
  const int tid = threadIdx.x;
  // Joint and score layers: q = relu(W_c Z + b_c), S = w_s . q + b_s (the half kernels: the forward's
  // half product, pddm_tile_scores).
  pair_gemm<T, kHalf, kBackwardStages>(
      c, 2 * h, w.W_c, 2 * h, 1, [&](int p, int64_t k) { return Z[p * ld.z + k]; },
      [&](int p, int64_t j, T q) { Q[p * ld.q + j] = relu(q + w.b_c[j]); }, sm_a, sm_w, w.math, kBackwardStages);
  if (slab != nullptr) {
    for (int64_t j = tid; j < c; j += kThreads) {
      T dws = 0, dbc = 0;
      for (int p = 0; p < kPairs; ++p) {
        if (bs.g[p] == T(0)) continue;
        const T q = Q[p * ld.q + j];
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
    T& q = Q[p * ld.q + j];
    q = q > T(0) && bs.g[p] != T(0) ? bs.g[p] * w.w_s[j] : T(0);  // dL/d(W_c Z + b_c)
  }
  __syncthreads();
  if constexpr (kHalf) half_row_exponents(Q, ld.q, c, bs.e);  // read by dZ's operand after dW_c's barrier
  if (slab != nullptr) {  // dW_c += dQ^T Z over the tile's live pairs
    RowColWalk jk(c, 2 * h);
    for (int64_t e = tid; e < c * 2 * h; e += kThreads, jk.next()) {
      const int64_t j = jk.row, k = jk.col;
      T acc = 0;
      for (int p = 0; p < kPairs; ++p) {
        if (bs.g[p] != T(0)) acc += Q[p * ld.q + j] * Z[p * ld.z + k];
      }
      slab[out.layout.W_c + e] += acc;
    }
  }
  // dZ = dQ W_c: W(o = k, red = j) = W_c[j, k]. The half kernels scale pair p's row of dQ by 2^-e[p]
  // and its products back by 2^e[p] (exact): dQ = g w_s, with g = dL/dS often far below float16's
  // smallest normal (6e-5), would otherwise round to 0 or lose its bits.
  if constexpr (kHalf) {
    __syncthreads();  // bs.e complete
    pair_gemm<T, true, kBackwardStages>(
        2 * h, c, w.W_c, 1, 2 * h, [&](int p, int64_t j) { return ldexpf(Q[p * ld.q + j], -bs.e[p]); },
        [&](int p, int64_t k, T v) { dZ[p * ld.z + k] = ldexpf(v, bs.e[p]); }, sm_a, sm_w, w.math, kBackwardStages);
  } else {
    pair_gemm<T, false, kBackwardStages>(
        2 * h, c, w.W_c, 1, 2 * h, [&](int p, int64_t j) { return Q[p * ld.q + j]; },
        [&](int p, int64_t k, T v) { dZ[p * ld.z + k] = v; }, sm_a, sm_w, w.math, kBackwardStages);
  }
}

// The normalisations of u' and v', the branch ReLUs (z > 0 exactly where the ReLU was active) and
// the clamped input norms: turns dZ into dpre = dL/d(branch pre-activations), (kPairs, h) for the
// difference branch, (kPairs, h) for the mean branch, 0 for the pairs without gradient; adds db_u,
// db_v and the near-antipodal pairs' dW_v share to the slab and dP_i, dP_r (pre_v = (P_i + P_r) *
// inv_v + b_v, inv_v = mean_scale, pddm_common.h) to the x and y sides; leaves bs.coef_v. Returns
// whether the tile has a near-antipodal pair with a gradient (their dx, dy go with the others, in
// tile_inputs_backward; the CPU twin adds them here). Starts after a barrier that ends the writes to
// dZ (pair_gemm ends synchronised).
template <typename T, bool kHalf>
__device__ __forceinline__ bool tile_branches_backward(const PddmParams<T>& w, const PairRows<T>& rows,
                                                       const TilePairs& tp, bool listed, const BackwardOut<T>& out,
                                                       const BlockPointers<T>& bp, const TileScalars<T>& ts,
                                                       BackwardScalars<T, kHalf>& bs) {
  T* const &Z = bp.Z, *const &dZ = bp.dZ, *const &slab = bp.slab;
  T* const &g_dPx = bp.dPx, *const &g_dPy = bp.dPy;
  const int64_t d = w.d, h = w.h;
  const auto ld = BackwardStrides::of(d, h, w.c);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int p = warp; p < kPairs; p += kWarps) {
    T su = 0, sv = 0;
    for (int64_t k = lane; k < h; k += 32) {
      su += Z[p * ld.z + k] * dZ[p * ld.z + k];
      sv += Z[p * ld.z + h + k] * dZ[p * ld.z + h + k];
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
    const T z = Z[p * ld.z + k];
    T& dz = dZ[p * ld.z + k];
    dz = z > T(0) && bs.g[p] != T(0)
             ? normalize_backward(dz, z, u_half ? bs.s_u[p] : bs.s_v[p], u_half ? ts.norm_u1[p] : ts.norm_v1[p])
             : T(0);
  }
  __syncthreads();
  if (slab != nullptr) {
    for (int64_t k = tid; k < h; k += kThreads) {
      T dbu = 0, dbv = 0;
      for (int p = 0; p < kPairs; ++p) {
        dbu += dZ[p * ld.z + k];
        dbv += dZ[p * ld.z + h + k];
      }
      slab[out.layout.b_u + k] += dbu;
      slab[out.layout.b_v + k] += dbv;
    }
  }
  for (int p = warp; p < kPairs; p += kWarps) {
    T dinv_v = 0;
    for (int64_t k = lane; k < h; k += 32) dinv_v += dZ[p * ld.z + h + k] * mean_pre_projection(w, rows, ts, p, k);
    dinv_v = warp_sum(dinv_v);
    if (lane == 0) bs.coef_v[p] = mean_scale_coef(dinv_v, ts.norm_v[p], w.normalize_inputs);
  }
  if constexpr (kHalf) half_row_exponents(dZ, ld.z, h, bs.e);  // dpre_u's, for tile_inputs_backward
  // Near-antipodal pairs take their mean-branch gradient g_v from x + y directly (below and in
  // tile_inputs_backward); through dP_x and dP_y, dW_v = dP_x^T x + dP_y^T y would cancel.
  const bool any_direct = __syncthreads_or(tid < kPairs && ts.direct[tid] && bs.g[tid] != T(0));
  const auto dP_of = [&](int p, int64_t k) {  // pair p's share of dP_i and dP_r (0: none)
    return ts.direct[p] || bs.g[p] == T(0) ? T(0) : dZ[p * ld.z + h + k] * ts.inv_v[p];
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
  if (slab != nullptr && any_direct) {  // dW_v += g_v (x_i + y_r)^T over the tile's near-antipodal live pairs
    RowColWalk kj_direct(h, d);
    for (int64_t e = tid; e < h * d; e += kThreads, kj_direct.next()) {
      const int64_t k = kj_direct.row, j = kj_direct.col;
      T acc = 0;
      for (int p = 0; p < kPairs; ++p) {
        if (!ts.direct[p] || bs.g[p] == T(0)) continue;
        acc += dZ[p * ld.z + h + k] * ts.inv_v[p] * (rows.x[ts.row[p] * d + j] + rows.y[ts.col[p] * d + j]);
      }
      slab[out.layout.W_v + e] += acc;
    }
  }
  return any_direct;
}

// dW_u += sum_p (dpre_u[p] / max(||u_p||, eps)) |x_i - y_r|^T over the tile's live pairs (dpre_u in
// the first h columns of dZ, tile_branches_backward). Only with parameter gradients (bp.slab).
template <typename T, bool kHalf>
__device__ __forceinline__ void tile_W_u_backward(const PddmParams<T>& w, const PairRows<T>& rows, bool listed,
                                                  const BackwardOut<T>& out, const BlockPointers<T>& bp,
                                                  const TileScalars<T>& ts, const BackwardScalars<T, kHalf>& bs) {
  T* const &dZ = bp.dZ, *const &slab = bp.slab;
  const int64_t d = w.d, h = w.h;
  const auto ld = BackwardStrides::of(d, h, w.c);
  RowColWalk kj(h, d);
  for (int64_t e = threadIdx.x; e < h * d; e += kThreads, kj.next()) {
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
          if (bs.g[p] != T(0)) acc += dZ[p * ld.z + k] * ts.inv_u[p] * abs_value(xa[a] - yb[b]);
        }
      }
    } else {
      for (int p = 0; p < kPairs; ++p) {
        if (bs.g[p] != T(0)) {
          acc += dZ[p * ld.z + k] * ts.inv_u[p] * abs_value(rows.x[ts.row[p] * d + j] - rows.y[ts.col[p] * d + j]);
        }
      }
    }
    slab[out.layout.W_u + e] += acc;
  }
}

// The inputs: dL/dnormalize(u) = W_u^T dpre_u into dU, then each pair's gradient of x_i and y_r
// (u = |x - y| with d/dx = sign(x - y), sign(0) = 0; x + y of the mean branch through bs.coef_v; a
// near-antipodal pair's W_v^T g_v when any_direct) added to dx and dy. Only when an input needs a
// gradient. Starts after tile_branches_backward's last barrier.
template <typename T, bool kHalf>
__device__ __forceinline__ void tile_inputs_backward(const PddmParams<T>& w, const PairRows<T>& rows,
                                                     const TilePairs& tp, bool listed, bool any_direct,
                                                     const BackwardOut<T>& out, const BlockPointers<T>& bp,
                                                     const TileScalars<T>& ts, BackwardScalars<T, kHalf>& bs, T* sm_a,
                                                     T* sm_w) {
  T* const &dZ = bp.dZ, *const &dU = bp.dU;
  T* const &g_dx = bp.dx, *const &g_dy = bp.dy;
  const int64_t d = w.d, h = w.h;
  const auto ld = BackwardStrides::of(d, h, w.c);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // dL/dnormalize(u) = W_u^T dpre_u: W(o = j, red = k) = W_u[k, j]; the half kernels scale pair p's
  // row of dpre_u by 2^-e[p] (tile_branches_backward) and its products back, as for dZ.
  if constexpr (kHalf) {
    pair_gemm<T, true, kBackwardStages>(
        d, h, w.W_u, 1, d, [&](int p, int64_t k) { return ldexpf(dZ[p * ld.z + k], -bs.e[p]); },
        [&](int p, int64_t j, T v) { dU[p * ld.u + j] = ldexpf(v, bs.e[p]); }, sm_a, sm_w, w.math, kBackwardStages);
  } else {
    pair_gemm<T, false, kBackwardStages>(
        d, h, w.W_u, 1, d, [&](int p, int64_t k) { return dZ[p * ld.z + k]; },
        [&](int p, int64_t j, T v) { dU[p * ld.u + j] = v; }, sm_a, sm_w, w.math, kBackwardStages);
  }
  for (int p = warp; p < kPairs; p += kWarps) {
    const int64_t i = ts.row[p], r = ts.col[p];
    T s = 0;
    for (int64_t j = lane; j < d; j += 32) s += abs_value(rows.x[i * d + j] - rows.y[r * d + j]) * dU[p * ld.u + j];
    s = warp_sum(s);
    if (lane == 0) bs.s_hat[p] = s * ts.inv_u[p];
  }
  __syncthreads();
  // Pair p's gradient of x_i (x_side) or of y_r at feature j; 0 for a pair without gradient.
  const auto input_grad = [&](int p, int64_t j, bool x_side) {
    if (bs.g[p] == T(0)) return T(0);
    const T xj = rows.x[ts.row[p] * d + j], yj = rows.y[ts.col[p] * d + j], diff = xj - yj;
    const T du = w.normalize_inputs
                     ? normalize_backward(dU[p * ld.u + j], abs_value(diff) * ts.inv_u[p], bs.s_hat[p], ts.norm_u[p])
                     : dU[p * ld.u + j];
    T v = (x_side ? sign_of(diff) : -sign_of(diff)) * du + bs.coef_v[p] * (xj + yj);
    if (any_direct && ts.direct[p]) v += mean_direct_input_grad(w, dZ + p * ld.z + h, ts.inv_v[p], j);
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

}  // namespace pddm_ext::cuda
