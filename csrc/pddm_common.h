// Math shared by the CPU and CUDA kernels: the per-pair pieces of SPEC §1, the tie rules of
// SPEC §3 and the tile index arithmetic of batch mode. Everything here is host/device inline.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace pddm_ext {

// SPEC §1: normalize(z) = z / max(||z||, eps), the semantics of torch.nn.functional.normalize.
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

// Backward of z = p / max(||p||, eps) for one coordinate, given s = sum_k z_k dz_k:
// dp = (dz - z s) / ||p|| when ||p|| > eps, else dz / eps (the clamp is constant there).
template <typename T>
C10_HOST_DEVICE inline T normalize_backward(T dz, T z, T s, T norm) {
  return norm > T(kNormEps) ? (dz - z * s) / norm : dz / T(kNormEps);
}

// Tie rules (SPEC §3): exact ties go to the smallest index. best_idx < 0 means "no candidate yet".
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
