// Contracting a * b + c into one FMA where the target has it is what makes the GEMM fast; it is
// deterministic per code path, which is all the tie rule needs.
#pragma GCC optimize("fp-contract=fast")

#include "cpu_vec.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "../pddm_common.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PDDM_X86_LEVELS 1
#else
#define PDDM_X86_LEVELS 0
#endif

// The per-pair loops below are written once and must be compiled into each level's variant
// of their caller (else they run as the baseline SSE2 build), so they are always inlined.
#define PDDM_INLINE inline __attribute__((always_inline))
// The loop bodies handed to for_lanes: inlined into each level's variant too (a body left out of line
// would run at the baseline level).
#define PDDM_LAMBDA_INLINE __attribute__((always_inline))

namespace pddm_ext::cpu::vec {
namespace {

constexpr const char* kIsaVariable = "PDDM_EXT_CPU_ISA";
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
constexpr int kIsaLevels = 3;

// The best level this CPU runs (its CPUID flags, read once): 2 avx512, 1 avx2, 0 baseline.
int best_level() {
  static const int level = [] {
#if PDDM_X86_LEVELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 2;
    if (__builtin_cpu_supports("x86-64-v3")) return 1;
#endif
    return 0;
  }();
  return level;
}

// The level of the calls below, set by select_isa_from_env at the start of every CPU op; -1 until
// then (the best level). One relaxed load per call: the ops set it before their parallel regions.
std::atomic<int> selected_level{-1};

PDDM_INLINE int active_level() {
  const int level = selected_level.load(std::memory_order_relaxed);
  return level < 0 ? best_level() : level;
}

std::string levels_of_this_cpu() {
  std::string out;
  for (int l = 0; l <= best_level(); ++l) out += std::string(l ? ", " : "") + kIsaNames[l];
  return out;
}

}  // namespace

const char* isa_name(int level) { return level >= 0 && level < kIsaLevels ? kIsaNames[level] : "unknown"; }

int cpu_best_isa() { return best_level(); }

int select_isa_from_env() {
  const char* value = std::getenv(kIsaVariable);
  int level = best_level();
  if (value != nullptr && value[0] != '\0') {
    level = -1;
    for (int l = 0; l < kIsaLevels; ++l) {
      if (std::string(value) == kIsaNames[l]) level = l;
    }
    TORCH_CHECK_VALUE(level >= 0, kIsaVariable, "='", value, "' is not an instruction-set level: use baseline, ",
                      "avx2 or avx512 (this CPU has ", levels_of_this_cpu(), "), or unset it for the best");
    TORCH_CHECK_VALUE(level <= best_level(), kIsaVariable, "='", value, "' names a level this CPU lacks: it has ",
                      levels_of_this_cpu());
  }
  selected_level.store(level, std::memory_order_relaxed);
  return level;
}

namespace {

// R rows x two vectors of columns of C, accumulated in registers over the whole of K.
template <typename T, int kBytes, int R, bool kAccumulate>
inline __attribute__((always_inline)) void gemm_micro(int64_t K, const T* __restrict A, int64_t lda, int64_t ldk,
                                                      const T* __restrict Bt, int64_t ldb, T* __restrict C,
                                                      int64_t ldc) {
  typedef T V __attribute__((vector_size(kBytes)));
  constexpr int L = kBytes / sizeof(T);
  V acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (kAccumulate) {
      std::memcpy(&acc0[r], C + r * ldc, sizeof(V));
      std::memcpy(&acc1[r], C + r * ldc + L, sizeof(V));
    } else {
      acc0[r] = acc1[r] = V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V b0, b1;
    std::memcpy(&b0, Bt + k * ldb, sizeof(V));
    std::memcpy(&b1, Bt + k * ldb + L, sizeof(V));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T a = A[r * lda + k * ldk];
      acc0[r] += a * b0;
      acc1[r] += a * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    std::memcpy(C + r * ldc, &acc0[r], sizeof(V));
    std::memcpy(C + r * ldc + L, &acc1[r], sizeof(V));
  }
}

template <typename T, int kBytes, int R, bool kAccumulate>
inline __attribute__((always_inline)) void gemm_rows_impl(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                                                          int64_t ldk, const T* Bt, int64_t ldb, T* C) {
  constexpr int64_t NB = 2 * kBytes / sizeof(T);
  int64_t j0 = 0;
  for (; j0 + NB <= N; j0 += NB) {
    int64_t i = 0;
    for (; i + R <= M; i += R) {
      gemm_micro<T, kBytes, R, kAccumulate>(K, A + i * lda, lda, ldk, Bt + j0, ldb, C + i * N + j0, N);
    }
    for (; i < M; ++i) gemm_micro<T, kBytes, 1, kAccumulate>(K, A + i * lda, lda, ldk, Bt + j0, ldb, C + i * N + j0, N);
  }
  if (j0 == N) return;
  // The last, partial block of columns goes through the same vector code on a zero-padded copy
  // of its columns, so every element of C is computed by the same instructions.
  const int64_t tail = N - j0;
  thread_local std::vector<T> padded;
  padded.assign(K * NB, T(0));
  for (int64_t k = 0; k < K; ++k) std::memcpy(padded.data() + k * NB, Bt + k * ldb + j0, tail * sizeof(T));
  T block[R * NB] = {};
  int64_t i = 0;
  for (; i + R <= M; i += R) {
    for (int r = 0; r < R && kAccumulate; ++r) std::memcpy(block + r * NB, C + (i + r) * N + j0, tail * sizeof(T));
    gemm_micro<T, kBytes, R, kAccumulate>(K, A + i * lda, lda, ldk, padded.data(), NB, block, NB);
    for (int r = 0; r < R; ++r) std::memcpy(C + (i + r) * N + j0, block + r * NB, tail * sizeof(T));
  }
  for (; i < M; ++i) {
    if (kAccumulate) std::memcpy(block, C + i * N + j0, tail * sizeof(T));
    gemm_micro<T, kBytes, 1, kAccumulate>(K, A + i * lda, lda, ldk, padded.data(), NB, block, NB);
    std::memcpy(C + i * N + j0, block, tail * sizeof(T));
  }
}

#if PDDM_X86_LEVELS
#define PDDM_GEMM_VARIANT(T, NAME, TARGET, BYTES, ROWS)                                                         \
  __attribute__((target(TARGET), flatten)) void NAME(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, \
                                                     int64_t ldk, const T* Bt, int64_t ldb, T* C,               \
                                                     bool accumulate) {                                         \
    if (accumulate) return gemm_rows_impl<T, BYTES, ROWS, true>(M, N, K, A, lda, ldk, Bt, ldb, C);             \
    gemm_rows_impl<T, BYTES, ROWS, false>(M, N, K, A, lda, ldk, Bt, ldb, C);                                   \
  }
PDDM_GEMM_VARIANT(float, gemm_avx512, "arch=x86-64-v4", 64, 8)
PDDM_GEMM_VARIANT(double, gemm_avx512, "arch=x86-64-v4", 64, 8)
PDDM_GEMM_VARIANT(float, gemm_avx2, "arch=x86-64-v3", 32, 6)
PDDM_GEMM_VARIANT(double, gemm_avx2, "arch=x86-64-v3", 32, 6)

#endif

// A's element (row r, k) is A[r * lda + k * ldk].
template <typename T>
inline void gemm_rows_dispatch(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, int64_t ldk, const T* Bt,
                               int64_t ldb, T* C, bool accumulate) {
#if PDDM_X86_LEVELS
  const int level = active_level();
  if (level == 2) return gemm_avx512(M, N, K, A, lda, ldk, Bt, ldb, C, accumulate);
  if (level == 1) return gemm_avx2(M, N, K, A, lda, ldk, Bt, ldb, C, accumulate);
#endif
  if (accumulate) return gemm_rows_impl<T, 16, 4, true>(M, N, K, A, lda, ldk, Bt, ldb, C);
  gemm_rows_impl<T, 16, 4, false>(M, N, K, A, lda, ldk, Bt, ldb, C);
}

}  // namespace

void gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb, float* C,
               bool accumulate) {
  gemm_rows_dispatch(M, N, K, A, lda, 1, Bt, ldb, C, accumulate);
}
void gemm_rows(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bt, int64_t ldb,
               double* C, bool accumulate) {
  gemm_rows_dispatch(M, N, K, A, lda, 1, Bt, ldb, C, accumulate);
}
void gemm_tn_accumulate(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb,
                        float* C) {
  gemm_rows_dispatch(M, N, K, A, 1, lda, Bt, ldb, C, true);
}
void gemm_tn_accumulate(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bt, int64_t ldb,
                        double* C) {
  gemm_rows_dispatch(M, N, K, A, 1, lda, Bt, ldb, C, true);
}

