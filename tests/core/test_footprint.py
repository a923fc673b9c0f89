"""Patch footprints on the 28x28 RGB feature grid (SPEC 5.1, 8.2 step 3, Appendix C.3)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from core.footprint import cells_of_pixels, footprints, patch_footprint, union_cells

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
GRID_FILE = SHARED / "parity" / "grids" / "torus" / "test" / "good" / "npz" / "000.npz"


def _reference_footprint(pix, shift=2):
    """SPEC 5.1 written out with Python lists, including the reference's replacement rule."""
    cells = {(int(p) // 224 // 8) * 28 + (int(p) % 224 // 8) for p in pix}
    shifted = [c + s for s in (shift, -shift, 28 * shift, -28 * shift) for c in cells]
    top = max(shifted)
    shifted = [top if v < 0 else v for v in shifted]      # negatives -> current maximum
    bottom = min(shifted)
    shifted = [bottom if v > 783 else v for v in shifted]  # then > 783 -> current minimum
    return sorted(set(shifted))


def test_appendix_c3_case():
    pix = np.array([0, 216, 50175])
    np.testing.assert_array_equal(cells_of_pixels(pix), [0, 27, 783])
    expected = [2, 25, 29, 56, 83, 727, 781]
    out = patch_footprint(pix)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(patch_footprint(torch.tensor(pix)).numpy(), expected)
    assert _reference_footprint(pix) == expected


def test_row_wrap_and_cell_itself_not_included():
    # cells (3, 26) and (3, 27): +2 wraps to row 4 columns 0 and 1; -2 stays in row 3
    pix = np.array([(3 * 8) * 224 + 26 * 8, (3 * 8 + 7) * 224 + 27 * 8 + 7])
    assert sorted(cells_of_pixels(pix).tolist()) == [3 * 28 + 26, 3 * 28 + 27]
    out = patch_footprint(pix).tolist()
    assert out == sorted([4 * 28 + 0, 4 * 28 + 1, 3 * 28 + 24, 3 * 28 + 25,
                          5 * 28 + 26, 5 * 28 + 27, 1 * 28 + 26, 1 * 28 + 27])
    assert 3 * 28 + 26 not in out
    # cells (5, 0) and (5, 1): -2 wraps to the previous row, (4, 26) and (4, 27)
    pix = np.array([(5 * 8) * 224 + 0, (5 * 8) * 224 + 8])
    out = patch_footprint(pix).tolist()
    assert 4 * 28 + 26 in out and 4 * 28 + 27 in out
    # a cell reached by a shift of another member is included: (0, 0) and (0, 2)
    out = patch_footprint(np.array([0, 16])).tolist()
    assert out == [0, 2, 4, 56, 58]


def test_range_clipping_at_both_ends():
    out = patch_footprint(np.array([0])).tolist()            # cell 0: -2, -56 dropped
    assert out == [2, 56]
    out = patch_footprint(np.array([224 * 224 - 1])).tolist()  # cell 783: +2, +56 dropped
    assert out == [727, 781]


def test_vectorised_equals_per_patch_sets():
    rng = np.random.default_rng(0)
    # mixture of compact patches (like real ones) and scattered ones touching the borders
    centres = rng.integers(0, 224, size=(150, 2))
    offs = rng.integers(-12, 13, size=(150, 500, 2))
    rc = np.clip(centres[:, None] + offs, 0, 223)
    compact = rc[..., 0] * 224 + rc[..., 1]
    scattered = rng.integers(0, 224 * 224, size=(50, 500))
    pix = np.concatenate([compact, scattered])
    indptr, cells = footprints(pix)
    assert indptr.dtype == np.int64 and cells.dtype == np.int64 and indptr.shape == (201,)
    for g in range(len(pix)):
        assert cells[indptr[g]:indptr[g + 1]].tolist() == _reference_footprint(pix[g])
    t_indptr, t_cells = footprints(torch.from_numpy(pix))
    np.testing.assert_array_equal(t_indptr.numpy(), indptr)
    np.testing.assert_array_equal(t_cells.numpy(), cells)


def test_parity_grid_and_union():
    pix = np.load(GRID_FILE)["points_idx"]
    indptr, cells = footprints(pix)
    for g in (0, 17, len(pix) - 1):
        assert cells[indptr[g]:indptr[g + 1]].tolist() == _reference_footprint(pix[g])
    rows = np.array([5, 3, 5, 40, 0])
    expected = sorted(set().union(*(_reference_footprint(pix[g]) for g in rows)))
    assert union_cells(indptr, cells, rows).tolist() == expected
    t = union_cells(torch.from_numpy(indptr), torch.from_numpy(cells), torch.from_numpy(rows))
    assert t.tolist() == expected
    # F_test of SPEC 8.2 step 2: union over all patches
    all_rows = np.arange(len(pix))
    assert union_cells(indptr, cells, all_rows).tolist() == sorted(set(cells.tolist()))


def test_union_with_global_offsets_and_empty_selection():
    rng = np.random.default_rng(1)
    pix = rng.integers(0, 224 * 224, size=(6, 500))
    indptr, cells = footprints(pix)
    glob = cells + 784 * np.repeat(np.arange(6) // 2, np.diff(indptr))   # two patches per memory sample
    expected = sorted(set(glob[indptr[1]:indptr[2]]) | set(glob[indptr[4]:indptr[5]]))
    assert union_cells(indptr, glob, [4, 1]).tolist() == expected
    assert union_cells(indptr, glob, []).size == 0


def test_rejects_out_of_range_pixels():
    with pytest.raises(ValueError, match="pixel indices"):
        footprints(np.array([[0, 224 * 224]]))


@pytest.mark.parametrize("shift", [0, 1, 3, 27])
def test_other_footprint_shifts(shift):
    """--footprint_shift s: the same rule with s for 2 (s = 0: the patch's own cells)."""
    rng = np.random.default_rng(shift)
    pix = np.stack([rng.choice(224 * 224, 500, replace=False) for _ in range(6)] + [np.arange(500)])
    indptr, cells = footprints(pix, shift)
    for g in range(len(pix)):
        assert cells[indptr[g]:indptr[g + 1]].tolist() == _reference_footprint(pix[g], shift)
    if shift == 0:
        assert patch_footprint(pix[0], 0).tolist() == sorted(set(cells_of_pixels(pix[0]).tolist()))
    assert not np.array_equal(footprints(pix, shift)[1], footprints(pix, 2)[1])
    with pytest.raises(ValueError, match="shift"):
        footprints(pix, 28)
