// How many blocks the CUDA backward of the PDDM scores (scores_cuda.cu) runs, and how many columns
// of the pair space one launch walks, from the shapes and the device's SM count only (never from
// free memory: under torch.use_deterministic_algorithms(True) the block count and the column chunks
// fix the order in which the per-block partial sums are added, so they must be the same on every run
// of the same shapes on the same GPU model). docs/design.md#memory-and-speed states the memory this
// costs.
//
// Plain C++ (no CUDA headers), so that the emulation's tests can evaluate it for shapes too large
// to run there (csrc/emulation/emu_selftest.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "smem_layout.h"

namespace pddm_ext::cuda {

// The default budget of the per-block buffers (per-block parameter slabs; deterministic: per-block
// input-gradient slices), all blocks together.
constexpr int64_t kBackwardBudgetBytes = int64_t(256) << 20;

// What the backward's per-block buffers need, per block: `slab_bytes` for its parameter slab (0:
// no parameter gradients), and under deterministic algorithms one slice of the input-side
// gradients, `row_x_bytes` per row of x and `row_y_bytes` per row of y (0: none on that side).
struct BackwardBuffers {
  int64_t slab_bytes = 0, row_x_bytes = 0, row_y_bytes = 0;
};

// The cap of the grid: the per-block buffers of all blocks within `budget` bytes, but never fewer
// blocks than the device has SMs (the buffers then take more than the budget: SM count times the
// per-block size, or, with column chunks, see backward_column_chunk).
inline int64_t backward_block_cap(const BackwardBuffers& b, int64_t m, int64_t n, int64_t sms, int64_t budget) {
  int64_t cap = int64_t(1) << 30;
  if (b.slab_bytes > 0) cap = std::max<int64_t>(sms, budget / b.slab_bytes);
  const int64_t slice_bytes = m * b.row_x_bytes + n * b.row_y_bytes;
  if (slice_bytes > 0) cap = std::min(cap, std::max<int64_t>(sms, budget / slice_bytes));
  return std::max<int64_t>(cap, 1);
}

// Columns (rows of y) per launch in reference mode under deterministic algorithms: all n when the
// `blocks` slices fit the budget; else as many as keep them within it (a multiple of the tile
// width), but at least enough that one launch has a tile for each block. Each launch's y slices are
// summed into its columns' gradients; the x slices and the parameter slabs carry over from launch
// to launch and are summed once at the end. Memory of the slices then: blocks * (m * row_x_bytes +
// chunk * row_y_bytes). Batch mode (one side) and the atomic path (no slices) walk all columns.
inline int64_t backward_column_chunk(const BackwardBuffers& b, bool batch, int64_t m, int64_t n, int64_t blocks,
                                     int64_t budget) {
  if (batch || b.row_y_bytes == 0) return n;
  if (blocks * (m * b.row_x_bytes + n * b.row_y_bytes) <= budget) return n;
  const int64_t tile = layout::kTile;
  const int64_t row_tiles = (m + tile - 1) / tile;
  const int64_t least = tile * ((blocks + row_tiles - 1) / row_tiles);
  const int64_t fit = (budget / blocks - m * b.row_x_bytes) / b.row_y_bytes / tile * tile;
  return std::min(n, std::max(least, fit));
}

}  // namespace pddm_ext::cuda
