// Structural checks of the ops' arguments, run by every backend's kernel before it touches memory.
//
// The Python API validates everything docs/design.md#errors lists (including NaN/Inf) with its own messages;
// these O(1) checks are for callers of torch.ops.pddm_ext.* directly, so that no argument can make
// a kernel read or write out of bounds: ranks, matching sizes, one dtype, one device, int64 labels.
// Shape errors raise ValueError in Python, dtype errors TypeError.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace pddm_ext {

// The mining ops' outputs, in the order of their schema (csrc/pddm_ext.cpp): hardest_positive, its
// score, hardest_negative, its score, hardest_negative_of_ref, its score, pair_i, pair_r, pair_score.
using MineResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor>;

inline void check_same_kind(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but x has ", x.scalar_type(), " (all floating inputs share one dtype)");
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// x (m, d) float32/float64 and y (n, d) like it, or None: mine_euclidean checks only these.
inline void check_embeddings(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& y) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) > 0 && x.size(1) > 0, op, ": x must be a non-empty (m, d) matrix, got ",
                    x.sizes());
  if (y.has_value()) {
    check_same_kind(op, "y", *y, x);
    TORCH_CHECK_VALUE(y->dim() == 2 && y->size(0) > 0 && y->size(1) == x.size(1), op,
                      ": y must be a non-empty (n, ", x.size(1), ") matrix like x, got ", y->sizes());
  }
}

// The product_dtype of scores and mine_pddm: None, or float16 / bfloat16 for float32 tensors that
// hold half inputs (their tile products run in that type on GPUs with tensor cores for it,
// docs/design.md#precision; the CPU computes them in float32).
inline void check_product_dtype(const char* op, const std::optional<at::ScalarType>& product_dtype,
                                const at::Tensor& x) {
  if (!product_dtype.has_value()) return;
  TORCH_CHECK_TYPE(*product_dtype == at::kHalf || *product_dtype == at::kBFloat16, op,
                   ": product_dtype must be None, float16 or bfloat16, got ", *product_dtype);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": product_dtype ", *product_dtype,
                   " applies to float32 tensors (half inputs computed in float32), but x has ", x.scalar_type());
}

// x (m, d), y (n, d) or None, and the unit's parameters for d, h = W_u.size(0), c = W_c.size(0).
inline void check_pddm_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& y,
                            const at::Tensor& W_u, const at::Tensor& b_u, const at::Tensor& W_v,
                            const at::Tensor& b_v, const at::Tensor& W_c, const at::Tensor& b_c,
                            const at::Tensor& w_s, const at::Tensor& b_s) {
  check_embeddings(op, x, y);
  TORCH_CHECK_VALUE(W_u.dim() == 2 && W_u.size(0) > 0, op, ": W_u must be an (h, d) matrix, got ", W_u.sizes());
  TORCH_CHECK_VALUE(W_c.dim() == 2 && W_c.size(0) > 0, op, ": W_c must be a (c, 2h) matrix, got ", W_c.sizes());
  const int64_t d = x.size(1), h = W_u.size(0), c = W_c.size(0);
  const std::pair<const char*, const at::Tensor*> params[] = {{"W_u", &W_u}, {"b_u", &b_u}, {"W_v", &W_v},
                                                              {"b_v", &b_v}, {"W_c", &W_c}, {"b_c", &b_c},
                                                              {"w_s", &w_s}, {"b_s", &b_s}};
  for (const auto& [name, t] : params) check_same_kind(op, name, *t, x);
  check_shape(op, "W_u", W_u, {h, d});
  check_shape(op, "b_u", b_u, {h});
  check_shape(op, "W_v", W_v, {h, d});
  check_shape(op, "b_v", b_v, {h});
  check_shape(op, "W_c", W_c, {c, 2 * h});
  check_shape(op, "b_c", b_c, {c});
  check_shape(op, "w_s", w_s, {c});
  TORCH_CHECK_VALUE(b_s.numel() == 1, op, ": b_s must hold one value, got shape ", b_s.sizes());
}

// grad of S: (m, n), n = m in batch mode.
inline void check_scores_grad(const char* op, const at::Tensor& grad, const at::Tensor& x,
                              const std::optional<at::Tensor>& y) {
  check_same_kind(op, "grad", grad, x);
  check_shape(op, "grad", grad, {x.size(0), y.has_value() ? y->size(0) : x.size(0)});
}

// Labels: int64 vectors of one label per row of x (and of y), on x's device; y and y_labels come
// together; k >= -1 (-1: all pairs).
inline void check_mine_args(const char* op, const at::Tensor& x, const at::Tensor& x_labels,
                            const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& y_labels,
                            int64_t k) {
  TORCH_CHECK_VALUE(y.has_value() == y_labels.has_value(), op, ": y and y_labels must be given together");
  const auto check_labels = [&](const char* name, const at::Tensor& labels, int64_t rows) {
    TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", labels.scalar_type());
    TORCH_CHECK_VALUE(labels.device() == x.device(), op, ": ", name, " is on ", labels.device(), " but x is on ",
                      x.device());
    check_shape(op, name, labels, {rows});
  };
  check_labels("x_labels", x_labels, x.size(0));
  if (y_labels.has_value()) check_labels("y_labels", *y_labels, y->size(0));
  TORCH_CHECK_VALUE(k >= -1, op, ": k must be -1 (all pairs) or >= 0, got ", k);
}

}  // namespace pddm_ext