namespace {

// Per-pair sums. GCC ends an omp simd reduction by storing the vector and adding its lanes one by
// one (a serial chain of 16 scalar adds per sum, several sums per pair at h = 128). Here each sum
// keeps one partial per lane of a 64-byte vector (acc[l] for the elements k = l mod kLanes) and the
// lanes are added as a tree at the end. The order is fixed, so equal inputs still give equal sums.
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

// body(k, l) for k in [0, n) with l = k mod kLanes, one vector of lanes at a time.
template <typename T, typename F>
PDDM_INLINE void for_lanes(int64_t n, F&& body) {
  int64_t k0 = 0;
  for (; k0 + kLanes<T> <= n; k0 += kLanes<T>) {
#pragma omp simd
    for (int l = 0; l < kLanes<T>; ++l) body(k0 + l, l);
  }
  for (int l = 0; k0 + l < n; ++l) body(k0 + l, l);
}

template <typename T>
PDDM_INLINE T lane_sum(T* acc) {
  for (int w = kLanes<T> / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// One multiply-add chain in k order, exactly as gemm_rows sums each element: the squared norm of a
// row equals the Gram entry of that row with any copy of itself, so the squared distance of a
// duplicate pair, ||x||^2 + ||x||^2 - 2 x.x, is exactly 0 (docs/design.md#ties-and-tolerance).
template <typename T>
__attribute__((optimize("no-tree-vectorize"))) PDDM_INLINE T dot_impl(const T* __restrict x, const T* __restrict y,
                                                                       int64_t d) {
  T s = 0;
  for (int64_t k = 0; k < d; ++k) s += x[k] * y[k];
  return s;
}

template <typename T>
PDDM_INLINE void abs_diff_impl(const T* __restrict x, const T* __restrict y, T* __restrict u, int64_t d, T* sq_diff,
                          T* sq_sum) {
  T sd[kLanes<T>] = {}, ss[kLanes<T>] = {};
  for_lanes<T>(d, [&](int64_t k, int l) {
    const T diff = x[k] - y[k], sum = x[k] + y[k];
    u[k] = std::abs(diff);
    sd[l] += diff * diff;
    ss[l] += sum * sum;
  });
  *sq_diff = lane_sum(sd);
  *sq_sum = lane_sum(ss);
}

template <typename T>
PDDM_INLINE T squared_distance_impl(const T* __restrict x, const T* __restrict y, int64_t d) {
  T sq[kLanes<T>] = {};
  for_lanes<T>(d, [&](int64_t k, int l) {
    const T diff = x[k] - y[k];
    sq[l] += diff * diff;
  });
  return lane_sum(sq);
}

template <typename T>
PDDM_INLINE T branch_units_impl(const T* __restrict a, const T* __restrict b, T scale, const T* __restrict bias,
                           T* __restrict out, int64_t h) {
  T sq[kLanes<T>] = {};
  if (b == nullptr) {
    for_lanes<T>(h, [&](int64_t k, int l) {
      const T z = branch_unit(a[k], scale, bias[k]);
      out[k] = z;
      sq[l] += z * z;
    });
  } else {
    for_lanes<T>(h, [&](int64_t k, int l) {
      const T z = branch_unit(a[k] + b[k], scale, bias[k]);
      out[k] = z;
      sq[l] += z * z;
    });
  }
  return lane_sum(sq);
}

// branch_units_impl written with explicit 32-byte vectors for the AVX2 level, where GCC leaves the
// loop above scalar (its ReLU stays a branch: a mispredicted jump per hidden unit, a quarter of the
// AVX2 forward's time). The same lanes (acc lane l sums the elements k = l mod kLanes, two vectors per
// block of kLanes), the same tail and the same lane tree, and the same FMA contractions as GCC gave the
// scalar loop: the results are bitwise those of the scalar loop on the cases checked.
template <typename T>
PDDM_INLINE T branch_units_vec32(const T* __restrict a, const T* __restrict b, T scale, const T* __restrict bias,
                                 T* __restrict out, int64_t h) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T);
  static_assert(2 * L == kLanes<T>, "two 32-byte vectors per block of lanes");
  V acc[2] = {};
  int64_t k0 = 0;
  for (; k0 + kLanes<T> <= h; k0 += kLanes<T>) {
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const int64_t k = k0 + v * L;
      V x, bv, z;
      std::memcpy(&x, a + k, sizeof(V));
      if (b != nullptr) {
        std::memcpy(&bv, b + k, sizeof(V));
        x += bv;
      }
      std::memcpy(&bv, bias + k, sizeof(V));
      z = x * scale + bv;
      z = z > V{} ? z : V{};
      std::memcpy(out + k, &z, sizeof(V));
      acc[v] += z * z;
    }
  }
  T sq[kLanes<T>];
  std::memcpy(sq, acc, sizeof(sq));
  for (int l = 0; k0 + l < h; ++l) {
    const int64_t k = k0 + l;
    const T z = branch_unit(b == nullptr ? a[k] : a[k] + b[k], scale, bias[k]);
    out[k] = z;
    sq[l] += z * z;
  }
  return lane_sum(sq);
}

