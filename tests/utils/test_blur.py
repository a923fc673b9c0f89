"""Tests for utils/blur.py: the reference's 8-bit Pillow blur (SPEC 8.5, Appendix C.1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from utils.blur import (blur_map, blur_maps, blurred_levels, box_weights, extended_box_blur_u8,
                        level_difference_bound, quantize_u8)


def pillow_blur(u8: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(radius=4)))


def reference_blur(m: np.ndarray) -> np.ndarray:
    """The reference KNNGaussianBlur, written with torch + torchvision as the authors do."""
    t = torch.from_numpy(m)[None]
    peak = t.max()
    img = transforms.ToPILImage()(t[0] / peak).filter(ImageFilter.GaussianBlur(radius=4))
    return (transforms.ToTensor()(img) * peak)[0].numpy()


@pytest.mark.parametrize("shape", [(224, 224), (1, 1), (2, 3), (3, 2), (5, 5), (7, 13), (9, 9), (31, 17), (100, 57)])
def test_emulation_equals_pillow_bit_for_bit(shape):
    rng = np.random.default_rng(sum(shape))
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8),
        (rng.random(shape) < 0.03).astype(np.uint8) * 255,  # isolated peaks: the widest kernel response
        np.full(shape, 255, dtype=np.uint8),
        np.minimum(np.arange(shape[0] * shape[1]).reshape(shape), 255).astype(np.uint8),
    ]
    for u in images:
        np.testing.assert_array_equal(extended_box_blur_u8(u), pillow_blur(u))


@pytest.mark.parametrize("radius", [0, 0.5, 1, 2, 2.5, 3, 6, 10.5])
def test_emulation_equals_pillow_for_other_radii(radius):
    """--blur_radius: the emulation, written from Pillow's algorithm, equals Pillow's GaussianBlur."""
    rng = np.random.default_rng(int(radius * 10))
    for shape in ((224, 224), (7, 13), (2, 3)):
        for u in (rng.integers(0, 256, shape, dtype=np.uint8), (rng.random(shape) < 0.03).astype(np.uint8) * 255):
            ref = np.asarray(Image.fromarray(u).filter(ImageFilter.GaussianBlur(radius=radius)))
            np.testing.assert_array_equal(extended_box_blur_u8(u, radius), ref)


def test_blur_radius_sets_the_kernel_width():
    """An impulse spreads over at most 3 (l + 1) pixels each side (three boxes of 2l + 3 taps; the
    outermost, fractional taps may round to 0), so the kernel widens with the radius; radius 4 is
    the documented box (l 3, ww 2130440, fw 932068); blur_map passes its radius to Pillow."""
    assert box_weights(4) == (3, 2130440, 932068)
    widths = []
    impulse = np.zeros((101, 101))
    impulse[50, 50] = 1.0
    for radius in (1, 2, 4, 7):
        out = blur_map(impulse, radius)
        low = box_weights(radius)[0]
        half = 50 - np.flatnonzero(out[50]).min()
        assert 0 < half <= 3 * (low + 1), (radius, low, half)
        ref = np.asarray(Image.fromarray(quantize_u8(impulse)).filter(ImageFilter.GaussianBlur(radius)))
        np.testing.assert_array_equal(out, ref.astype(np.float32) / np.float32(255))
        widths.append(half)
    assert widths == sorted(set(widths)), widths
    np.testing.assert_array_equal(blur_map(impulse, 0), impulse.astype(np.float32))   # radius 0: quantised only


def test_emulation_on_a_stack_equals_per_image():
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (3, 40, 33), dtype=np.uint8)
    out = extended_box_blur_u8(stack)
    for u, o in zip(stack, out):
        np.testing.assert_array_equal(o, pillow_blur(u))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantisation_matches_torchvision(dtype):
    rng = np.random.default_rng(1)
    m = (rng.random((64, 256)) ** 3).astype(dtype)
    # values exactly on and next to the level boundaries k * M / 255
    m[0, :256] = (np.arange(256) / 255 * m.max()).astype(dtype)
    m[1, :256] = np.nextafter(m[0, :256], dtype(0))
    expected_mul = torch.from_numpy(m / m.max()).mul(255).byte().numpy()
    expected_pil = np.asarray(transforms.ToPILImage()(torch.from_numpy(m)[None] / torch.from_numpy(m).max()))
    np.testing.assert_array_equal(quantize_u8(m), expected_mul)
    np.testing.assert_array_equal(quantize_u8(m), expected_pil)
    assert quantize_u8(m).max() == 255


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blur_map_equals_reference_blur(dtype):
    rng = np.random.default_rng(2)
    m = np.zeros((224, 224), dtype=dtype)
    m[40:120, 60:200] = rng.random((80, 140)) * 3.7
    out = blur_map(m)
    assert out.dtype == np.float32 and out.shape == m.shape
    np.testing.assert_array_equal(out, reference_blur(m))
    np.testing.assert_array_equal(blur_maps(np.stack([m, m * 2])), np.stack([out, reference_blur(m * 2)]))


def test_quantisation_dtype_matters():
    """The same values quantise differently in float32 and float64, so callers must keep the dtype."""
    m = np.append((np.arange(1, 255) - 1e-9) / 255, 1.0)  # just below every level in float64
    q64, q32 = quantize_u8(m[None]), quantize_u8(m[None].astype(np.float32))
    np.testing.assert_array_equal(q64[0, :-1], np.arange(0, 254))
    assert (q32 != q64).sum() > 100


def test_zero_map_and_bad_input():
    out = blur_map(np.zeros((10, 12), dtype=np.float64))
    assert out.dtype == np.float32 and not out.any() and np.isfinite(out).all()
    with pytest.raises(ValueError, match="non-finite"):
        blur_map(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="negative"):
        blur_map(np.array([[1.0, -0.5]]))
    with pytest.raises(ValueError):
        blur_map(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError):
        quantize_u8(np.zeros((2, 2), dtype=np.uint8))


def test_parity_with_reference_maps(parity_dir):
    """Blurring the reference's unblurred maps reproduces its recorded maps bit for bit.

    Dtypes, as found here: the SDF raw map is float64 in the reference (stored as float32
    without loss); the RGB map and the aligned map A are float32, with A = clip(rgb * w + b, 0)
    computed in float32 (w, b cast to float32, as torch does for a float32 tensor times a
    Python scalar); the fused map max(A, sdf) is float64 (torch promotes to the SDF map's dtype).
    """
    expected = np.load(parity_dir / "expected" / "torus" / "predictions.npz")
    inter = np.load(parity_dir / "expected" / "torus" / "intermediates.npz")
    sdf_raw = inter["sdf_map_raw"].astype(np.float64)
    rgb_raw = inter["rgb_map_224_raw_check"]
    w, b = float(expected["align_weight"]), float(expected["align_bias"])

    np.testing.assert_array_equal(blur_maps(sdf_raw), expected["sdf_map"])
    np.testing.assert_array_equal(blur_maps(rgb_raw), expected["rgb_map"])

    aligned = np.maximum(rgb_raw * np.float32(w) + np.float32(b), np.float32(0))
    assert aligned.dtype == np.float32
    np.testing.assert_array_equal(blur_maps(aligned), expected["new_rgb_map"])
    fused = np.maximum(aligned.astype(np.float64), sdf_raw)
    np.testing.assert_array_equal(blur_maps(fused), expected["pixel_map"])

    # The float64 alternative for A does not reproduce the reference: the dtype is not cosmetic.
    aligned64 = np.maximum(rgb_raw.astype(np.float64) * w + b, 0.0)
    assert not np.array_equal(blur_maps(aligned64), expected["new_rgb_map"])


def test_blurred_levels_are_the_integer_image_of_blur_map():
    m = (np.random.default_rng(5).random((40, 50)) ** 2).astype(np.float32)
    levels = blurred_levels(m)
    assert levels.dtype == np.uint8
    np.testing.assert_array_equal(levels, pillow_blur(quantize_u8(m)))
    np.testing.assert_array_equal(blur_map(m), levels.astype(np.float32) / np.float32(255) * m.max())


def _perturbed(rng, base, flips, spikes):
    """``base`` with ``flips`` pixels moved by one level and ``spikes`` pixels by up to 200 levels,
    all in its top-left 48 x 40 quarter."""
    q = base.astype(np.int64)
    for n, size in ((flips, 1), (spikes, 200)):
        r, c = rng.integers(0, 48, n), rng.integers(0, 40, n)
        q[r, c] += rng.choice([-1, 1], n) * rng.integers(1, size + 1, n)
    return np.clip(q, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", range(4))
def test_level_difference_bound_holds_and_is_zero_far_from_changes(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :80]
    base = (120 + 100 * np.sin(yy / (5 + seed)) * np.cos(xx / 7)).astype(np.uint8)   # smooth, all levels
    q = _perturbed(rng, base, flips=[3, 40, 400, 1500][seed], spikes=[1, 0, 3, 1][seed])
    actual = np.abs(pillow_blur(q).astype(np.int64) - pillow_blur(base))
    bound = level_difference_bound(q, base)
    assert (actual <= bound).all() and actual.max() >= 1
    # six box passes of radius 4: an input change reaches at most 12 pixels along each axis
    changed = np.argwhere(q != base)
    far = np.ones(q.shape, bool)
    for r, c in changed:
        far[max(r - 12, 0):r + 13, max(c - 12, 0):c + 13] = False
    assert far.any() and not bound[far].any()
    if seed == 1:   # few isolated spikes or flips: far below the largest input difference
        assert bound.max() < np.abs(q.astype(int) - base).max() or bound.max() <= 1


def test_level_difference_bound_is_tight_for_a_shift_and_damps_a_spike():
    base = np.full((30, 30), 100, np.uint8)
    assert (level_difference_bound(base + 1, base) == 1).all()
    np.testing.assert_array_equal(pillow_blur(base + 1).astype(int) - pillow_blur(base), 1)
    spike = base.copy()
    spike[15, 15] = 255
    actual = np.abs(pillow_blur(spike).astype(int) - pillow_blur(base))
    bound = level_difference_bound(spike, base)
    assert (actual <= bound).all() and 1 <= actual.max() and bound.max() <= 5 < 155
