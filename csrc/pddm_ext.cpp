// The op schemas of pddm_ext (declared once here; each backend registers its kernels in its own
// file with TORCH_LIBRARY_IMPL) and the Python module that `import pddm_ext._C` loads.
//
// Validation (docs/design.md#errors, with its messages and the NaN/Inf checks) happens at the Python boundary;
// every kernel also runs the O(1) structural checks of op_checks.h first, so that calling
// torch.ops.pddm_ext.* directly with bad shapes raises instead of reading out of bounds.
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/tile_shapes.h"
#include "cuda/smem_layout.h"
#ifndef PDDM_EXT_NO_PYTHON  // CMakeLists.txt builds a plain libtorch library: schemas, no Python module
#include <torch/extension.h>
#endif

namespace pddm_ext {
namespace {

// tile_shapes(backend, dtype, d, h, c, m, n) -> [rows, cols of a PDDM tile, rows, cols of a Euclidean
// mining tile]: the tiles the backend's kernels cut the pair space of m queries against n references
// (None: batch mode) into, for dtype inputs and a unit of widths d, h, c. The CPU's depend on all of
// these (csrc/cpu/tile_shapes.h), the CUDA kernels' are constants (csrc/cuda/smem_layout.h, in every
// build: the emulation runs the same tiles). For tests that pick sizes on either side of a tile edge.
std::vector<int64_t> tile_shapes_op(c10::string_view backend, c10::ScalarType dtype, int64_t d, int64_t h, int64_t c,
                                    int64_t m, std::optional<int64_t> n) {
  TORCH_CHECK_VALUE(backend == "cpu" || backend == "cuda",
                    "pddm_ext::tile_shapes: backend must be 'cpu' or 'cuda', got '", backend, "'");
  TORCH_CHECK_VALUE(dtype == c10::kFloat || dtype == c10::kDouble,
                    "pddm_ext::tile_shapes: dtype must be float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(d >= 1 && h >= 1 && c >= 1, "pddm_ext::tile_shapes: d, h and c must be at least 1, got ", d, ", ", h,
                    ", ", c);
  TORCH_CHECK_VALUE(m >= 1 && (!n.has_value() || *n >= 1), "pddm_ext::tile_shapes: m and n must be at least 1, got ",
                    m, ", ", n.has_value() ? *n : m);
  const bool batch = !n.has_value();
  const int64_t refs = batch ? m : *n;
  TileGrid pddm, euclid;
  if (backend == "cpu") {
    pddm = cpu::pddm_grid(batch, m, refs, d, h, c, int64_t(c10::elementSize(dtype)));
    euclid = cpu::euclidean_grid(batch, m, refs);
  } else {
    pddm = TileGrid::make(batch, m, refs, cuda::layout::kTile, cuda::layout::kTile);
    euclid = TileGrid::make(batch, m, refs, cuda::layout::kEuclidTile, cuda::layout::kEuclidTile);
  }
  return {pddm.rows, pddm.cols, euclid.rows, euclid.cols};
}

}  // namespace
}  // namespace pddm_ext

TORCH_LIBRARY(pddm_ext, m) {
  // S[i, r] = PDDM(x_i, y_r) (docs/design.md#the-pddm-unit); y = None means y = x (batch mode, one triangle computed).
  // normalize_inputs: the input-normalised form (true) or the distance-aware form (false) of the unit.
  // product_dtype: None, or float16 / bfloat16 when the float32 x, y and parameters hold half inputs:
  // on a GPU with tensor cores for that type (sm_80+) the tile products round their operands to it
  // and accumulate in float32 (docs/design.md#precision); elsewhere float32. mine_pddm likewise.
  m.def(
      "scores(Tensor x, Tensor? y, Tensor W_u, Tensor b_u, Tensor W_v, Tensor b_v, Tensor W_c, Tensor b_c, "
      "Tensor w_s, Tensor b_s, bool normalize_inputs=True, ScalarType? product_dtype=None) -> Tensor");
  // Fused backward of scores: (grad_x, grad_y, grad_W_u, ..., grad_b_s). output_mask = which of
  // (x, y, parameters) need gradients; the others come back as zeros. grad_y is empty in batch mode.
  // product_dtype: the forward's; on a GPU with tensor cores for it the backward's tile products
  // (the recomputed forward's and the gradient products) round their operands to it, as the forward's.
  m.def(
      "scores_backward(Tensor grad, Tensor x, Tensor? y, Tensor W_u, Tensor b_u, Tensor W_v, Tensor b_v, "
      "Tensor W_c, Tensor b_c, Tensor w_s, Tensor b_s, bool[3] output_mask, bool normalize_inputs=True, "
      "ScalarType? product_dtype=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fused mining (docs/design.md#mining) with the PDDM score. Labels are int64. k: how many of the lowest-scoring
  // positive pairs to return (-1: all, 0: none). Returns (hardest_positive, its score,
  // hardest_negative, its score, hardest_negative_of_ref, its score, pair_i, pair_r, pair_score);
  // an index of -1 means "no candidate" (its score is then meaningless).
  m.def(
      "mine_pddm(Tensor x, Tensor x_labels, Tensor? y, Tensor? y_labels, Tensor W_u, Tensor b_u, Tensor W_v, "
      "Tensor b_v, Tensor W_c, Tensor b_c, Tensor w_s, Tensor b_s, int k, bool normalize_inputs=True, "
      "ScalarType? product_dtype=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same with S = -||x_i - y_r||^2.
  m.def(
      "mine_euclidean(Tensor x, Tensor x_labels, Tensor? y, Tensor? y_labels, int k) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The kernels' tile shapes (tile_shapes_op above): no tensors, one kernel for every dispatch key.
  m.def("tile_shapes(str backend, ScalarType dtype, int d, int h, int c, int m, int? n=None) -> int[]",
        &pddm_ext::tile_shapes_op);
}

#ifndef PDDM_EXT_NO_PYTHON
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "pddm_ext kernels; the ops live in torch.ops.pddm_ext";
#ifdef PDDM_EXT_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
#ifdef PDDM_EXT_CUDA_EMULATION  // make cuda-emulate: the CUDA kernels, run on the CPU (docs/emulation.md)
  module.attr("cuda_emulation") = true;
#else
  module.attr("cuda_emulation") = false;
#endif
}
#endif

// Mining returns indices and is not differentiable (docs/design.md#mining): the ops pass straight through the
// autograd layer, so their outputs never require grad, whatever their inputs do.
TORCH_LIBRARY_IMPL(pddm_ext, Autograd, m) {
  m.impl("mine_pddm", torch::CppFunction::makeFallthrough());
  m.impl("mine_euclidean", torch::CppFunction::makeFallthrough());
}
