// Tiled pair scoring on the CPU, shared by the scores forward/backward and the mining kernels.
//
// A tile is a block of rows [i0, i0 + ni) of x against rows [r0, r0 + nr) of y: ni * nr pairs,
// numbered p = a * nr + b for the pair (i0 + a, r0 + b). Per tile the |x_i - y_r| block is built
// in a workspace small enough to stay in L2 and multiplied by W_u with one GEMM; the mean branch
// comes from per-row projections P = x W_v^T (docs/design.md#the-pddm-unit); W_c is a second GEMM over the tile.
// The tile shapes (how many rows and columns a tile has) are chosen in tile_shapes.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../pddm_common.h"
#include "cpu_vec.h"
#include "tile_shapes.h"

namespace pddm_ext::cpu {

// C (M x N, row stride N) = A (M x K, row stride lda) Bt (K x N, row stride ldb), or += with
// accumulate, by vec::gemm_rows over blocks of `grain` rows in parallel: every element is summed over
// k in order, whatever the thread count (duplicate rows of A give identical rows of C).
template <typename scalar_t>
void parallel_gemm_rows(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* Bt,
                        int64_t ldb, scalar_t* C, bool accumulate, int64_t grain) {
  if (M == 0 || N == 0 || (K == 0 && accumulate)) return;
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    vec::gemm_rows(end - begin, N, K, A + begin * lda, lda, Bt, ldb, C + begin * N, accumulate);
  });
}

// The parameters of a PDDM unit, contiguous, plus W_u^T and W_c^T packed for vec::gemm_rows.
// The tensors are owned here, so the raw pointers stay valid as long as this object lives.
template <typename scalar_t>
struct PddmWeights {
  at::Tensor W_u_t, b_u_t, W_v_t, b_v_t, W_c_t, b_c_t, w_s_t, Wt_u_t, Wt_v_t, Wt_c_t;
  const scalar_t *W_u, *b_u, *W_v, *b_v, *W_c, *b_c, *w_s, *Wt_u, *Wt_v, *Wt_c;
  scalar_t b_s;
  int64_t d, h, c;
  bool normalize_inputs;  // docs/design.md "The two forms": scale u and v by their inverse norms, or not

  PddmWeights(const at::Tensor& W_u_, const at::Tensor& b_u_, const at::Tensor& W_v_, const at::Tensor& b_v_,
              const at::Tensor& W_c_, const at::Tensor& b_c_, const at::Tensor& w_s_, const at::Tensor& b_s_,
              bool normalize_inputs_)
      : W_u_t(W_u_.contiguous()), b_u_t(b_u_.contiguous()), W_v_t(W_v_.contiguous()), b_v_t(b_v_.contiguous()),
        W_c_t(W_c_.contiguous()), b_c_t(b_c_.contiguous()), w_s_t(w_s_.contiguous()),
        Wt_u_t(W_u_.t().contiguous()), Wt_v_t(W_v_.t().contiguous()), Wt_c_t(W_c_.t().contiguous()),
        W_u(W_u_t.data_ptr<scalar_t>()),
        b_u(b_u_t.data_ptr<scalar_t>()), W_v(W_v_t.data_ptr<scalar_t>()), b_v(b_v_t.data_ptr<scalar_t>()),
        W_c(W_c_t.data_ptr<scalar_t>()), b_c(b_c_t.data_ptr<scalar_t>()), w_s(w_s_t.data_ptr<scalar_t>()),
        Wt_u(Wt_u_t.data_ptr<scalar_t>()), Wt_v(Wt_v_t.data_ptr<scalar_t>()), Wt_c(Wt_c_t.data_ptr<scalar_t>()),
        b_s(b_s_.item<scalar_t>()),
        d(W_u_.size(1)), h(W_u_.size(0)), c(W_c_.size(0)), normalize_inputs(normalize_inputs_) {}

