// Hard mining on the GPU (docs/design.md#mining), fused into the tiled scoring pass: no (m, n) score matrix.
//
// Each block scores a tile into shared memory and folds it into the running reductions:
//  - per-row hardest positive / negative and per-column hardest negative: the tile's best per row
//    and per column (smallest index on ties), then one global update per row/column. float scores
//    use packed 64-bit (order-preserving score bits, index) keys with atomicMin/atomicMax, so ties
//    go to the smallest index by construction; double scores do not fit a 64-bit key and use a
//    per-row spin lock around the (score, index) pair, skipped without locking when the candidate
//    is strictly worse than the current best (the best only ever improves).
//  - the k lowest positive pairs: each block keeps a max-heap of its k best pairs (docs/design.md#mining order)
//    in global memory, updated by one thread from the tile's pairs that beat the heap's top; when
//    the heaps would hold more than all positive pairs (or k = -1) the positive pairs are appended
//    to one buffer instead. The candidates are sorted on the device by (score, i, r).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../op_checks.h"
#include "pddm_tile.cuh"

namespace pddm_ext::cuda {
namespace {

using layout::kEuclidChunk;  // the Euclidean tile shape (smem_layout.h)
using layout::kEuclidTile;

// ---- per-row / per-column best (score, index) --------------------------------------------------

// Order-preserving map of a non-NaN float to 32 unsigned bits (-0 is folded into +0: they compare
// equal). It never yields 0 or 0xffffffff (those would be NaN bit patterns), which encode NaN below.
__device__ __forceinline__ uint32_t ordered_bits(float s) {
  const uint32_t b = __float_as_uint(s == 0.0f ? 0.0f : s);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(uint32_t o) {  // 0 and 0xffffffff decode to NaN
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
// Larger key = better for a maximum: higher score, then smaller index; NaN below every score (the
// rule of beats_max in pddm_common.h). Never 0 for a real candidate.
__device__ __forceinline__ unsigned long long max_key(float s, int64_t idx) {
  const uint32_t o = is_nan_score(s) ? 0u : ordered_bits(s);
  return (static_cast<unsigned long long>(o) << 32) | (0xffffffffu - static_cast<uint32_t>(idx));
}
// Smaller key = better for a minimum: lower score, then smaller index; NaN above every score (the
// rule of beats_min). Never ~0 for a real candidate.
__device__ __forceinline__ unsigned long long min_key(float s, int64_t idx) {
  const uint32_t o = is_nan_score(s) ? 0xffffffffu : ordered_bits(s);
  return (static_cast<unsigned long long>(o) << 32) | static_cast<uint32_t>(idx);
}
constexpr unsigned long long kNoMax = 0ull, kNoMin = ~0ull;

// Running bests of docs/design.md#mining in global memory: row_pos (min), row_neg (max), col_neg (max, reference
// mode only). Specialised per score type.
template <typename T>
struct Bests;

template <>
struct Bests<float> {
  unsigned long long *row_pos, *row_neg, *col_neg;
  __device__ void offer_row_pos(int64_t row, float s, int64_t idx) const { atomicMin(row_pos + row, min_key(s, idx)); }
  __device__ void offer_row_neg(int64_t row, float s, int64_t idx) const { atomicMax(row_neg + row, max_key(s, idx)); }
  __device__ void offer_col_neg(int64_t col, float s, int64_t idx) const { atomicMax(col_neg + col, max_key(s, idx)); }
};

template <>
struct Bests<double> {
  double *row_pos_s, *row_neg_s, *col_neg_s;
  int64_t *row_pos_i, *row_neg_i, *col_neg_i;
  int *row_lock, *col_lock;

  // Called by one thread per slot and tile; the lock only guards the (score, index) pair.
  __device__ static void offer(double* best_s, int64_t* best_i, int* lock, int64_t slot, double s, int64_t idx,
                               bool maximum) {
    const double current = *reinterpret_cast<volatile double*>(best_s + slot);
    if (maximum ? s < current : s > current) return;  // strictly worse: can never win
    while (atomicCAS(lock + slot, 0, 1) != 0) __nanosleep(64);
    __threadfence();
    volatile double* vs = best_s + slot;
    volatile int64_t* vi = best_i + slot;
    const double bs = *vs;
    const int64_t bi = *vi;
    if (maximum ? beats_max(s, idx, bs, bi) : beats_min(s, idx, bs, bi)) {
      *vs = s;
      *vi = idx;
    }
    __threadfence();
    atomicExch(lock + slot, 0);
  }
  __device__ void offer_row_pos(int64_t row, double s, int64_t idx) const {
    offer(row_pos_s, row_pos_i, row_lock, row, s, idx, false);
  }
  __device__ void offer_row_neg(int64_t row, double s, int64_t idx) const {
    offer(row_neg_s, row_neg_i, row_lock, row, s, idx, true);
  }
  __device__ void offer_col_neg(int64_t col, double s, int64_t idx) const {
    offer(col_neg_s, col_neg_i, col_lock, col, s, idx, true);
  }
};

// ---- the k lowest positive pairs -------------------------------------------------------------

template <typename T>
struct PairSink {
  int64_t k;              // 0: no pairs wanted
  bool heap;              // per-block heaps of size k (else: append every positive pair)
  T* s;                   // heap mode: (blocks, k); append mode: (capacity,)
  int64_t *i, *r;
  int64_t* heap_sizes;    // heap mode: (blocks,)
  unsigned long long* count;  // append mode: pairs appended
  int64_t capacity;
};

template <typename T>
__device__ __forceinline__ bool cand_before(T s1, int64_t i1, int64_t r1, T s2, int64_t i2, int64_t r2) {
  return pair_before(s1, i1, r1, s2, i2, r2);
}

// Max-heap (by docs/design.md#mining pair order) of one block: hs/hi/hr hold `size` entries, the top is the worst.
template <typename T>
__device__ void heap_offer(T* hs, int64_t* hi, int64_t* hr, int64_t& size, int64_t k, T s, int64_t i, int64_t r) {
  int64_t pos;
  if (size < k) {  // push, sift up
    pos = size++;
    while (pos > 0) {
      const int64_t parent = (pos - 1) / 2;
      if (!cand_before(hs[parent], hi[parent], hr[parent], s, i, r)) break;
      hs[pos] = hs[parent], hi[pos] = hi[parent], hr[pos] = hr[parent];
      pos = parent;
    }
  } else {  // replace the top, sift down
    if (!cand_before(s, i, r, hs[0], hi[0], hr[0])) return;
    pos = 0;
    while (true) {
      int64_t child = 2 * pos + 1;
      if (child >= size) break;
      if (child + 1 < size && cand_before(hs[child], hi[child], hr[child], hs[child + 1], hi[child + 1], hr[child + 1]))
        ++child;  // the later of the two children
      if (!cand_before(s, i, r, hs[child], hi[child], hr[child])) break;
      hs[pos] = hs[child], hi[pos] = hi[child], hr[pos] = hr[child];
      pos = child;
    }
  }
  hs[pos] = s, hi[pos] = i, hr[pos] = r;
}

// Shared state of the fold across a block's tiles.
template <typename T, int P>
struct FoldShared {
  int flagged[P];  // heap mode: the tile's pairs that may enter the heap
  int n_flagged;
  int64_t heap_size;
  T top_s;
  int64_t top_i, top_r;
};

template <typename T>
struct MineArgs {
  const int64_t *lx, *ly;
  int64_t m, n;
  const T *x, *y;  // the rows mined, (m, d) and (n, d) contiguous: self_copy_pair's exact comparison
  int64_t d;
  Bests<T> bests;
  PairSink<T> pairs;
};

// Reference mode: the same-label pair (i, r) of equal rows is not a positive pair (pddm_common.h
// self_copy_pair); gap is the pair's value that is 0 for equal rows.
template <typename T>
__device__ __forceinline__ bool self_copy(const MineArgs<T>& args, bool batch, int64_t i, int64_t r, T gap) {
  return !batch && self_copy_pair(gap, args.x + i * args.d, args.y + r * args.d, args.d);
}

// Folds one scored tile (S[a * TN + b] for the pair (i0 + a, r0 + b), gap laid out alike) into the
// running reductions. Batch mode counts each unordered pair {i, r}, i < r, once. All threads call
// it; ends synchronised.
template <typename T, int TM, int TN>
__device__ void fold_tile(const MineArgs<T>& args, bool batch, int64_t i0, int64_t r0, const T* S, const T* gap,
                          FoldShared<T, TM * TN>& fs) {
  const int tid = threadIdx.x;
  const int64_t m = args.m, n = args.n;
  // Per row of the tile: the best positive (lowest) and negative (highest) over its columns.
  if (tid < TM && i0 + tid < m) {
    const int64_t i = i0 + tid, li = args.lx[i];
    T pos_s = 0, neg_s = 0;
    int64_t pos_i = -1, neg_i = -1;
    for (int b = 0; b < TN; ++b) {
      const int64_t r = r0 + b;
      if (r >= n) break;
      if (batch && r <= i) continue;
      const T s = S[tid * TN + b];
      if (args.ly[r] == li) {
        if (self_copy(args, batch, i, r, gap[tid * TN + b])) continue;
        if (beats_min(s, r, pos_s, pos_i)) pos_s = s, pos_i = r;
      } else if (beats_max(s, r, neg_s, neg_i)) {
        neg_s = s, neg_i = r;
      }
    }
    if (pos_i >= 0) args.bests.offer_row_pos(i, pos_s, pos_i);
    if (neg_i >= 0) args.bests.offer_row_neg(i, neg_s, neg_i);
  }
  __syncthreads();  // rows before columns: in batch mode a column is also a row (same lock)
  // Per column: batch mode, the mirrored pairs (r, i) of row r; reference mode, the column's negative.
  if (tid < TN && r0 + tid < n) {
    const int64_t r = r0 + tid, lr = args.ly[r];
    T pos_s = 0, neg_s = 0;
    int64_t pos_i = -1, neg_i = -1;
    for (int a = 0; a < TM; ++a) {
      const int64_t i = i0 + a;
      if (i >= m || (batch && i >= r)) break;
      const T s = S[a * TN + tid];
      if (args.lx[i] == lr) {
        if (beats_min(s, i, pos_s, pos_i)) pos_s = s, pos_i = i;
      } else if (beats_max(s, i, neg_s, neg_i)) {
        neg_s = s, neg_i = i;
      }
    }
    if (batch) {
      if (pos_i >= 0) args.bests.offer_row_pos(r, pos_s, pos_i);
      if (neg_i >= 0) args.bests.offer_row_neg(r, neg_s, neg_i);
    } else if (neg_i >= 0) {
      args.bests.offer_col_neg(r, neg_s, neg_i);
    }
  }
  const PairSink<T>& sink = args.pairs;
  if (sink.k == 0) {
    __syncthreads();
    return;
  }
  constexpr int P = TM * TN;
  if (!sink.heap) {
    // Warp-aggregated append: whole warps walk the tile's pairs; per round one lane of the warp (the
    // lowest appending one) reserves the warp's slots with one atomicAdd, and each appending lane
    // takes the reserved base plus the number of appending lanes below it.
    const int lane = tid % 32;
    for (int p0 = tid - lane; p0 < P; p0 += kThreads) {
      const int p = p0 + lane;
      const int64_t i = i0 + p / TN, r = r0 + p % TN;
      const bool take = p < P && i < m && r < n && !(batch && r <= i) && args.lx[i] == args.ly[r] &&
                        !self_copy(args, batch, i, r, gap[p]);
      const unsigned ballot = __ballot_sync(0xffffffffu, take);
      if (ballot == 0u) continue;
      const int leader = __ffs(int(ballot)) - 1;
      unsigned long long base = 0;
      if (lane == leader) base = atomicAdd(sink.count, static_cast<unsigned long long>(__popc(ballot)));
      base = __shfl_sync(0xffffffffu, base, leader);
      if (!take) continue;
      const unsigned long long slot = base + static_cast<unsigned long long>(__popc(ballot & ((1u << lane) - 1u)));
      if (slot < static_cast<unsigned long long>(sink.capacity)) {
        const T s = S[p];
        sink.s[slot] = s == T(0) ? T(0) : s;  // -0 -> +0 so the sort sees them equal
        sink.i[slot] = i;
        sink.r[slot] = r;
      }
    }
    __syncthreads();
    return;
  }
  if (tid == 0) fs.n_flagged = 0;
  __syncthreads();
  for (int p = tid; p < P; p += kThreads) {
    const int64_t i = i0 + p / TN, r = r0 + p % TN;
    if (i < m && r < n && !(batch && r <= i) && args.lx[i] == args.ly[r] && !self_copy(args, batch, i, r, gap[p]) &&
        (fs.heap_size < sink.k || cand_before(S[p], i, r, fs.top_s, fs.top_i, fs.top_r))) {
      fs.flagged[atomicAdd(&fs.n_flagged, 1)] = p;
    }
  }
  __syncthreads();
  if (tid == 0 && fs.n_flagged > 0) {
    const int64_t base = int64_t(blockIdx.x) * sink.k;
    T* hs = sink.s + base;
    int64_t *hi = sink.i + base, *hr = sink.r + base;
    int64_t size = fs.heap_size;
    // The heap keeps the k smallest under a strict total order: the offer order does not matter.
    for (int f = 0; f < fs.n_flagged; ++f) {
      const int p = fs.flagged[f];
      const T s = S[p];
      heap_offer(hs, hi, hr, size, sink.k, s == T(0) ? T(0) : s, i0 + p / TN, r0 + p % TN);
    }
    fs.heap_size = size;
    fs.top_s = hs[0], fs.top_i = hi[0], fs.top_r = hr[0];
  }
  __syncthreads();
}

template <typename T, int P>
__device__ void fold_begin(FoldShared<T, P>& fs) {
  if (threadIdx.x == 0) {
    fs.heap_size = 0;
    fs.top_s = T(0), fs.top_i = -1, fs.top_r = -1;
  }
  __syncthreads();
}

template <typename T, int P>
__device__ void fold_end(const MineArgs<T>& args, const FoldShared<T, P>& fs) {
  if (threadIdx.x == 0 && args.pairs.k != 0 && args.pairs.heap) args.pairs.heap_sizes[blockIdx.x] = fs.heap_size;
}

// kHalf: the instantiation for half inputs (pair_gemm), launched only for them.
template <typename T, bool kHalf = false>
__global__ void __launch_bounds__(kThreads) mine_pddm_kernel(PddmParams<T> w, PairRows<T> rows, TileGrid grid,
                                                              MineArgs<T> args, T* scratch, int64_t ws_elems) {
  PDDM_DYNAMIC_SHARED(smem_raw);
  PDDM_SHARED(ts, TileScalars<T>);
  PDDM_SHARED(fs, FoldShared<T, kPairs>);
  PDDM_SHARED_DECLARED();
  T* sm = reinterpret_cast<T*>(smem_raw);
  T* sm_a = sm;
  T* sm_w = sm + staging_a_elems<T>();
  T* Z = block_workspace(sm, scratch, ws_elems, w.stages);
  fold_begin(fs);
#pragma unroll 1  // no trip-count division (a 64-bit div.s64) before the loop
  for (int64_t t = blockIdx.x; t < grid.count(); t += gridDim.x) {
    int64_t i0, r0;
    grid.tile(t, &i0, &r0);
    __syncthreads();
    pddm_tile_activations<T, kHalf>(w, rows, TilePairs{i0, r0}, Z, ts, sm_a, sm_w);
    pddm_tile_scores<T, kHalf>(w, Z, ts, sm_a, sm_w);
    fold_tile<T, kTile, kTile>(args, grid.batch, i0, r0, ts.score, ts.norm_u, fs);  // ||x_i - y_r||: 0 if equal
  }
  fold_end(args, fs);
}

// S = -||x_i - y_r||^2, summed directly over the differences (no cancellation), 0 never negative-zero.
template <typename T>
__global__ void __launch_bounds__(kThreads) mine_euclidean_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                                                   int64_t d, TileGrid grid, MineArgs<T> args) {
  constexpr int P = kEuclidTile * kEuclidTile;
  PDDM_SHARED(xs, T[kEuclidTile][kEuclidChunk + 1]);
  PDDM_SHARED(ys, T[kEuclidTile][kEuclidChunk + 1]);
  PDDM_SHARED(S, T[P]);
  PDDM_SHARED(fs, FoldShared<T, P>);
  PDDM_SHARED_DECLARED();
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;  // rows ty, ty + 16; columns tx, tx + 16
  fold_begin(fs);
#pragma unroll 1  // no trip-count division (a 64-bit div.s64) before the loop
  for (int64_t t = blockIdx.x; t < grid.count(); t += gridDim.x) {
    int64_t i0, r0;
    grid.tile(t, &i0, &r0);
    T acc[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
    for (int64_t k0 = 0; k0 < d; k0 += kEuclidChunk) {
      __syncthreads();
      for (int e = tid; e < kEuclidTile * kEuclidChunk; e += kThreads) {
        const int row = e / kEuclidChunk, kk = e % kEuclidChunk;
        const int64_t k = k0 + kk;
        const int64_t i = i0 + row < args.m ? i0 + row : args.m - 1;
        const int64_t r = r0 + row < args.n ? r0 + row : args.n - 1;
        xs[row][kk] = k < d ? x[i * d + k] : T(0);
        ys[row][kk] = k < d ? y[r * d + k] : T(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kEuclidChunk; ++kk) {
#pragma unroll
        for (int a = 0; a < 2; ++a) {
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            const T diff = xs[ty + 16 * a][kk] - ys[tx + 16 * b][kk];
            acc[a][b] += diff * diff;
          }
        }
      }
    }
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) S[(ty + 16 * a) * kEuclidTile + tx + 16 * b] = acc[a][b] > T(0) ? -acc[a][b] : T(0);
    }
    __syncthreads();
    fold_tile<T, kEuclidTile, kEuclidTile>(args, grid.batch, i0, r0, S, S, fs);  // S = 0 for equal rows
  }
  fold_end(args, fs);
}

// Unpacks float keys into (index, score); index -1 (score 0) where no candidate was offered.
__global__ void decode_keys_kernel(const unsigned long long* __restrict__ keys, int64_t count, bool maximum,
                                   int64_t* __restrict__ idx, float* __restrict__ score) {
  PDDM_SHARED_DECLARED();
#pragma unroll 1  // no trip-count division (a 64-bit div.s64) before the loop
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const unsigned long long key = keys[e];
    if (key == (maximum ? kNoMax : kNoMin)) {
      idx[e] = -1;
      score[e] = 0.0f;
      continue;
    }
    const uint32_t low = static_cast<uint32_t>(key & 0xffffffffull);
    idx[e] = maximum ? int64_t(0xffffffffu - low) : int64_t(low);
    score[e] = from_ordered_bits(static_cast<uint32_t>(key >> 32));
  }
}

// Number of positive pairs (batch mode: unordered, i < r) from the labels: for each row of x the
// rows of y with its label (a range of the sorted labels of y), summed. Its one host read (the sum)
// sizes the candidate buffer.
int64_t count_positive_pairs(const at::Tensor& lx, const at::Tensor& ly, bool batch) {
  const auto sorted = std::get<0>(at::sort(ly));
  const auto same = at::searchsorted(sorted, lx, false, /*right=*/true) - at::searchsorted(sorted, lx);
  const int64_t total = same.sum().item<int64_t>();
  return batch ? (total - lx.size(0)) / 2 : total;  // batch: less the pairs (i, i), each pair once
}

// Host side of both metrics: allocates the reductions, runs launch(blocks, args) and packs the
// 9 outputs. plan_blocks(): the grid the kernel will use (the heaps are sized per block).
template <typename T, typename PlanBlocks, typename Launch>
MineResult run_mining(bool batch, const at::Tensor& lx, const at::Tensor& ly, const T* x, const T* y, int64_t m,
                      int64_t n, int64_t d, int64_t k, const at::TensorOptions& opts, PlanBlocks plan_blocks,
                      Launch launch) {
  TORCH_CHECK(m < int64_t(0xffffffffLL) && n < int64_t(0xffffffffLL), "pddm_ext: mining supports < 2^32 - 1 rows");
  const auto index_opts = opts.dtype(at::kLong);
  MineArgs<T> args;
  args.lx = lx.data_ptr<int64_t>();
  args.ly = ly.data_ptr<int64_t>();
  args.m = m;
  args.n = n;
  args.x = x;
  args.y = y;
  args.d = d;
  const int64_t cols = batch ? 0 : n;
  at::Tensor row_pos, row_neg, col_neg, row_pos_i, row_neg_i, col_neg_i, row_lock, col_lock;
  if constexpr (std::is_same_v<T, float>) {
    const auto key_opts = opts.dtype(at::kLong);  // reinterpreted as unsigned 64-bit keys
    row_pos = at::full({m}, -1, key_opts);       // all ones = kNoMin
    row_neg = at::zeros({m}, key_opts);          // kNoMax
    col_neg = at::zeros({std::max<int64_t>(cols, 1)}, key_opts);
    args.bests = {reinterpret_cast<unsigned long long*>(row_pos.data_ptr<int64_t>()),
                  reinterpret_cast<unsigned long long*>(row_neg.data_ptr<int64_t>()),
                  reinterpret_cast<unsigned long long*>(col_neg.data_ptr<int64_t>())};
  } else {
    const double inf = std::numeric_limits<double>::infinity();
    row_pos = at::full({m}, inf, opts);
    row_neg = at::full({m}, -inf, opts);
    col_neg = at::full({std::max<int64_t>(cols, 1)}, -inf, opts);
    row_pos_i = at::full({m}, -1, index_opts);
    row_neg_i = at::full({m}, -1, index_opts);
    col_neg_i = at::full({std::max<int64_t>(cols, 1)}, -1, index_opts);
    row_lock = at::zeros({m}, opts.dtype(at::kInt));
    col_lock = at::zeros({std::max<int64_t>(cols, 1)}, opts.dtype(at::kInt));
    args.bests = {row_pos.data_ptr<double>(),    row_neg.data_ptr<double>(),    col_neg.data_ptr<double>(),
                  row_pos_i.data_ptr<int64_t>(), row_neg_i.data_ptr<int64_t>(), col_neg_i.data_ptr<int64_t>(),
                  row_lock.data_ptr<int>(),      col_lock.data_ptr<int>()};
  }

  // The positive-pair candidates (num_pos counts them by label: an upper bound in reference mode,
  // where pairs of equal rows are left out).
  const int blocks = plan_blocks();
  const int64_t num_pos = k == 0 ? 0 : count_positive_pairs(lx, ly, batch);
  const int64_t keep = k < 0 ? num_pos : std::min(k, num_pos);
  PairSink<T> sink{};
  sink.k = keep;
  at::Tensor cand_s, cand_i, cand_r, heap_sizes, count;
  if (keep > 0) {
    sink.heap = keep < num_pos && int64_t(blocks) * keep <= num_pos;
    const int64_t capacity = sink.heap ? int64_t(blocks) * keep : num_pos;
    cand_s = at::empty({capacity}, opts);
    cand_i = at::empty({capacity}, index_opts);
    cand_r = at::empty({capacity}, index_opts);
    heap_sizes = at::zeros({blocks}, index_opts);
    count = at::zeros({1}, index_opts);
    sink.s = cand_s.data_ptr<T>();
    sink.i = cand_i.data_ptr<int64_t>();
    sink.r = cand_r.data_ptr<int64_t>();
    sink.heap_sizes = heap_sizes.data_ptr<int64_t>();
    sink.count = reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>());
    sink.capacity = capacity;
  }
  args.pairs = sink;
  launch(blocks, args);

