// Math shared by the CPU and CUDA kernels: the per-pair pieces of docs/design.md#the-pddm-unit, the tie rules of
// docs/design.md#ties-and-tolerance and the tile index arithmetic of batch mode. Everything here is host/device inline.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace pddm_ext {

// docs/design.md#the-pddm-unit: normalize(z) = z / max(||z||, eps), the semantics of torch.nn.functional.normalize.
constexpr double kNormEps = 1e-12;

C10_HOST_DEVICE inline float pddm_sqrt(float z) { return sqrtf(z); }
C10_HOST_DEVICE inline double pddm_sqrt(double z) { return sqrt(z); }

template <typename T>
C10_HOST_DEVICE inline T relu(T z) {
  return z > T(0) ? z : T(0);
}

// max(norm, eps): the denominator normalize() divides by.
template <typename T>
C10_HOST_DEVICE inline T clamped_norm(T norm) {
  return norm > T(kNormEps) ? norm : T(kNormEps);
}

// One hidden unit of a branch: relu(projection / max(||input||, eps) + bias).
template <typename T>
C10_HOST_DEVICE inline T branch_unit(T projection, T inv_norm, T bias) {
  return relu(projection * inv_norm + bias);
}

// Per-pair input scales of the two branches (docs/design.md "The two forms"). The difference branch is
// W_u u * diff_scale, the mean branch (W_v a + W_v b) * mean_scale = W_v v * 2 mean_scale:
// normalize_inputs = true (the input-normalised form) gives 1 / max(||u||, eps) and
// 1 / (2 max(||v||, eps)); false (the distance-aware form) gives 1 and 1/2.
template <typename T>
C10_HOST_DEVICE inline T diff_scale(T norm_u, bool normalize_inputs) {
  return normalize_inputs ? T(1) / clamped_norm(norm_u) : T(1);
}
template <typename T>
C10_HOST_DEVICE inline T mean_scale(T norm_v, bool normalize_inputs) {
  return normalize_inputs ? T(0.5) / clamped_norm(norm_v) : T(0.5);
}

// Backward of those scales: given g = dL/d(scale), dL/du = diff_scale_coef * u and
// dL/d(a + b) = mean_scale_coef * (a + b). 1/||u|| has gradient -u/||u||^3; 1/(2||v||) with
// ||v|| = ||a + b||/2 has gradient -(a + b)/(8||v||^3) in a + b. Constant (0) below eps and in the
// distance-aware form.
template <typename T>
C10_HOST_DEVICE inline T diff_scale_coef(T g, T norm_u, bool normalize_inputs) {
  return normalize_inputs && norm_u > T(kNormEps) ? -g / (norm_u * norm_u * norm_u) : T(0);
}
template <typename T>
C10_HOST_DEVICE inline T mean_scale_coef(T g, T norm_v, bool normalize_inputs) {
  return normalize_inputs && norm_v > T(kNormEps) ? -g / (T(8) * norm_v * norm_v * norm_v) : T(0);
}

// Near-antipodal pairs (b ~ -a) in the mean branch. The kernels form W_v (a + b) as P_a + P_b with
// P = x W_v^T computed once per row. With gamma the rounding bound of a d-term dot product, each
// component of the computed P_a + P_b is off by at most gamma ||W_v[k]|| || |a| + |b| ||, and
// || |a| + |b| ||^2 <= 2 (||a||^2 + ||b||^2) = ||a - b||^2 + ||a + b||^2; W_v (a + b) formed from
// the sum a + b (exact up to one rounding per element) is off by at most gamma ||W_v[k]|| ||a + b||.
// So the factorisation multiplies the mean branch's error bound by
//     rho = sqrt(||a - b||^2 + ||a + b||^2) / ||a + b||   (1 for a = b, sqrt(2) for a orthogonal to b)
// and normalize(v) divides by ||a + b||, so the error reaches the score undamped: ~ rho * gamma,
// unbounded as b -> -a. Pairs with rho > kMeanDirectRatio take the direct product: everywhere else
// the factorised branch is within 8x the direct bound (float32, d = 128: 8 * 128 * 6e-8 = 6e-5 worst
// case, ~1e-6 typical, inside docs/design.md "Ties and tolerance"'s 1e-4). rho > 8 means an angle above ~166 degrees between
// rows of equal norm: rare in ordinary batches, and a direct pair costs O(h d), the order of its
// difference branch. Both inputs of the test are the per-pair sums every kernel already forms.
constexpr double kMeanDirectRatio = 8.0;

