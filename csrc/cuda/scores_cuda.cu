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
#include "pddm_tile_backward.cuh"

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

// The backward of the tiles of `pairs`, one tile at a time per block, in the phases of
// pddm_tile_backward.cuh (those of the CPU twin pddm_tile_backward). kHalf: the instantiation for half
// inputs, launched only for them: it recomputes the forward with the forward's half products and runs
// the gradient products dZ = dQ W_c and dU = dpre_u W_u in the half type (operands scaled per pair).
template <typename T, bool kHalf = false>
__global__ void __launch_bounds__(kThreads) scores_backward_kernel(PddmParams<T> w, PairRows<T> rows, BackwardPairs pairs,
                                                                    BackwardOut<T> out, T* scratch, int64_t ws_elems) {
  PDDM_DYNAMIC_SHARED(smem_raw);
  PDDM_SHARED(ts, TileScalars<T>);
  PDDM_SHARED(bs, BackwardScalars<T, kHalf>);
  PDDM_SHARED(bp, BlockPointers<T>);
  PDDM_SHARED_DECLARED();
  T* sm = reinterpret_cast<T*>(smem_raw);
  T* sm_a = sm;
  T* sm_w = sm + staging_a_elems<T>();
  if (threadIdx.x == 0) {
    const auto ld = BackwardStrides::of(w.d, w.h, w.c);
    bp.Z = block_workspace(sm, scratch, ws_elems, kBackwardStages);  // (kPairs, 2h) activations, then kept for dW_c
    bp.dZ = bp.Z + kPairs * ld.z;                    // (kPairs, 2h) dL/dZ, then dL/d(branch pre-activations)
    bp.Q = bp.dZ + kPairs * ld.z;                    // (kPairs, c) q = relu(W_c Z + b_c), then dL/d(W_c Z)
    bp.dU = bp.Q + kPairs * ld.q;                    // (kPairs, d) dL/dnormalize(u)
    bp.slab = out.slab == nullptr ? nullptr : out.slab + int64_t(blockIdx.x) * out.layout.size;
    // This block's slices of the input-side gradients (per_block), else the shared buffers.
    const int64_t slice = out.per_block ? int64_t(blockIdx.x) : 0;
    bp.dx = out.dx == nullptr ? nullptr : out.dx + slice * rows.m * w.d;
    bp.dy = out.dy == nullptr ? nullptr : out.dy + slice * rows.n * w.d;
    bp.dPx = out.dPx == nullptr ? nullptr : out.dPx + slice * rows.m * w.h;
    bp.dPy = out.dPy == nullptr ? nullptr : out.dPy + slice * rows.n * w.h;
  }
  const bool need_inputs = out.dx != nullptr || out.dy != nullptr;
  pairs = pairs.resolved();  // the walk the device chose
  const bool batch = pairs.grid.batch, listed = pairs.count >= 0;
  const int64_t tiles = pairs.tiles();

#pragma unroll 1  // no trip-count division (a 64-bit div.s64) before the loop
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const TilePairs tp = pairs.tile(t);
    __syncthreads();  // the previous tile's readers of shared memory are done
    if (!tile_pair_gradients(out, rows, tp, batch, listed, bs)) continue;
    pddm_tile_activations<T, kHalf, kBackwardStages>(w, rows, tp, bp.Z, ts, sm_a, sm_w);
    tile_score_layer_backward(w, out, bp, bs, sm_a, sm_w);
    const bool any_direct = tile_branches_backward(w, rows, tp, listed, out, bp, ts, bs);
    if (bp.slab != nullptr) tile_W_u_backward(w, rows, listed, out, bp, ts, bs);
    if (need_inputs) tile_inputs_backward(w, rows, tp, listed, any_direct, out, bp, ts, bs, sm_a, sm_w);
  }
}

// The backward kernel instantiation for a tile math: half inputs run their own (kHalf).
template <typename T>
auto scores_backward_kernel_for(TileMath math) {
  if constexpr (std::is_same_v<T, float>) {
    if (half_tile_math(math)) return &scores_backward_kernel<float, true>;
  }
  return &scores_backward_kernel<T>;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
scores_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                     const at::Tensor& W_u, const at::Tensor& b_u, const at::Tensor& W_v, const at::Tensor& b_v,
                     const at::Tensor& W_c, const at::Tensor& b_c, const at::Tensor& w_s, const at::Tensor& b_s,
                     std::array<bool, 3> output_mask, bool normalize_inputs,
                     std::optional<at::ScalarType> product_dtype) {
  check_pddm_args("pddm_ext::scores_backward", x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  check_scores_grad("pddm_ext::scores_backward", grad, x_in, y_in);
  check_product_dtype("pddm_ext::scores_backward", product_dtype, x_in);
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

  const auto in = prepare_inputs(x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, product_dtype);
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
    const auto scores_backward_tile_kernel = scores_backward_kernel_for<T>(w.math);
    const auto plan = plan_launch(scores_backward_tile_kernel, x.get_device(), grid.count(),
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
      PDDM_LAUNCH(scores_backward_tile_kernel, unsigned(launch_blocks), kThreads, plan.smem_bytes, current_stream())(
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
