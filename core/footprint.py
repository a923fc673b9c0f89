"""RGB-feature footprints of point patches (SPEC 5.1, 6, 8.2 step 2-3, 12.2).

A patch's 500 pixel indices ``p`` (row-major in the 224x224 grid) fall into the cells
``q = (p // 224 // 8)·28 + (p % 224 // 8)`` of the 28x28 RGB feature map. The reference's
``get_relative_rgb_f_indices`` returns the *shifted* set ``(F+2) ∪ (F−2) ∪ (F+56) ∪ (F−56)``
of the patch's cells ``F`` on flat indices (so a ±2 column shift wraps to the neighbouring
row), clipped to ``[0, 783]``; ``F`` itself is not included unless a shift reaches it (KEEP).
``main.py --footprint_shift s`` replaces the 2 by ``s`` (shifts ``±s`` and ``±28 s``); ``s = 0``
makes the footprint the patch's own cells ``F``.

:func:`footprints` computes that set for every patch at once and stores the result in CSR
form (``indptr``, ``cells``): patch ``g`` owns ``cells[indptr[g]:indptr[g+1]]``, sorted.
Every public function accepts NumPy arrays or torch tensors (any device) and returns the same
type; NumPy input is computed through torch on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from core.dataset import IMAGE_SIZE

__all__ = ["GRID", "CELL", "FEATURE_SIDE", "N_CELLS", "SHIFT", "SHIFTS",
           "cells_of_pixels", "flat_shifts", "patch_footprint", "footprints", "union_cells"]

GRID = IMAGE_SIZE               # side of the pixel grid (224)
CELL = 8                        # pixels per feature cell along each axis
FEATURE_SIDE = GRID // CELL     # 28
N_CELLS = FEATURE_SIDE ** 2     # 784
SHIFT = 2                       # footprint shift in cells (SPEC 5.1 step 2)


def flat_shifts(shift: int = SHIFT) -> tuple[int, int, int, int]:
    """The flat-index shifts ``(s, -s, 28 s, -28 s)`` of a footprint shift of ``s`` cells."""
    if not 0 <= shift < FEATURE_SIDE:
        raise ValueError(f"footprint shift must lie in [0, {FEATURE_SIDE - 1}] cells, got {shift}")
    return (shift, -shift, shift * FEATURE_SIDE, -shift * FEATURE_SIDE)


SHIFTS = flat_shifts(SHIFT)     # (2, -2, 56, -56)


def cells_of_pixels(pix):
    """Feature cell ``q = (p // 224 // 8)·28 + (p % 224 // 8)`` of each flat pixel index ``p``."""
    return (pix // GRID // CELL) * FEATURE_SIDE + (pix % GRID // CELL)


def _shifted(onehot, shift: int = SHIFT):
    """Rows of a (G, 784) boolean cell indicator -> indicator of the shifted, clipped sets."""
    out = torch.zeros_like(onehot)
    for s in flat_shifts(shift):
        if s == 0:
            out |= onehot
        elif s > 0:
            out[:, s:] |= onehot[:, :-s]   # cell q reached from q - s
        else:
            out[:, :s] |= onehot[:, -s:]   # cell q reached from q + |s|
    return out


def footprints(points_idx, shift: int = SHIFT):
    """CSR footprints of all patches: ``(indptr (G+1,), cells (M,))``, int64, cells sorted per patch.

    ``points_idx`` is (G, P) (or (P,) for one patch) of flat pixel indices in the 224x224 grid;
    ``shift`` the footprint shift in cells (the reference's 2).
    """
    if not isinstance(points_idx, torch.Tensor):
        return tuple(t.numpy() for t in footprints(torch.as_tensor(np.ascontiguousarray(points_idx)), shift))
    idx = points_idx
    if idx.ndim == 1:
        idx = idx[None]
    if idx.ndim != 2:
        raise ValueError(f"expected pixel indices of shape (G, P), got {tuple(idx.shape)}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= GRID * GRID:
            raise ValueError(f"pixel indices must lie in [0, {GRID * GRID - 1}], got range [{lo}, {hi}]")
    G = idx.shape[0]
    idx = idx.long()
    onehot = torch.zeros(G, N_CELLS, dtype=torch.bool, device=idx.device)
    onehot.scatter_(1, cells_of_pixels(idx), True)
    rows, cells = _shifted(onehot, shift).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=G)
    indptr = torch.zeros(G + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(counts, 0, out=indptr[1:])
    return indptr, cells


def patch_footprint(pix, shift: int = SHIFT):
    """Sorted shifted cell set of one patch (SPEC 5.1); ``pix`` is its (P,) pixel indices."""
    _, cells = footprints(pix, shift)
    return cells


def union_cells(indptr, cells, rows):
    """Sorted unique union of the footprints of patches ``rows`` (SPEC 8.2 step 3).

    Works for any CSR cell table, e.g. one whose cells are offset into a global memory.
    """
    if not isinstance(cells, torch.Tensor):
        return union_cells(torch.as_tensor(np.asarray(indptr)), torch.as_tensor(np.asarray(cells)),
                           np.asarray(rows, dtype=np.int64)).numpy()
    rows = torch.as_tensor(rows, dtype=torch.long, device=cells.device).reshape(-1)
    starts, ends = indptr[rows], indptr[rows + 1]
    lens = ends - starts
    # entry positions: start of each selected segment plus the offset inside it
    seg_start = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
    pos = seg_start + torch.arange(int(lens.sum()), device=cells.device)
    return torch.unique(cells[pos], sorted=True)