template <typename T>
C10_HOST_DEVICE inline bool mean_branch_direct(T sq_diff, T sq_sum) {
  return sq_sum * T(kMeanDirectRatio * kMeanDirectRatio) < sq_diff + sq_sum;
}

// Row k of W_v (a + b), from the sum a + b itself: the direct product of mean_branch_direct pairs.
template <typename T>
C10_HOST_DEVICE inline T mean_projection_direct(const T* W_v_row, const T* a, const T* b, int64_t d) {
  T s = 0;
  for (int64_t j = 0; j < d; ++j) s += W_v_row[j] * (a[j] + b[j]);
  return s;
}

// Backward of z = p / max(||p||, eps) for one coordinate, given s = sum_k z_k dz_k:
// dp = (dz - z s) / ||p|| when ||p|| > eps, else dz / eps (the clamp is constant there).
template <typename T>
C10_HOST_DEVICE inline T normalize_backward(T dz, T z, T s, T norm) {
  return norm > T(kNormEps) ? (dz - z * s) / norm : dz / T(kNormEps);
}

// Tie rules (docs/design.md#ties-and-tolerance): exact ties go to the smallest index. best_idx < 0 means "no candidate yet".
// NaN scores (only reachable by calling the ops directly: the API rejects NaN inputs) follow one
// rule on CPU and GPU: a NaN is the worst score for a maximum and for a minimum alike, chosen only
// when every candidate is NaN (then the smallest index). The GPU's packed float keys encode the same.
template <typename T>
C10_HOST_DEVICE inline bool is_nan_score(T s) {
  return s != s;
}

template <typename T>
C10_HOST_DEVICE inline bool beats_max(T s, int64_t idx, T best_s, int64_t best_idx) {
  if (best_idx < 0) return true;
  if (is_nan_score(s)) return is_nan_score(best_s) && idx < best_idx;
  if (is_nan_score(best_s)) return true;
  return s > best_s || (s == best_s && idx < best_idx);
}

template <typename T>
C10_HOST_DEVICE inline bool beats_min(T s, int64_t idx, T best_s, int64_t best_idx) {
  if (best_idx < 0) return true;
  if (is_nan_score(s)) return is_nan_score(best_s) && idx < best_idx;
  if (is_nan_score(best_s)) return true;
  return s < best_s || (s == best_s && idx < best_idx);
}

// Order of positive pairs in mine_hard: ascending score, ties by (i, r) ascending; NaN scores
// after all others (a strict weak order, as torch.sort orders NaN).
template <typename T>
C10_HOST_DEVICE inline bool pair_before(T s1, int64_t i1, int64_t r1, T s2, int64_t i2, int64_t r2) {
  const bool nan1 = is_nan_score(s1), nan2 = is_nan_score(s2);
  if (nan1 != nan2) return nan2;
  if (!nan1 && s1 != s2) return s1 < s2;
  if (i1 != i2) return i1 < i2;
  return r1 < r2;
}

// Reference mode (docs/design.md#mining): a query and a reference with the same label whose rows are
// equal, feature by feature (so -0 equals +0), are not a positive pair. Such a pair carries no
// information, and a reference set that holds the queries themselves (pytorch-metric-learning's
// CrossBatchMemory, DistributedMinerWrapper(efficient=True)) must not hand a query its own copy as
// its hardest positive (with a PDDM unit S(x, x) is often the lowest positive score). `gap` is a
// per-pair value the kernel has already formed that is exactly 0 when the rows are equal
// (||x_i - y_r|| for PDDM, the score -||x_i - y_r||^2 for Euclidean); it is necessary, not sufficient
// (a squared difference can underflow to 0), so only a zero gap pays for the exact comparison.
// Batch mode excludes the pair (i, i) by its index instead.
template <typename T>
C10_HOST_DEVICE inline bool rows_equal(const T* a, const T* b, int64_t d) {
  for (int64_t t = 0; t < d; ++t) {
    if (a[t] != b[t]) return false;
  }
  return true;
}