  // P = x W_v^T (x contiguous): the per-row projections of the mean branch, each row computed
  // the same way wherever it sits (vec::gemm_rows), so duplicate rows project identically.
  at::Tensor project(const at::Tensor& x) const {
    auto P = at::empty({x.size(0), h}, x.options());
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* Pp = P.data_ptr<scalar_t>();
    parallel_gemm_rows(x.size(0), h, d, xp, d, Wt_v, h, Pp, /*accumulate=*/false, /*grain=*/256);
    return P;
  }
};

// One tile's inputs: rows of x (and their projections P = x W_v^T) against rows of y. The tile's
// pairs are all ni * nr of them (pairs == nullptr, pair p = a * nr + b) or the `count` listed in
// `pairs` by that same local index: the backward drops the pairs whose gradient is zero.
template <typename scalar_t>
struct TileRows {
  const scalar_t *x, *Px;
  int64_t i0, ni;
  const scalar_t *y, *Py;
  int64_t r0, nr;
  const int32_t* pairs = nullptr;
  int64_t count = 0;

  int64_t size() const { return pairs == nullptr ? ni * nr : count; }
  int64_t local(int64_t p) const { return pairs == nullptr ? p : pairs[p]; }
  int64_t row(int64_t p) const { return i0 + local(p) / nr; }  // index into x of pair p
  int64_t col(int64_t p) const { return r0 + local(p) % nr; }  // index into y of pair p
};

// Workspace and intermediates of one tile: everything the backward needs to re-use.
template <typename scalar_t>
struct PddmTile {
  std::vector<scalar_t> U;   // (T, d): |x_i - y_r|
  std::vector<scalar_t> A;   // (T, h): W_u |x_i - y_r|
  std::vector<scalar_t> Z;   // (T, 2h): [normalize(u'); normalize(v')]
  std::vector<scalar_t> Qm;  // (T, c): W_c Z (before b_c)
  std::vector<scalar_t> norm_u, norm_v, norm_u1, norm_v1;  // (T,): ||u||, ||v||, ||u'||, ||v'||
  // Near-antipodal pairs (mean_branch_direct): direct[p] is the offset in mean_direct of the pair's
  // W_v (x + y) formed from x + y, or -1 for the pairs that use P_i + P_r.
  std::vector<int32_t> direct;
  std::vector<scalar_t> mean_direct;

  PddmTile(int64_t pairs, int64_t d, int64_t h, int64_t c)
      : U(pairs * d), A(pairs * h), Z(pairs * 2 * h), Qm(pairs * c), norm_u(pairs), norm_v(pairs),
        norm_u1(pairs), norm_v1(pairs), direct(pairs) {}

  // The mean-branch pre-projection of pair p: W_v (x + y) as the two rows' P, or as one direct row.
  const scalar_t* mean_a(int64_t p, const scalar_t* Pi) const { return direct[p] < 0 ? Pi : &mean_direct[direct[p]]; }
};

