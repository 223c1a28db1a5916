// Hard mining on the CPU (docs/design.md#mining), fused into the tiled scoring pass: no (m, n) score matrix.
//
// Each thread scores its share of tiles into a tile-sized buffer and folds every pair into its own
// running reductions (per-row hardest positive/negative, per-column hardest negative, a bounded
// heap of the k lowest positive pairs); the threads' reductions are merged at the end with the
// same tie rules, so the result does not depend on the number of threads.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>

#include "../op_checks.h"
#include "cpu_tile.h"

namespace pddm_ext::cpu {
namespace {

// The rows the kernel mines (x (m, d) and y (n, d), contiguous): the exact comparison of self_copy_pair.
template <typename scalar_t>
struct RowsOf {
  const scalar_t *x, *y;
  int64_t d;
};

// self_copy_pair's exact comparison, out of line: it runs only for a zero gap (equal rows, or an
// underflowing difference), so the fold loop below keeps its code as without the rule.
template <typename scalar_t>
[[gnu::noinline]] bool rows_equal_out_of_line(const scalar_t* a, const scalar_t* b, int64_t d) {
  return rows_equal(a, b, d);
}

template <typename scalar_t>
struct PairCandidate {
  scalar_t s;
  int64_t i, r;
  bool operator<(const PairCandidate& o) const { return pair_before(s, i, r, o.s, o.i, o.r); }
};

// Running reductions of docs/design.md#mining over the pairs one thread has seen.
template <typename scalar_t>
struct MiningState {
  std::vector<scalar_t> pos_s, neg_s, col_neg_s;
  std::vector<int64_t> pos_i, neg_i, col_neg_i;
  std::vector<PairCandidate<scalar_t>> pairs;  // max-heap of the k lowest when k > 0; all when k < 0
  int64_t k;

  MiningState(int64_t m, int64_t n, int64_t k_keep)
      : pos_s(m), neg_s(m), col_neg_s(n), pos_i(m, -1), neg_i(m, -1), col_neg_i(n, -1), k(k_keep) {}

  void offer_positive(int64_t row, int64_t cand, scalar_t s) {
    if (beats_min(s, cand, pos_s[row], pos_i[row])) pos_s[row] = s, pos_i[row] = cand;
  }
  void offer_negative(int64_t row, int64_t cand, scalar_t s) {
    if (beats_max(s, cand, neg_s[row], neg_i[row])) neg_s[row] = s, neg_i[row] = cand;
  }
  void offer_column_negative(int64_t col, int64_t cand, scalar_t s) {
    if (beats_max(s, cand, col_neg_s[col], col_neg_i[col])) col_neg_s[col] = s, col_neg_i[col] = cand;
  }
  void offer_pair(const PairCandidate<scalar_t>& cand) {
    if (k == 0) return;
    if (k < 0 || int64_t(pairs.size()) < k) {
      pairs.push_back(cand);
      if (k > 0) std::push_heap(pairs.begin(), pairs.end());
    } else if (cand < pairs.front()) {
      std::pop_heap(pairs.begin(), pairs.end());
      pairs.back() = cand;
      std::push_heap(pairs.begin(), pairs.end());
    }
  }

  // Folds one scored tile in. Batch mode counts each unordered pair {i, r}, i < r, once; reference
  // mode skips the same-label pairs of equal rows (self_copy_pair, pddm_common.h), whose per-pair
  // gap (zero for equal rows) comes with the scores.
  void visit_tile(bool batch, int64_t i0, int64_t ni, int64_t r0, int64_t nr, const scalar_t* S,
                  const scalar_t* gap, const RowsOf<scalar_t>& rows, const int64_t* lx, const int64_t* ly) {
    if (batch) {
      visit<true>(i0, ni, r0, nr, S, gap, rows, lx, ly);
    } else {
      visit<false>(i0, ni, r0, nr, S, gap, rows, lx, ly);
    }
  }

  // One loop per mode, so that batch mode's is the loop without the rule.
  template <bool kBatch>
  void visit(int64_t i0, int64_t ni, int64_t r0, int64_t nr, const scalar_t* S, const scalar_t* gap,
             const RowsOf<scalar_t>& rows, const int64_t* lx, const int64_t* ly) {
    for (int64_t a = 0; a < ni; ++a) {
      const int64_t i = i0 + a;
      for (int64_t b = 0; b < nr; ++b) {
        const int64_t r = r0 + b;
        if (kBatch && r <= i) continue;
        const scalar_t s = S[a * nr + b];
        if (lx[i] == ly[r]) {
          if (!kBatch && gap[a * nr + b] == scalar_t(0) &&  // self_copy_pair (pddm_common.h)
              rows_equal_out_of_line(rows.x + i * rows.d, rows.y + r * rows.d, rows.d))
            continue;
          offer_positive(i, r, s);
          if (kBatch) offer_positive(r, i, s);
          offer_pair({s, i, r});
        } else {
          offer_negative(i, r, s);
          if (kBatch) {
            offer_negative(r, i, s);
          } else {
            offer_column_negative(r, i, s);
          }
        }
      }
    }
  }