template <typename T>
PDDM_INLINE void scale_impl(T* __restrict z, T scale, int64_t h) {
#pragma omp simd
  for (int64_t k = 0; k < h; ++k) z[k] *= scale;
}

template <typename T>
PDDM_INLINE T score_layer_impl(const T* __restrict q, const T* __restrict bias, const T* __restrict w, int64_t c) {
  T s[kLanes<T>] = {};
  for_lanes<T>(c, [&](int64_t j, int l) { s[l] += w[j] * relu(q[j] + bias[j]); });
  return lane_sum(s);
}

// q and dq are the same array (in place): each j reads q[j] before it writes it.
template <typename T>
PDDM_INLINE void score_layer_backward_impl(T* q, const T* __restrict bias, const T* __restrict w, T g,
                                      T* __restrict dw, T* __restrict dbias, int64_t c) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    const T pre = q[j] + bias[j];
    const T dq = pre > T(0) ? g * w[j] : T(0);
    q[j] = dq;
    dw[j] += g * relu(pre);
    dbias[j] += dq;
  }
}

// Backward of both branches of one pair (see cpu_vec.h). The two dot products share one pass and
// the two scale gradients another. kSameRow: out_x and out_y are the same row (a diagonal pair in
// batch mode), which then gets twice the mean branch's gradient through out_x alone (so the two
// pointers may be restrict: no row is reached through both).
template <bool kSameRow, typename T>
PDDM_INLINE void branches_backward_impl(const T* __restrict z, const T* __restrict dz, T norm_u1, T norm_v1,
                                        T* __restrict A, T scale_u, const T* __restrict Pa, const T* __restrict Pb,
                                        T scale_v, T* __restrict db_u, T* __restrict db_v, T* __restrict out_x,
                                        T* __restrict out_y, int64_t h, T* dscale_u, T* dscale_v) {
  const T *zu = z, *zv = z + h, *dzu = dz, *dzv = dz + h;
  T su_l[kLanes<T>] = {}, sv_l[kLanes<T>] = {};
  for_lanes<T>(h, [&](int64_t k, int l) PDDM_LAMBDA_INLINE {
    su_l[l] += zu[k] * dzu[k];
    sv_l[l] += zv[k] * dzv[k];
  });
  T su = lane_sum(su_l), sv = lane_sum(sv_l);
  // normalize_backward with the norm test hoisted: dp = (dz - z s) / ||p||, or dz / eps when clamped.
  const bool clamped_u = !(norm_u1 > T(kNormEps)), clamped_v = !(norm_v1 > T(kNormEps));
  const T inv_u = T(1) / (clamped_u ? T(kNormEps) : norm_u1), inv_v = T(1) / (clamped_v ? T(kNormEps) : norm_v1);
  if (clamped_u) su = 0;
  if (clamped_v) sv = 0;
  T gu[kLanes<T>] = {}, gv[kLanes<T>] = {};
  for_lanes<T>(h, [&](int64_t k, int l) PDDM_LAMBDA_INLINE {
    // z > 0 exactly where the ReLU was active (the normalisation only rescales).
    const T dpre_u = zu[k] > T(0) ? (dzu[k] - zu[k] * su) * inv_u : T(0);
    const T dpre_v = zv[k] > T(0) ? (dzv[k] - zv[k] * sv) * inv_v : T(0);
    gu[l] += dpre_u * A[k];
    gv[l] += dpre_v * (Pa[k] + Pb[k]);
    db_u[k] += dpre_u;
    db_v[k] += dpre_v;
    A[k] = dpre_u * scale_u;  // in place: dA
    const T g = dpre_v * scale_v;
    if (kSameRow) {
      out_x[k] += T(2) * g;
    } else {
      out_x[k] += g;
      out_y[k] += g;
    }
  });
  *dscale_u = lane_sum(gu);
  *dscale_v = lane_sum(gv);
}