template <typename T>
C10_HOST_DEVICE inline bool self_copy_pair(T gap, const T* a, const T* b, int64_t d) {
  return gap == T(0) && rows_equal(a, b, d);
}

// Batch mode visits the tiles (bi, bj) with bi <= bj of an nb x nb grid, numbered row by row.
C10_HOST_DEVICE inline int64_t triangle_tile_count(int64_t nb) { return nb * (nb + 1) / 2; }

// Number of the first tile of tile row bi.
C10_HOST_DEVICE inline int64_t triangle_row_start(int64_t bi, int64_t nb) {
  return bi * nb - bi * (bi - 1) / 2;
}

// Tile number t -> (bi, bj): invert triangle_row_start with a floating estimate, then fix it up.
C10_HOST_DEVICE inline void triangle_tile(int64_t t, int64_t nb, int64_t* bi, int64_t* bj) {
  const double b = 2.0 * double(nb) + 1.0;
  int64_t row = int64_t((b - sqrt(b * b - 8.0 * double(t))) / 2.0);
  row = row < 0 ? 0 : (row > nb - 1 ? nb - 1 : row);
  while (row > 0 && triangle_row_start(row, nb) > t) --row;
  while (row + 1 < nb && triangle_row_start(row + 1, nb) <= t) ++row;
  *bi = row;
  *bj = row + (t - triangle_row_start(row, nb));
}

// The tiles of the pair space, rows x cols pairs each, for the CPU and CUDA kernels alike: batch mode
// (y = x) visits the upper triangle of the square tile grid (tile rows bi <= tile columns bj),
// numbered row by row; reference mode the whole (m, n) rectangle, row-major.
struct TileGrid {
  bool batch;
  int64_t m, n, rows, cols;  // rows, cols: tile height and width
  int64_t n_row_blocks, n_col_blocks;  // set by make() on the host: the device code divides only in tile()

  // Batch mode: square tiles over (m, m), whatever n and cols say.
  static TileGrid make(bool batch, int64_t m, int64_t n, int64_t rows, int64_t cols) {
    TileGrid g = batch ? TileGrid{true, m, m, rows, rows, 0, 0} : TileGrid{false, m, n, rows, cols, 0, 0};
    g.n_row_blocks = (g.m + g.rows - 1) / g.rows;
    g.n_col_blocks = (g.n + g.cols - 1) / g.cols;
    return g;
  }
  C10_HOST_DEVICE int64_t row_blocks() const { return n_row_blocks; }
  C10_HOST_DEVICE int64_t col_blocks() const { return n_col_blocks; }
  C10_HOST_DEVICE int64_t count() const {
    return batch ? triangle_tile_count(row_blocks()) : row_blocks() * col_blocks();
  }
  // The first row i0 and column r0 of tile t.
  C10_HOST_DEVICE void tile(int64_t t, int64_t* i0, int64_t* r0) const {
    int64_t bi, bj;
    if (batch) {
      triangle_tile(t, row_blocks(), &bi, &bj);
    } else {
      bi = t / col_blocks();
      bj = t - bi * col_blocks();
    }
    *i0 = bi * rows;
    *r0 = bj * cols;
  }
  // Rows [i0, i0 + ni) against columns [r0, r0 + nr) of tile t.
  C10_HOST_DEVICE void tile(int64_t t, int64_t* i0, int64_t* ni, int64_t* r0, int64_t* nr) const {
    tile(t, i0, r0);
    *ni = m - *i0 < rows ? m - *i0 : rows;
    *nr = n - *r0 < cols ? n - *r0 : cols;
  }
};

}  // namespace pddm_ext
