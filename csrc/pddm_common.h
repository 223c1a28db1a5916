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
template <typename T>
C10_HOST_DEVICE inline bool beats_max(T s, int64_t idx, T best_s, int64_t best_idx) {
  return best_idx < 0 || s > best_s || (s == best_s && idx < best_idx);
}

template <typename T>
C10_HOST_DEVICE inline bool beats_min(T s, int64_t idx, T best_s, int64_t best_idx) {
  return best_idx < 0 || s < best_s || (s == best_s && idx < best_idx);
}

// Order of positive pairs in mine_hard: ascending score, ties by (i, r) ascending.
template <typename T>
C10_HOST_DEVICE inline bool pair_before(T s1, int64_t i1, int64_t r1, T s2, int64_t i2, int64_t r2) {
  if (s1 != s2) return s1 < s2;
  if (i1 != i2) return i1 < i2;
  return r1 < r2;
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

}  // namespace pddm_ext
