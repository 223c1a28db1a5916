"""The kernels' tile shapes, for tests that pick sizes on either side of a tile edge (private).

The fused kernels cut the (m, n) pair space into tiles of ``rows x cols`` pairs. Where the shapes are
chosen: csrc/cpu/tile_shapes.h (the CPU; they depend on the dtype, the unit's widths and, in reference
mode, on m and n) and csrc/cuda/smem_layout.h (the CUDA kernels and their emulation: constants).
``torch.ops.pddm_ext.tile_shapes`` reads those same definitions, in every build.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import ops  # noqa: F401  (loads the extension, which registers torch.ops.pddm_ext.tile_shapes)


class TileShapes(NamedTuple):
    """(rows, cols) of the pairs in one tile: ``pddm`` for the PDDM scores forward, backward and
    mining, ``euclidean`` for Euclidean mining. Tiles start at multiples of these from (0, 0); the last
    tile of a row or column is cut at m or n."""

    pddm: Tuple[int, int]
    euclidean: Tuple[int, int]


def tile_shapes(backend: str, dtype: torch.dtype, d: int, h: int, c: int, m: int,
                n: Optional[int] = None) -> TileShapes:
    """The tile shapes the ``backend`` ("cpu", or "cuda" for the CUDA kernels and the CUDA emulation)
    uses for m queries of ``dtype`` (torch.float32 or torch.float64) against n references (None:
    batch mode, the m rows against themselves) with a PDDM unit of widths d, h, c (the Euclidean tile
    ignores them). ``ValueError`` for another backend or dtype, or sizes below 1."""
    rows, cols, e_rows, e_cols = torch.ops.pddm_ext.tile_shapes(backend, dtype, d, h, c, m, n)
    return TileShapes((rows, cols), (e_rows, e_cols))