// Scores S[p] of every pair of the tile (docs/design.md#the-pddm-unit), keeping the intermediates in ws (S may be null).
template <typename scalar_t>
void pddm_tile_forward(const PddmWeights<scalar_t>& w, const TileRows<scalar_t>& t, PddmTile<scalar_t>& ws,
                       scalar_t* S) {
  const int64_t d = w.d, h = w.h, c = w.c, T = t.size();
  ws.mean_direct.clear();
  for (int64_t p = 0; p < T; ++p) {
    scalar_t sq_u, sq_s;
    const scalar_t *xi = t.x + t.row(p) * d, *yr = t.y + t.col(p) * d;
    vec::abs_diff(xi, yr, ws.U.data() + p * d, d, &sq_u, &sq_s);
    ws.norm_u[p] = pddm_sqrt(sq_u);
    ws.norm_v[p] = scalar_t(0.5) * pddm_sqrt(sq_s);  // ||(x + y) / 2||
    ws.direct[p] = -1;
    if (mean_branch_direct(sq_u, sq_s)) {  // rare: P_i + P_r would cancel (pddm_common.h)
      ws.direct[p] = static_cast<int32_t>(ws.mean_direct.size());
      ws.mean_direct.resize(ws.mean_direct.size() + h);
      scalar_t* out = &ws.mean_direct[ws.direct[p]];
      for (int64_t k = 0; k < h; ++k) out[k] = mean_projection_direct(w.W_v + k * d, xi, yr, d);
    }
  }
  vec::gemm_rows(T, h, d, ws.U.data(), d, w.Wt_u, h, ws.A.data());
  for (int64_t p = 0; p < T; ++p) {
    const scalar_t* Pi = t.Px + t.row(p) * h;
    const scalar_t* Qr = t.Py + t.col(p) * h;
    scalar_t* zu = ws.Z.data() + p * 2 * h;
    scalar_t* zv = zu + h;
    // W_u normalize(u) = (W_u u) / max(||u||, eps); W_v normalize(v) = (P_i + P_r) / (2 max(||v||, eps))
    // (the distance-aware form drops the norms: scales 1 and 1/2).
    const scalar_t inv_u = diff_scale(ws.norm_u[p], w.normalize_inputs);
    const scalar_t inv_v = mean_scale(ws.norm_v[p], w.normalize_inputs);
    ws.norm_u1[p] = pddm_sqrt(vec::branch_units(ws.A.data() + p * h, (const scalar_t*)nullptr, inv_u, w.b_u, zu, h));
    ws.norm_v1[p] = pddm_sqrt(ws.direct[p] < 0 ? vec::branch_units(Pi, Qr, inv_v, w.b_v, zv, h)
                                               : vec::branch_units(ws.mean_a(p, Pi), (const scalar_t*)nullptr,
                                                                   inv_v, w.b_v, zv, h));
    vec::scale_in_place(zu, scalar_t(1) / clamped_norm(ws.norm_u1[p]), h);
    vec::scale_in_place(zv, scalar_t(1) / clamped_norm(ws.norm_v1[p]), h);
  }
  vec::gemm_rows(T, c, 2 * h, ws.Z.data(), 2 * h, w.Wt_c, c, ws.Qm.data());
  if (S == nullptr) return;  // the backward needs the intermediates only
  for (int64_t p = 0; p < T; ++p) S[p] = vec::score_layer(ws.Qm.data() + p * c, w.b_c, w.w_s, c) + w.b_s;
}

// Euclidean similarity S = -||x_i - y_r||^2 of a tile from one Gram GEMM and the squared norms,
// on rows centred by one common vector (row_centre: xc, yc_t = (y - centre)^T, (d, n), and x_sq,
// y_sq their squared norms): distances are translation invariant, and centring removes the common
// offset that ||x||^2 + ||y||^2 - 2 x.y would cancel. The Gram form is off by at most about
// 2 gamma_d (||x||^2 + ||y||^2) (gamma_d: the rounding bound of a d-term dot product), so pairs closer
// than kEuclideanExactRatio * (||x||^2 + ||y||^2) are recomputed from the differences of the original
// rows x, y: every other pair is then within 2 gamma_d / kEuclideanExactRatio = 8 gamma_d relative
// (float32, d = 128: 6e-5 worst case, ~5e-6 typical; docs/design.md "Ties and tolerance" allows 1e-4). Duplicate rows have
// equal Gram entries and norms (one FMA chain, see vec::dot), so they take the same branch and stay
// exactly 0 apart: the tie rule of docs/design.md "Ties and tolerance" holds.
constexpr double kEuclideanExactRatio = 0.25;

