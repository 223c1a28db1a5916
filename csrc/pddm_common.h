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