// The two backward loops above with explicit 32-byte vectors for the AVX2 level, where GCC leaves them
// scalar (a branch per ReLU test). The same arithmetic per element; the lane sums keep their lanes
// (lane l sums k = l mod kLanes), tails and trees.
template <typename T>
PDDM_INLINE void score_layer_backward_vec32(T* q, const T* __restrict bias, const T* __restrict w, T g,
                                            T* __restrict dw, T* __restrict dbias, int64_t c) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T);
  int64_t j = 0;
  for (; j + L <= c; j += L) {
    V qv, bv, wv, dwv, dbv;
    std::memcpy(&qv, q + j, sizeof(V));
    std::memcpy(&bv, bias + j, sizeof(V));
    std::memcpy(&wv, w + j, sizeof(V));
    std::memcpy(&dwv, dw + j, sizeof(V));
    std::memcpy(&dbv, dbias + j, sizeof(V));
    const V pre = qv + bv;
    const V dq = pre > V{} ? g * wv : V{};
    std::memcpy(q + j, &dq, sizeof(V));
    dwv += g * (pre > V{} ? pre : V{});
    dbv += dq;
    std::memcpy(dw + j, &dwv, sizeof(V));
    std::memcpy(dbias + j, &dbv, sizeof(V));
  }
  for (; j < c; ++j) {
    const T pre = q[j] + bias[j];
    const T dq = pre > T(0) ? g * w[j] : T(0);
    q[j] = dq;
    dw[j] += g * relu(pre);
    dbias[j] += dq;
  }
}

