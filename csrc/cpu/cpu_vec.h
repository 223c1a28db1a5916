// Per-pair vector loops of the CPU kernels (the non-GEMM part of a tile), built for several x86
// levels and chosen at load time (GCC target_clones), so one binary runs everywhere and uses
// AVX-512 or AVX2 where the CPU has it. Each returns what the caller needs next (a sum).
#pragma once

#include <cstdint>

namespace pddm_ext::cpu::vec {

// C (M x N, row stride N) = A (M x K, row stride lda) * B, with B given as Bt (K x N, row stride ldb),
// i.e. already transposed. Register-blocked for AVX-512 / AVX2 / SSE2, chosen at run time. Every
// element is summed over k in order with the same instructions whatever its row, so identical
// rows of A give bitwise identical rows of C: a pair's score does not depend on where it sits in
// a tile, and exact ties between duplicate rows stay exact (SPEC §3 tie rule). accumulate: C += A B.
void gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb, float* C,
               bool accumulate = false);
void gemm_rows(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bt, int64_t ldb,
               double* C, bool accumulate = false);

// sum_k x[k] y[k].
float dot(const float* x, const float* y, int64_t d);
double dot(const double* x, const double* y, int64_t d);

// C (M x N) += A^T B, with A given as (K x M, row stride lda) and B as Bt (K x N, row stride ldb):
// the parameter-gradient products of the backward (a sum over the pairs of a tile).
void gemm_tn_accumulate(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bt, int64_t ldb,
                        float* C);
void gemm_tn_accumulate(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bt, int64_t ldb,
                        double* C);

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

// Backward of the score layer for one pair with upstream gradient g:
// dq[j] = g w[j] [q[j] + bias[j] > 0]; dw[j] += g relu(q[j] + bias[j]); dbias[j] += dq[j].
void score_layer_backward(const float* q, const float* bias, const float* w, float g, float* dq, float* dw,
                          float* dbias, int64_t c);
void score_layer_backward(const double* q, const double* bias, const double* w, double g, double* dq, double* dw,
                          double* dbias, int64_t c);

// Backward of z = normalize(relu(pre)) given dz, with pre = a * scale + bias when accumulate is false
// (then out_a = dpre * scale), else pre = (a + b) * scale + bias (then out_a and out_b, which may be
// the same row, each get dpre * scale added). Always dbias += dpre. Returns sum_k dpre[k] (a[k] + b[k]): the gradient with respect to scale.
float branch_backward(const float* z, const float* dz, float norm, const float* a, const float* b, float scale,
                      float* dbias, float* out_a, float* out_b, bool accumulate, int64_t h);
double branch_backward(const double* z, const double* dz, double norm, const double* a, const double* b,
                       double scale, double* dbias, double* out_a, double* out_b, bool accumulate, int64_t h);

// dx[k] += sign(x - y) (dU[k] + cu |x - y|) + cv (x + y); dy[k] += -sign(x - y) (...) + cv (x + y).
// dx and dy may be the same row (a diagonal pair in batch mode).
void input_grad(const float* x, const float* y, const float* dU, float cu, float cv, float* dx, float* dy,
                int64_t d);
void input_grad(const double* x, const double* y, const double* dU, double cu, double cv, double* dx, double* dy,
                int64_t d);

}  // namespace pddm_ext::cpu::vec