template <typename scalar_t>
void euclidean_tile(const scalar_t* xc, const scalar_t* x_sq, int64_t i0, int64_t ni, const scalar_t* yc_t,
                    const scalar_t* y_sq, int64_t r0, int64_t nr, int64_t d, int64_t n, const scalar_t* x,
                    const scalar_t* y, scalar_t* S) {
  constexpr scalar_t ratio = scalar_t(kEuclideanExactRatio);
  vec::gemm_rows(ni, nr, d, xc + i0 * d, d, yc_t + r0, n, S);
  for (int64_t a = 0; a < ni; ++a) {
    const scalar_t xa = x_sq[i0 + a];
    scalar_t* row = S + a * nr;
    // margin < 0 exactly when some pair has dist < ratio * sq (ratio * sq is exact: a power of two)
    scalar_t margin = std::numeric_limits<scalar_t>::max();
#pragma omp simd reduction(min : margin)
    for (int64_t b = 0; b < nr; ++b) {
      const scalar_t sq = xa + y_sq[r0 + b];
      const scalar_t dist = sq - scalar_t(2) * row[b];
      margin = std::min(margin, dist - ratio * sq);
      row[b] = dist > scalar_t(0) ? -dist : scalar_t(0);
    }
    if (!(margin < scalar_t(0))) continue;  // the common case: no pair of this row needs the exact sum
    for (int64_t b = 0; b < nr; ++b) {
      if (-row[b] < ratio * (xa + y_sq[r0 + b])) {
        const scalar_t dist = vec::squared_distance(x + (i0 + a) * d, y + (r0 + b) * d, d);
        row[b] = dist > scalar_t(0) ? -dist : scalar_t(0);
      }
    }
  }
}

// The common vector euclidean_tile's rows are centred by, and whether to centre at all. It is the
// mean of the rows of x and y together (y may be undefined; at most kCentreSample evenly spaced rows
// of each, summed serially in double: a fixed cost, the same whatever the thread count; any common
// vector is valid, the mean only makes it useful) rounded to a power-of-two grid q no coarser than
// the rows' spread:
// rows near it subtract exactly, integer-valued rows stay integer-valued (their Gram sums, and so
// their exact ties, stay exact), and a mean within q/2 of 0 (ordinary embeddings) gives 0. Rows
// are centred only when the rounded centre holds over a quarter of their mean squared norm, the
// scale of the Gram form's error: below that centring saves little, and the exact recomputation
// of near pairs keeps the accuracy anyway.
constexpr int64_t kCentreSample = 256;

template <typename scalar_t>
std::pair<at::Tensor, bool> row_centre(const at::Tensor& x, const at::Tensor& y) {
  const int64_t d = x.size(1);
  std::vector<double> sum(d, 0.0), sum_sq(d, 0.0);
  int64_t rows = 0;
  for (const at::Tensor* t : {&x, &y}) {
    if (!t->defined()) continue;
    const scalar_t* p = t->data_ptr<scalar_t>();
    const int64_t stride = (t->size(0) + kCentreSample - 1) / kCentreSample;
    for (int64_t i = 0; i < t->size(0); i += stride, ++rows) {
      for (int64_t j = 0; j < d; ++j) {
        const double v = double(p[i * d + j]);
        sum[j] += v;
        sum_sq[j] += v * v;
      }
    }
  }
  double centre_sq = 0, mean_sq = 0;
  for (int64_t j = 0; j < d; ++j) {
    sum[j] /= double(rows);  // now the mean
    centre_sq += sum[j] * sum[j];
    mean_sq += sum_sq[j] / double(rows);
  }
  const double spread = std::sqrt(std::max(mean_sq - centre_sq, 0.0) / double(d));  // per coordinate
  const double q = spread > 0 ? std::exp2(std::floor(std::log2(spread))) : 1.0;
  auto centre = at::empty({d}, x.options());
  scalar_t* c = centre.data_ptr<scalar_t>();
  double rounded_sq = 0;
  for (int64_t j = 0; j < d; ++j) {
    const double cj = std::nearbyint(sum[j] / q) * q;
    c[j] = scalar_t(cj);
    rounded_sq += cj * cj;
  }
  return {centre, 4 * rounded_sq > mean_sq};
}

// ||x_i||^2 of every row of a contiguous (rows, d) matrix, the same sum for every row.
template <typename scalar_t>
at::Tensor row_squared_norms(const at::Tensor& x) {
  auto out = at::empty({x.size(0)}, x.options());
  const int64_t d = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, x.size(0), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = vec::dot(xp + i * d, xp + i * d, d);
  });
  return out;
}

// at::parallel_for grain: a problem of one tile runs inline rather than waking the thread team.
constexpr int64_t kTilesPerTask = 2;

}  // namespace pddm_ext::cpu
