// Per-pair vector loops of the CPU kernels (the non-GEMM part of a tile) and their GEMMs, each built
// for three x86 levels (baseline x86-64, AVX2 + FMA = x86-64-v3, AVX-512 = x86-64-v4) and run at
// the level select_isa_from_env chose, so one binary runs everywhere and uses AVX-512 or AVX2 where
// the CPU has it. Each returns what the caller needs next (a sum).
#pragma once

#include <cstdint>

namespace pddm_ext::cpu::vec {

// Instruction-set levels: 0 baseline (x86-64, SSE2; the only one off x86 or without GCC), 1 avx2
// (x86-64-v3: AVX2, FMA), 2 avx512 (x86-64-v4: AVX-512 F/BW/CD/DQ/VL). The names are those of
// the PDDM_EXT_CPU_ISA variable; "unknown" for any other number.
const char* isa_name(int level);

// The best level this CPU has (CPUID, read once).
int cpu_best_isa();

// Reads PDDM_EXT_CPU_ISA now and makes its level the one the functions below run at: unset or empty
// is the best level of this CPU, baseline / avx2 / avx512 that level. Any other value, or a level
// this CPU lacks, throws c10::ValueError naming the variable, the value and the CPU's levels. Every
// CPU op calls it before its first kernel, so the variable is read per call, and the whole op runs
// at one level. Returns the level.
int select_isa_from_env();

// C (M x N, row stride N) = A (M x K, row stride lda) * B, with B given as Bt (K x N, row stride ldb),
// i.e. already transposed. Register-blocked for AVX-512 / AVX2 / SSE2, chosen at run time. Every
// element is summed over k in order with the same instructions whatever its row, so identical
// rows of A give bitwise identical rows of C: a pair's score does not depend on where it sits in
// a tile, and exact ties between duplicate rows stay exact (docs/design.md#ties-and-tolerance). accumulate: C += A B.
void gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb, float* C,
               bool accumulate = false);
void gemm_rows(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bt, int64_t ldb,
               double* C, bool accumulate = false);

// sum_k x[k] y[k], summed in k order as gemm_rows sums each element of C.
float dot(const float* x, const float* y, int64_t d);
double dot(const double* x, const double* y, int64_t d);

// C (M x N) += A^T B, with A given as (K x M, row stride lda) and B as Bt (K x N, row stride ldb):
// the parameter-gradient products of the backward (a sum over the pairs of a tile).
void gemm_tn_accumulate(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb,
                        float* C);
void gemm_tn_accumulate(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bt, int64_t ldb,
                        double* C);

// sum_k (x[k] - y[k])^2, summed from the differences (no cancellation); bitwise the same for equal inputs.
float squared_distance(const float* x, const float* y, int64_t d);
double squared_distance(const double* x, const double* y, int64_t d);

// u[k] = |x[k] - y[k]|; *sq_diff = ||x - y||^2, *sq_sum = ||x + y||^2.
void abs_diff(const float* x, const float* y, float* u, int64_t d, float* sq_diff, float* sq_sum);
void abs_diff(const double* x, const double* y, double* u, int64_t d, double* sq_diff, double* sq_sum);

// out[k] = relu(a[k] * scale + bias[k]) (b == nullptr) or relu((a[k] + b[k]) * scale + bias[k]);
// returns ||out||^2.
float branch_units(const float* a, const float* b, float scale, const float* bias, float* out, int64_t h);
double branch_units(const double* a, const double* b, double scale, const double* bias, double* out, int64_t h);

// z[k] *= scale.
void scale_in_place(float* z, float scale, int64_t h);
void scale_in_place(double* z, double scale, int64_t h);

// sum_j w[j] * relu(q[j] + bias[j]).
float score_layer(const float* q, const float* bias, const float* w, int64_t c);
double score_layer(const double* q, const double* bias, const double* w, int64_t c);

}  // namespace pddm_ext::cpu::vec

namespace pddm_ext::cpu::vec {

// Backward of the score layer for one pair with upstream gradient g, in place: q (the pre-bias
// activations) becomes dq[j] = g w[j] [q[j] + bias[j] > 0]; dw[j] += g relu(q[j] + bias[j]);
// dbias[j] += dq[j].
void score_layer_backward(float* q, const float* bias, const float* w, float g, float* dw, float* dbias, int64_t c);
void score_layer_backward(double* q, const double* bias, const double* w, double g, double* dw, double* dbias,
                          int64_t c);

// Backward of the two branches of one pair, z = [z_u; z_v] = [normalize(relu(pre_u)); normalize(relu(pre_v))]
// with pre_u = A scale_u + b_u and pre_v = (Pa + Pb) scale_v + b_v, given dz (2h) and the norms
// ||relu(pre_u)||, ||relu(pre_v)||. Overwrites A with dA = dpre_u scale_u; adds dpre_v scale_v to out_x and to
// out_y (which may be the same row: a diagonal pair in batch mode); db_u += dpre_u, db_v += dpre_v.
// *dscale_u = sum_k dpre_u[k] A[k], *dscale_v = sum_k dpre_v[k] (Pa[k] + Pb[k]): the gradients with
// respect to the scales.
void branches_backward(const float* z, const float* dz, float norm_u1, float norm_v1, float* A, float scale_u,
                       const float* Pa, const float* Pb, float scale_v, float* db_u, float* db_v, float* out_x,
                       float* out_y, int64_t h, float* dscale_u, float* dscale_v);
void branches_backward(const double* z, const double* dz, double norm_u1, double norm_v1, double* A,
                       double scale_u, const double* Pa, const double* Pb, double scale_v, double* db_u,
                       double* db_v, double* out_x, double* out_y, int64_t h, double* dscale_u, double* dscale_v);

// dx[k] += sign(x - y) (dU[k] + cu |x - y|) + cv (x + y); dy[k] += -sign(x - y) (...) + cv (x + y).
// dx and dy may be the same row (a diagonal pair in batch mode); either may be null (not needed).
void input_grad(const float* x, const float* y, const float* dU, float cu, float cv, float* dx, float* dy,
                int64_t d);
void input_grad(const double* x, const double* y, const double* dU, double cu, double cv, double* dx, double* dy,
                int64_t d);

}  // namespace pddm_ext::cpu::vec