  void merge(const MiningState& o) {
    for (size_t row = 0; row < pos_i.size(); ++row) {
      if (o.pos_i[row] >= 0) offer_positive(row, o.pos_i[row], o.pos_s[row]);
      if (o.neg_i[row] >= 0) offer_negative(row, o.neg_i[row], o.neg_s[row]);
    }
    for (size_t col = 0; col < col_neg_i.size(); ++col) {
      if (o.col_neg_i[col] >= 0) offer_column_negative(col, o.col_neg_i[col], o.col_neg_s[col]);
    }
    for (const auto& cand : o.pairs) offer_pair(cand);
  }
};

// Runs the tiled pass: make_scorer() gives each thread a callable (i0, ni, r0, nr, S) that scores a
// tile into S, row-major, and returns the tile's per-pair gaps (self_copy_pair), laid out as S.
// Returns (hardest_positive, its score, hardest_negative, its score,
// hardest_negative_of_ref, its score, pair_i, pair_r, pair_score) with pairs in docs/design.md#mining order.
template <typename scalar_t, typename MakeScorer>
MineResult mine_tiles(const TileGrid& grid, const RowsOf<scalar_t>& rows, const at::Tensor& x_labels,
                      const at::Tensor& y_labels, int64_t k, const at::TensorOptions& opts, MakeScorer make_scorer) {
  const int64_t m = grid.m, n = grid.n;
  const auto lx = x_labels.contiguous(), ly = y_labels.contiguous();
  const int64_t *lxp = lx.data_ptr<int64_t>(), *lyp = ly.data_ptr<int64_t>();
  MiningState<scalar_t> total(m, grid.batch ? 0 : n, k);
  std::mutex total_mutex;

  at::parallel_for(0, grid.count(), kTilesPerTask, [&](int64_t begin, int64_t end) {
    auto score_tile = make_scorer();
    MiningState<scalar_t> state(m, grid.batch ? 0 : n, k);
    std::vector<scalar_t> S(grid.rows * grid.cols);
    for (int64_t t = begin; t < end; ++t) {
      int64_t i0, ni, r0, nr;
      grid.tile(t, &i0, &ni, &r0, &nr);
      const scalar_t* gap = score_tile(i0, ni, r0, nr, S.data());
      state.visit_tile(grid.batch, i0, ni, r0, nr, S.data(), gap, rows, lxp, lyp);
    }
    std::lock_guard<std::mutex> lock(total_mutex);
    total.merge(state);
  });

  std::sort(total.pairs.begin(), total.pairs.end());
  const auto index_opts = opts.dtype(at::kLong);
  auto as_tensor = [&](const auto& v, const at::TensorOptions& o) {
    using T = typename std::decay_t<decltype(v)>::value_type;
    auto out = at::empty({int64_t(v.size())}, o);
    std::copy(v.begin(), v.end(), out.template data_ptr<T>());
    return out;
  };
  const auto& col_i = grid.batch ? total.neg_i : total.col_neg_i;
  const auto& col_s = grid.batch ? total.neg_s : total.col_neg_s;
  const int64_t q = total.pairs.size();
  auto pair_i = at::empty({q}, index_opts), pair_r = at::empty({q}, index_opts), pair_s = at::empty({q}, opts);
  for (int64_t p = 0; p < q; ++p) {
    pair_i.data_ptr<int64_t>()[p] = total.pairs[p].i;
    pair_r.data_ptr<int64_t>()[p] = total.pairs[p].r;
    pair_s.data_ptr<scalar_t>()[p] = total.pairs[p].s;
  }
  return {as_tensor(total.pos_i, index_opts), as_tensor(total.pos_s, opts), as_tensor(total.neg_i, index_opts),
          as_tensor(total.neg_s, opts),       as_tensor(col_i, index_opts),   as_tensor(col_s, opts),
          pair_i,                              pair_r,                         pair_s};
}

MineResult mine_pddm_cpu(const at::Tensor& x_in, const at::Tensor& x_labels, const std::optional<at::Tensor>& y_in,
                         const std::optional<at::Tensor>& y_labels, const at::Tensor& W_u, const at::Tensor& b_u,
                         const at::Tensor& W_v, const at::Tensor& b_v, const at::Tensor& W_c, const at::Tensor& b_c,
                         const at::Tensor& w_s, const at::Tensor& b_s, int64_t k, bool normalize_inputs,
                         std::optional<at::ScalarType> product_dtype) {
  check_pddm_args("pddm_ext::mine_pddm", x_in, y_in, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s);
  check_product_dtype("pddm_ext::mine_pddm", product_dtype, x_in);  // the CPU computes half inputs in float32
  check_mine_args("pddm_ext::mine_pddm", x_in, x_labels, y_in, y_labels, k);
  vec::select_isa_from_env();
  const bool batch = !y_in.has_value();
  const auto x = x_in.contiguous();
  const auto y = batch ? x : y_in->contiguous();
  MineResult result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pddm_mine_cpu", [&] {
    const PddmWeights<scalar_t> w(W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, normalize_inputs);
    const auto Px = w.project(x);
    const auto Py = batch ? Px : w.project(y);
    const scalar_t *xp = x.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t *Pxp = Px.data_ptr<scalar_t>(), *Pyp = Py.data_ptr<scalar_t>();
    const auto grid = pddm_grid(batch, x.size(0), y.size(0), w.d, w.h, w.c, sizeof(scalar_t));
    const RowsOf<scalar_t> rows{xp, yp, w.d};
    result = mine_tiles<scalar_t>(grid, rows, x_labels, batch ? x_labels : *y_labels, k, x.options(), [&] {
      auto ws = std::make_shared<PddmTile<scalar_t>>(grid.rows * grid.cols, w.d, w.h, w.c);
      return [&, ws](int64_t i0, int64_t ni, int64_t r0, int64_t nr, scalar_t* S) -> const scalar_t* {
        pddm_tile_forward(w, TileRows<scalar_t>{xp, Pxp, i0, ni, yp, Pyp, r0, nr}, *ws, S);
        return ws->norm_u.data();  // ||x_i - y_r||: 0 for equal rows
      };
    });
  });
  return result;
}