template <bool kSameRow, typename T>
PDDM_INLINE void branches_backward_vec32(const T* __restrict z, const T* __restrict dz, T norm_u1, T norm_v1,
                                         T* __restrict A, T scale_u, const T* __restrict Pa, const T* __restrict Pb,
                                         T scale_v, T* __restrict db_u, T* __restrict db_v, T* __restrict out_x,
                                         T* __restrict out_y, int64_t h, T* dscale_u, T* dscale_v) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T);
  const T *zu = z, *zv = z + h, *dzu = dz, *dzv = dz + h;
  T su_l[kLanes<T>] = {}, sv_l[kLanes<T>] = {};
  for_lanes<T>(h, [&](int64_t k, int l) PDDM_LAMBDA_INLINE {
    su_l[l] += zu[k] * dzu[k];
    sv_l[l] += zv[k] * dzv[k];
  });
  T su = lane_sum(su_l), sv = lane_sum(sv_l);
  const bool clamped_u = !(norm_u1 > T(kNormEps)), clamped_v = !(norm_v1 > T(kNormEps));
  const T inv_u = T(1) / (clamped_u ? T(kNormEps) : norm_u1), inv_v = T(1) / (clamped_v ? T(kNormEps) : norm_v1);
  if (clamped_u) su = 0;
  if (clamped_v) sv = 0;
  V gu_v[2] = {}, gv_v[2] = {};
  int64_t k0 = 0;
  for (; k0 + kLanes<T> <= h; k0 += kLanes<T>) {
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const int64_t k = k0 + v * L;
      V zu_, dzu_, zv_, dzv_, a_, pa_, pb_, dbu_, dbv_, ox_;
      std::memcpy(&zu_, zu + k, sizeof(V));
      std::memcpy(&dzu_, dzu + k, sizeof(V));
      std::memcpy(&zv_, zv + k, sizeof(V));
      std::memcpy(&dzv_, dzv + k, sizeof(V));
      std::memcpy(&a_, A + k, sizeof(V));
      std::memcpy(&pa_, Pa + k, sizeof(V));
      std::memcpy(&pb_, Pb + k, sizeof(V));
      std::memcpy(&dbu_, db_u + k, sizeof(V));
      std::memcpy(&dbv_, db_v + k, sizeof(V));
      std::memcpy(&ox_, out_x + k, sizeof(V));
      const V dpre_u = zu_ > V{} ? (dzu_ - zu_ * su) * inv_u : V{};
      const V dpre_v = zv_ > V{} ? (dzv_ - zv_ * sv) * inv_v : V{};
      gu_v[v] += dpre_u * a_;
      gv_v[v] += dpre_v * (pa_ + pb_);
      dbu_ += dpre_u;
      dbv_ += dpre_v;
      a_ = dpre_u * scale_u;
      const V g = dpre_v * scale_v;
      std::memcpy(db_u + k, &dbu_, sizeof(V));
      std::memcpy(db_v + k, &dbv_, sizeof(V));
      std::memcpy(A + k, &a_, sizeof(V));
      if (kSameRow) {
        ox_ += T(2) * g;
      } else {
        V oy_;
        std::memcpy(&oy_, out_y + k, sizeof(V));
        ox_ += g;
        oy_ += g;
        std::memcpy(out_y + k, &oy_, sizeof(V));
      }
      std::memcpy(out_x + k, &ox_, sizeof(V));
    }
  }
  T gu[kLanes<T>], gv[kLanes<T>];
  std::memcpy(gu, gu_v, sizeof(gu));
  std::memcpy(gv, gv_v, sizeof(gv));
  for (int l = 0; k0 + l < h; ++l) {
    const int64_t k = k0 + l;
    const T dpre_u = zu[k] > T(0) ? (dzu[k] - zu[k] * su) * inv_u : T(0);
    const T dpre_v = zv[k] > T(0) ? (dzv[k] - zv[k] * sv) * inv_v : T(0);
    gu[l] += dpre_u * A[k];
    gv[l] += dpre_v * (Pa[k] + Pb[k]);
    db_u[k] += dpre_u;
    db_v[k] += dpre_v;
    A[k] = dpre_u * scale_u;
    const T g = dpre_v * scale_v;
    if (kSameRow) {
      out_x[k] += T(2) * g;
    } else {
      out_x[k] += g;
      out_y[k] += g;
    }
  }
  *dscale_u = lane_sum(gu);
  *dscale_v = lane_sum(gv);
}