  // Decode the bests.
  at::Tensor pos_i, pos_s, neg_i, neg_s, cneg_i, cneg_s;
  if constexpr (std::is_same_v<T, float>) {
    auto decode = [&](const at::Tensor& keys, bool maximum) {
      auto idx = at::empty({keys.size(0)}, index_opts);
      auto score = at::empty({keys.size(0)}, opts);
      const int threads = 256;
      const int64_t blocks_needed = (keys.size(0) + threads - 1) / threads;
      const int decode_blocks = int(std::min<int64_t>(blocks_needed, 4096));
      PDDM_LAUNCH(decode_keys_kernel, decode_blocks, threads, 0, current_stream())(
          reinterpret_cast<const unsigned long long*>(keys.data_ptr<int64_t>()), keys.size(0), maximum,
          idx.data_ptr<int64_t>(), score.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return std::make_pair(idx, score);
    };
    std::tie(pos_i, pos_s) = decode(row_pos, false);
    std::tie(neg_i, neg_s) = decode(row_neg, true);
    if (!batch) std::tie(cneg_i, cneg_s) = decode(col_neg, true);
  } else {
    pos_i = row_pos_i, pos_s = row_pos.masked_fill(row_pos_i.lt(0), 0.0);
    neg_i = row_neg_i, neg_s = row_neg.masked_fill(row_neg_i.lt(0), 0.0);
    if (!batch) cneg_i = col_neg_i, cneg_s = col_neg.masked_fill(col_neg_i.lt(0), 0.0);
  }
  if (batch) cneg_i = neg_i.clone(), cneg_s = neg_s.clone();

  // The k lowest positive pairs in docs/design.md#mining order: ascending score, ties by (i, r).
  at::Tensor pair_i = at::empty({0}, index_opts), pair_r = at::empty({0}, index_opts), pair_s = at::empty({0}, opts);
  if (keep > 0) {
    at::Tensor s = cand_s, i = cand_i, r = cand_r;
    if (sink.heap) {
      const auto slot = at::arange(keep, index_opts).unsqueeze(0);
      const auto valid = at::nonzero(slot.lt(heap_sizes.unsqueeze(1)).flatten()).squeeze(1);  // one host read
      s = s.index_select(0, valid), i = i.index_select(0, valid), r = r.index_select(0, valid);
    } else {
      const int64_t appended = std::min(count.item<int64_t>(), cand_s.size(0));
      s = s.narrow(0, 0, appended), i = i.narrow(0, 0, appended), r = r.narrow(0, 0, appended);
    }
    const auto by_pair = std::get<1>(at::sort(i * n + r));  // unique keys
    const auto s1 = s.index_select(0, by_pair);
    const auto by_score = std::get<1>(at::sort(s1, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    auto order = by_pair.index_select(0, by_score);
    order = order.narrow(0, 0, std::min<int64_t>(keep, order.size(0)));
    pair_i = i.index_select(0, order), pair_r = r.index_select(0, order), pair_s = s.index_select(0, order);
  }
  return {pos_i, pos_s, neg_i, neg_s, cneg_i, cneg_s, pair_i, pair_r, pair_s};
}

// The kernel instantiation for a tile math: half inputs run their own (kHalf).
template <typename T>
auto mine_pddm_kernel_for(TileMath math) {
  if constexpr (std::is_same_v<T, float>) {
    if (half_tile_math(math)) return &mine_pddm_kernel<float, true>;
  }
  return &mine_pddm_kernel<T>;
}

MineResult mine_pddm_cuda(const at::Tensor& x_in, const at::Tensor& x_labels, const std::optional<at::Tensor>& y_in,
                          const std::optional<at::Tensor>& y_labels, const at::Tensor& W_u, const at::Tensor& b_u,
                          const at::Tensor& W_v, const at::Tensor& b_v, const at::Tensor& W_c, const at::Tensor& b_c,
                          const at::Tensor& w_s, const at::Tensor& b_s, int64_t k, bool normalize_inputs,
                          std::optional<at::ScalarType> product_dtype) {
  check_pddm_args("pddm_ext::mine_pddm", x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  check_mine_args("pddm_ext::mine_pddm", x_in, x_labels, y_in, y_labels, k);
  check_product_dtype("pddm_ext::mine_pddm", product_dtype, x_in);
  const DeviceGuard guard(x_in.device());
  const bool batch = !y_in.has_value();
  const auto in = prepare_inputs(x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, product_dtype);
  const auto& x = in.x;
  const auto lx = x_labels.contiguous();
  const auto ly = batch ? lx : y_labels->contiguous();
  const int64_t m = in.m, n = in.n, h = in.h;
  const auto grid = TileGrid::make(batch, m, n, kTile, kTile);
  MineResult result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_mine_cuda", [&] {
    using T = scalar_t;
    auto w = in.params<T>(normalize_inputs);
    const auto rows = in.rows<T>();
    const int64_t ws_elems = tile_workspace_elems({2 * h});  // Z
    const auto mine_kernel = mine_pddm_kernel_for<T>(w.math);
    const auto plan = plan_launch(mine_kernel, x.get_device(), grid.count(),
                                  pair_gemm_staging_elems<T>() * sizeof(T), size_t(ws_elems) * sizeof(T),
                                  int64_t(1) << 30, w.math);
    w.stages = plan.stages;
    at::Tensor scratch;
    if (!plan.workspace_in_shared) scratch = at::empty({int64_t(plan.blocks) * ws_elems}, x.options());
    result = run_mining<T>(
        batch, lx, ly, in.x.data_ptr<T>(), in.y.data_ptr<T>(), m, n, in.d, k, x.options(),
        [&] { return plan.blocks; },
        [&](int blocks, const MineArgs<T>& args) {
          PDDM_LAUNCH(mine_kernel, blocks, kThreads, plan.smem_bytes, current_stream())(
              w, rows, grid, args, plan.workspace_in_shared ? nullptr : scratch.data_ptr<T>(), ws_elems);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return result;
}

MineResult mine_euclidean_cuda(const at::Tensor& x_in, const at::Tensor& x_labels,
                               const std::optional<at::Tensor>& y_in, const std::optional<at::Tensor>& y_labels,
                               int64_t k) {
  check_embeddings("pddm_ext::mine_euclidean", x_in, y_in);
  check_mine_args("pddm_ext::mine_euclidean", x_in, x_labels, y_in, y_labels, k);
  const DeviceGuard guard(x_in.device());
  const bool batch = !y_in.has_value();
  const auto x = x_in.contiguous();
  const auto y = batch ? x : y_in->contiguous();
  const auto lx = x_labels.contiguous();
  const auto ly = batch ? lx : y_labels->contiguous();
  const int64_t m = x.size(0), n = y.size(0), d = x.size(1);
  const auto grid = TileGrid::make(batch, m, n, kEuclidTile, kEuclidTile);
  MineResult result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "euclidean_mine_cuda", [&] {
    using T = scalar_t;
    const auto plan = plan_launch(mine_euclidean_kernel<T>, x.get_device(), grid.count(), 0, 0);
    result = run_mining<T>(
        batch, lx, ly, x.data_ptr<T>(), y.data_ptr<T>(), m, n, d, k, x.options(), [&] { return plan.blocks; },
        [&](int blocks, const MineArgs<T>& args) {
          PDDM_LAUNCH(mine_euclidean_kernel<T>, blocks, kThreads, 0, current_stream())(
              x.data_ptr<T>(), y.data_ptr<T>(), d, grid, args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pddm_ext, PDDM_CUDA_DISPATCH_KEY, m) {
  m.impl("mine_pddm", &mine_pddm_cuda);
  m.impl("mine_euclidean", &mine_euclidean_cuda);
}

}  // namespace pddm_ext::cuda
