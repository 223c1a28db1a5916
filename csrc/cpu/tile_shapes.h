// The tile shapes of the CPU kernels: how the pair space (rows of x against rows of y) is cut into
// tiles by the scores forward and backward (scores_cpu.cpp) and by mining (mine_cpu.cpp). This is
// the one place they are chosen: change a CPU tile size here. torch.ops.pddm_ext.tile_shapes
// (csrc/pddm_ext.cpp) reports the same shapes, so that tests can pick sizes on either side of a
// tile edge. (The CUDA kernels' tiles are constants of csrc/cuda/smem_layout.h.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../pddm_common.h"

namespace pddm_ext::cpu {

// Pairs per PDDM tile so that the tile's workspace (|x-y| block and the three activation blocks)
// stays within about half of a typical 1-2 MB L2, while the GEMMs still see a few hundred rows.
constexpr int64_t kTileWorkspaceBytes = 768 * 1024;
constexpr int64_t kMinTilePairs = 16, kMaxTilePairs = 1024;

inline int64_t pddm_tile_pairs(int64_t d, int64_t h, int64_t c, int64_t elem_size) {
  const int64_t bytes_per_pair = (d + 3 * h + c + 8) * elem_size;
  return std::clamp<int64_t>(kTileWorkspaceBytes / bytes_per_pair, kMinTilePairs, kMaxTilePairs);
}

// Pairs per Euclidean mining tile: a Gram tile costs 2d flops a pair, and larger tiles keep the
// GEMM efficient.
constexpr int64_t kEuclideanTilePairs = 128 * 128;

// Square tiles in batch mode (so the triangle is exact); in reference mode, tiles that keep about
// `pairs` pairs even when there are few queries.
inline TileGrid make_grid(bool batch, int64_t m, int64_t n, int64_t pairs) {
  int64_t side = std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(static_cast<double>(pairs))));
  if (batch) return TileGrid::make(true, m, m, side, side);
  const int64_t rows = std::min(side, m);
  const int64_t cols = std::max<int64_t>(1, std::min(pairs / rows, n));
  return TileGrid::make(false, m, n, rows, cols);
}

// The tiles of the PDDM scores forward, backward and mining of m queries against n references
// (batch mode: n = m) with a unit of widths d, h, c and elements of elem_size bytes.
inline TileGrid pddm_grid(bool batch, int64_t m, int64_t n, int64_t d, int64_t h, int64_t c, int64_t elem_size) {
  return make_grid(batch, m, n, pddm_tile_pairs(d, h, c, elem_size));
}

// The tiles of Euclidean mining (any dtype, any d).
inline TileGrid euclidean_grid(bool batch, int64_t m, int64_t n) {
  return make_grid(batch, m, n, kEuclideanTilePairs);
}

}  // namespace pddm_ext::cpu