// kRows: 3 = both rows, 1 = dx only, 2 = dy only (the other side needs no gradient).
template <int kRows, typename T>
PDDM_INLINE void input_grad_impl(const T* __restrict x, const T* __restrict y, const T* __restrict dU, T cu, T cv,
                                 T* __restrict dx, T* __restrict dy, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    const T diff = x[k] - y[k];
    const T sign = T(diff > T(0)) - T(diff < T(0));
    const T via_u = sign * (dU[k] + cu * std::abs(diff));  // u = |x - y|
    const T via_v = cv * (x[k] + y[k]);
    if (kRows & 1) dx[k] += via_u + via_v;
    if (kRows & 2) dy[k] += via_v - via_u;
  }
}

template <typename T>
PDDM_INLINE void input_grad_dispatch(const T* x, const T* y, const T* dU, T cu, T cv, T* dx, T* dy, int64_t d) {
  if (dy == nullptr) return input_grad_impl<1>(x, y, dU, cu, cv, dx, dy, d);
  if (dx == nullptr) return input_grad_impl<2>(x, y, dU, cu, cv, dx, dy, d);
  if (dx != dy) return input_grad_impl<3>(x, y, dU, cu, cv, dx, dy, d);
  // A diagonal pair: x = y, so u = 0 contributes nothing and the mean branch counts twice.
  for (int64_t k = 0; k < d; ++k) dx[k] += T(2) * cv * (x[k] + y[k]);
}

}  // namespace