MineResult mine_euclidean_cpu(const at::Tensor& x_in, const at::Tensor& x_labels,
                              const std::optional<at::Tensor>& y_in, const std::optional<at::Tensor>& y_labels,
                              int64_t k) {
  check_embeddings("pddm_ext::mine_euclidean", x_in, y_in);
  check_mine_args("pddm_ext::mine_euclidean", x_in, x_labels, y_in, y_labels, k);
  vec::select_isa_from_env();
  const bool batch = !y_in.has_value();
  const auto x = x_in.contiguous();
  const auto y = batch ? x : y_in->contiguous();
  const int64_t d = x.size(1), n = y.size(0);
  MineResult result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "euclidean_mine_cpu", [&] {
    // Both sides centred by one common vector when they share a large offset (see euclidean_tile,
    // row_centre); x and y themselves serve the exact recomputation of near pairs.
    const auto [centre, shift] = row_centre<scalar_t>(x, batch ? at::Tensor() : y);
    const auto xc = shift ? (x - centre).contiguous() : x;
    const auto yc = batch ? xc : (shift ? (y - centre).contiguous() : y);
    const auto x_sq = row_squared_norms<scalar_t>(xc);
    const auto y_sq = batch ? x_sq : row_squared_norms<scalar_t>(yc);
    const auto yc_t = yc.t().contiguous();  // (d, n): the Gram GEMM's right operand, packed once
    const scalar_t *xcp = xc.data_ptr<scalar_t>(), *ycp = yc_t.data_ptr<scalar_t>();
    const scalar_t *xp = x.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t *xs = x_sq.data_ptr<scalar_t>(), *ys = y_sq.data_ptr<scalar_t>();
    const auto grid = euclidean_grid(batch, x.size(0), y.size(0));  // tile_shapes.h
    const RowsOf<scalar_t> rows{xp, yp, d};
    result = mine_tiles<scalar_t>(grid, rows, x_labels, batch ? x_labels : *y_labels, k, x.options(), [&] {
      return [&](int64_t i0, int64_t ni, int64_t r0, int64_t nr, scalar_t* S) -> const scalar_t* {
        euclidean_tile(xcp, xs, i0, ni, ycp, ys, r0, nr, d, n, xp, yp, S);
        return S;  // -||x_i - y_r||^2: exactly 0 for equal rows (euclidean_tile recomputes near pairs)
      };
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pddm_ext, CPU, m) {
  m.impl("mine_pddm", &mine_pddm_cpu);
  m.impl("mine_euclidean", &mine_euclidean_cpu);
}

}  // namespace pddm_ext::cpu
