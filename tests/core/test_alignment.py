"""RGB-to-SDF alignment statistics (SPEC 7)."""
from __future__ import annotations

import numpy as np
import pytest

from core.alignment import AlignmentError, alignment_from_maps


def _maps(rng, n, scale, zero_share=0.6):
    maps = []
    for _ in range(n):
        m = (rng.gamma(2.0, scale, size=(224, 224))).astype(np.float32)
        m[rng.random((224, 224)) < zero_share] = 0
        maps.append(m)
    return maps


def test_alignment_equals_reference_recipe_and_standardisation():
    rng = np.random.default_rng(0)
    sdf, rgb = _maps(rng, 5, 0.003), _maps(rng, 5, 0.02)
    a = alignment_from_maps(sdf, rgb)

    # the reference's recipe, literally: list of float32 pixels, NumPy mean/std, mean -+ 3 std
    def bounds(maps):
        values = np.array([v for m in maps for v in m.flatten()])
        nz = values[np.nonzero(values)]
        return np.mean(nz) - 3 * np.std(nz), np.mean(nz) + 3 * np.std(nz)

    (sl, su), (rl, ru) = bounds(sdf), bounds(rgb)
    weight = (su - sl) / (ru - rl)
    assert a.weight.dtype == np.float32 and a.weight == weight
    assert a.bias == sl - weight * rl

    # algebraically: weight = sigma_sdf / sigma_rgb, bias = mu_sdf - weight mu_rgb (float64, non-zero only)
    s = np.concatenate([m[m != 0] for m in sdf]).astype(np.float64)
    r = np.concatenate([m[m != 0] for m in rgb]).astype(np.float64)
    assert a.weight == pytest.approx(s.std() / r.std(), rel=1e-5)
    assert a.bias == pytest.approx(s.mean() - s.std() / r.std() * r.mean(), rel=1e-4)
    assert a.n_samples == 5


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_other_sigma_factor(sigma):
    """--align_sigma k: bounds mean -+ k std in float32; weight and bias agree with k = 3 up to
    float32 rounding (the factor cancels) but are computed from other bounds."""
    rng = np.random.default_rng(4)
    sdf, rgb = _maps(rng, 4, 0.003), _maps(rng, 4, 0.02)
    a, a3 = alignment_from_maps(sdf, rgb, sigma), alignment_from_maps(sdf, rgb)
    flat = [np.concatenate([m.ravel() for m in maps]) for maps in (sdf, rgb)]
    (s_mean, s_std), (r_mean, r_std) = [(np.mean(v[v != 0]), np.std(v[v != 0])) for v in flat]
    s_lo, s_hi, r_lo, r_hi = s_mean - sigma * s_std, s_mean + sigma * s_std, r_mean - sigma * r_std, r_mean + sigma * r_std
    weight = (s_hi - s_lo) / (r_hi - r_lo)
    assert a.weight == weight and a.bias == s_lo - weight * r_lo
    assert a.sigma == sigma and a3.sigma == 3
    assert a.weight == pytest.approx(a3.weight, rel=1e-5) and a.bias == pytest.approx(a3.bias, rel=1e-3)


def test_zeros_are_ignored():
    rng = np.random.default_rng(1)
    sdf, rgb = _maps(rng, 2, 0.003), _maps(rng, 2, 0.02)
    padded = alignment_from_maps(sdf + [np.zeros((224, 224), np.float32)], rgb + [np.zeros((224, 224), np.float32)])
    plain = alignment_from_maps(sdf, rgb)
    assert padded.weight == plain.weight and padded.bias == plain.bias


def test_degenerate_inputs_raise():
    rng = np.random.default_rng(2)
    sdf = _maps(rng, 2, 0.003)
    with pytest.raises(AlignmentError, match="zero"):
        alignment_from_maps(sdf, [np.zeros((224, 224), np.float32)] * 2)
    with pytest.raises(AlignmentError, match="constant"):
        alignment_from_maps(sdf, [np.full((224, 224), 0.5, np.float32)] * 2)
    with pytest.raises(ValueError, match="same positive number"):
        alignment_from_maps(sdf, sdf[:1])