// Each per-pair loop is compiled once per level (the _v4, _v3 and _base variants, the loops above
// inlined into each) and the public function calls the variant of the active level.
#define PDDM_VEC_VARIANTS(T, SUFFIX, ATTR, BRANCH_UNITS, SCORE_BACKWARD, BRANCHES_BACKWARD)                   \
  ATTR __attribute__((optimize("no-tree-vectorize"))) T dot_##SUFFIX(const T* x, const T* y, int64_t d) {    \
    return dot_impl(x, y, d);                                                                                \
  }                                                                                                          \
  ATTR T squared_distance_##SUFFIX(const T* x, const T* y, int64_t d) { return squared_distance_impl(x, y, d); } \
  ATTR void abs_diff_##SUFFIX(const T* x, const T* y, T* u, int64_t d, T* sq_diff, T* sq_sum) {             \
    abs_diff_impl(x, y, u, d, sq_diff, sq_sum);                                                              \
  }                                                                                                          \
  ATTR T branch_units_##SUFFIX(const T* a, const T* b, T scale, const T* bias, T* out, int64_t h) {         \
    return BRANCH_UNITS(a, b, scale, bias, out, h);                                                          \
  }                                                                                                          \
  ATTR void scale_in_place_##SUFFIX(T* z, T scale, int64_t h) { scale_impl(z, scale, h); }                  \
  ATTR T score_layer_##SUFFIX(const T* q, const T* bias, const T* w, int64_t c) {                           \
    return score_layer_impl(q, bias, w, c);                                                                  \
  }                                                                                                          \
  ATTR void score_layer_backward_##SUFFIX(T* q, const T* bias, const T* w, T g, T* dw, T* dbias, int64_t c) { \
    SCORE_BACKWARD(q, bias, w, g, dw, dbias, c);                                                             \
  }                                                                                                          \
  ATTR void branches_backward_##SUFFIX(const T* z, const T* dz, T norm_u1, T norm_v1, T* A, T scale_u,          \
                                       const T* Pa, const T* Pb, T scale_v, T* db_u, T* db_v, T* out_x, T* out_y, \
                                       int64_t h, T* dscale_u, T* dscale_v) {                                \
    if (out_x == out_y) {                                                                                    \
      return BRANCHES_BACKWARD<true>(z, dz, norm_u1, norm_v1, A, scale_u, Pa, Pb, scale_v, db_u, db_v,         \
                                     out_x, out_y, h, dscale_u, dscale_v);                                   \
    }                                                                                                        \
    BRANCHES_BACKWARD<false>(z, dz, norm_u1, norm_v1, A, scale_u, Pa, Pb, scale_v, db_u, db_v, out_x,          \
                                  out_y, h, dscale_u, dscale_v);                                             \
  }                                                                                                          \
  ATTR void input_grad_##SUFFIX(const T* x, const T* y, const T* dU, T cu, T cv, T* dx, T* dy, int64_t d) {  \
    input_grad_dispatch(x, y, dU, cu, cv, dx, dy, d);                                                        \
  }

namespace {
#if PDDM_X86_LEVELS
PDDM_VEC_VARIANTS(float, v4, __attribute__((target("arch=x86-64-v4"))), branch_units_impl, score_layer_backward_impl, branches_backward_impl)
PDDM_VEC_VARIANTS(double, v4, __attribute__((target("arch=x86-64-v4"))), branch_units_impl, score_layer_backward_impl, branches_backward_impl)
PDDM_VEC_VARIANTS(float, v3, __attribute__((target("arch=x86-64-v3"))), branch_units_vec32, score_layer_backward_vec32, branches_backward_vec32)
PDDM_VEC_VARIANTS(double, v3, __attribute__((target("arch=x86-64-v3"))), branch_units_vec32, score_layer_backward_vec32, branches_backward_vec32)
#define PDDM_CALL_LEVEL(NAME, ...)                                 \
  do {                                                             \
    const int level = active_level();                              \
    if (level == 2) return NAME##_v4(__VA_ARGS__);                 \
    if (level == 1) return NAME##_v3(__VA_ARGS__);                 \
    return NAME##_base(__VA_ARGS__);                               \
  } while (0)
#else
#define PDDM_CALL_LEVEL(NAME, ...) return NAME##_base(__VA_ARGS__)
#endif
PDDM_VEC_VARIANTS(float, base, , branch_units_impl, score_layer_backward_impl, branches_backward_impl)
PDDM_VEC_VARIANTS(double, base, , branch_units_impl, score_layer_backward_impl, branches_backward_impl)
}  // namespace

#define PDDM_DEFINE_VEC(T)                                                                                   \
  T dot(const T* x, const T* y, int64_t d) { PDDM_CALL_LEVEL(dot, x, y, d); }                                \
  T squared_distance(const T* x, const T* y, int64_t d) { PDDM_CALL_LEVEL(squared_distance, x, y, d); }      \
  void abs_diff(const T* x, const T* y, T* u, int64_t d, T* sq_diff, T* sq_sum) {                           \
    PDDM_CALL_LEVEL(abs_diff, x, y, u, d, sq_diff, sq_sum);                                                  \
  }                                                                                                          \
  T branch_units(const T* a, const T* b, T scale, const T* bias, T* out, int64_t h) {                       \
    PDDM_CALL_LEVEL(branch_units, a, b, scale, bias, out, h);                                                \
  }                                                                                                          \
  void scale_in_place(T* z, T scale, int64_t h) { PDDM_CALL_LEVEL(scale_in_place, z, scale, h); }           \
  T score_layer(const T* q, const T* bias, const T* w, int64_t c) { PDDM_CALL_LEVEL(score_layer, q, bias, w, c); } \
  void score_layer_backward(T* q, const T* bias, const T* w, T g, T* dw, T* dbias, int64_t c) {             \
    PDDM_CALL_LEVEL(score_layer_backward, q, bias, w, g, dw, dbias, c);                                      \
  }                                                                                                          \
  void branches_backward(const T* z, const T* dz, T norm_u1, T norm_v1, T* A, T scale_u, const T* Pa,        \
                         const T* Pb, T scale_v, T* db_u, T* db_v, T* out_x, T* out_y, int64_t h, T* dscale_u, \
                         T* dscale_v) {                                                                      \
    PDDM_CALL_LEVEL(branches_backward, z, dz, norm_u1, norm_v1, A, scale_u, Pa, Pb, scale_v, db_u, db_v,     \
                    out_x, out_y, h, dscale_u, dscale_v);                                                    \
  }                                                                                                          \
  void input_grad(const T* x, const T* y, const T* dU, T cu, T cv, T* dx, T* dy, int64_t d) {               \
    PDDM_CALL_LEVEL(input_grad, x, y, dU, cu, cv, dx, dy, d);                                                \
  }

PDDM_DEFINE_VEC(float)
PDDM_DEFINE_VEC(double)

namespace {

// cpu_isa() -> [the level the next CPU op runs at (PDDM_EXT_CPU_ISA read now, erroring as the ops
// do), then every level this CPU has, lowest first].
std::vector<std::string> cpu_isa_op() {
  std::vector<std::string> out{isa_name(select_isa_from_env())};
  for (int l = 0; l <= cpu_best_isa(); ++l) out.emplace_back(isa_name(l));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pddm_ext, m) { m.def("cpu_isa() -> str[]", &cpu_isa_op); }

}  // namespace pddm_ext::cpu::vec
