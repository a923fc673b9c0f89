"""The reference's "KNNGaussianBlur(4)": 8-bit quantisation + Pillow Gaussian blur (SPEC 8.5).

Despite its name the reference blur has nothing to do with kNN. A score map ``m`` is
normalised by its own maximum ``M``, quantised to 8 bits exactly as torchvision's
``ToPILImage`` does (``trunc(m / M * 255)``), blurred with Pillow's
``ImageFilter.GaussianBlur(radius=4)`` and scaled back (``u8 / 255 * M`` in float32).
The quantisation creates many exact ties and zeros that the metrics see (SPEC 11 #27,
KEEP), so it is reproduced bit for bit rather than replaced by a float Gaussian.
``main.py --blur_radius R`` passes another radius to the same Pillow filter (4 is the
paper's; 0 quantises without blurring).

:func:`extended_box_blur_u8` is a NumPy fixed-point emulation of Pillow's extended box
blur for any radius; it exists to document and test the algorithm (it equals Pillow bit
for bit) and to blur a whole stack of 8-bit maps at once. :func:`level_difference_bound` uses the same
passes to bound how far two blurred maps can differ given how far their 8-bit inputs differ:
the tolerance of every comparison of blurred maps across CPUs (whose float kernels move
a pixel across a level boundary here and there).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

BLUR_RADIUS = 4  # ImageFilter.GaussianBlur(radius=4)
_PASSES = 3  # Pillow splits the Gaussian into three box-blur passes per axis


def box_weights(radius: float = BLUR_RADIUS) -> tuple[int, int, int]:
    """``(l, ww, fw)``: Pillow's fixed-point box of ``GaussianBlur(radius)`` (SPEC 8.5).

    The Gaussian's variance is split over three passes, ``sigma2 = radius**2 / 3``; the box
    "radius" is ``r = l + a`` with ``l = floor((sqrt(12 sigma2 + 1) - 1) / 2)`` and
    ``a = (2l + 1)(l(l + 1) - 3 sigma2) / (6 (sigma2 - (l + 1)**2))``, all in float32 as
    Pillow's C code; the ``2l + 1`` inner taps weigh ``ww = trunc(2**24 / (2r + 1))`` and the
    two outer taps (distance ``l + 1``) ``fw = (2**24 - (2l + 1) ww) // 2``, in 8.24 fixed
    point. For radius 4: ``r = 3.4375``, ``(3, 2130440, 932068)``.
    """
    f = np.float32
    sigma2 = f(radius) * f(radius) / f(_PASSES)
    big_l = f(np.sqrt(12.0 * float(sigma2) + 1.0))
    low = f(np.floor((float(big_l) - 1.0) / 2.0))
    a = (f(2) * low + f(1)) * (low * (low + f(1)) - f(3) * sigma2)
    a = a / (f(6) * (sigma2 - (low + f(1)) * (low + f(1))))
    r = f(low + a)
    inner = int(r)
    ww = int(f(1 << 24) / (r * f(2) + f(1)))
    return inner, ww, ((1 << 24) - (2 * inner + 1) * ww) // 2


def quantize_u8(m: np.ndarray) -> np.ndarray:
    """``trunc((m / max(m)) * 255)`` as uint8, in ``m``'s own dtype (torchvision ``ToPILImage``).

    Divide first, then multiply, exactly as ``tensor.div(M).mul(255).byte()``; a map
    whose maximum is 0 quantises to all zeros (the reference would compute 0/0).
    """
    m = np.asarray(m)
    if not np.issubdtype(m.dtype, np.floating):
        raise TypeError(f"expected a floating-point score map, got dtype {m.dtype}")
    peak = m.max()
    if not np.isfinite(peak):
        raise ValueError("score map contains non-finite values; cannot blur it")
    if m.min() < 0:
        raise ValueError("score map has negative values; the 8-bit blur needs scores >= 0")
    if not peak > 0:
        return np.zeros(m.shape, dtype=np.uint8)
    return ((m / peak) * 255).astype(np.uint8)


def blur_map(m: np.ndarray, radius: float = BLUR_RADIUS) -> np.ndarray:
    """Blur one (H, W) score map the reference way (SPEC 8.5); returns float32 (H, W).

    ``m`` is float32 or float64 with values >= 0; quantisation runs in its dtype (the
    reference blurs the SDF and fused maps in float64, the RGB maps in float32).
    ``radius`` is Pillow's ``GaussianBlur`` radius (the reference's 4).
    """
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"blur_map expects an (H, W) map, got shape {m.shape}")
    levels = blurred_levels(m, radius)    # checks the values
    peak = np.float32(m.max())
    if not peak > 0:
        return np.zeros(m.shape, dtype=np.float32)
    # torchvision ToTensor: uint8 -> float32 / 255; then "* map_max" in float32.
    return (levels.astype(np.float32) / np.float32(255)) * peak


def blurred_levels(m: np.ndarray, radius: float = BLUR_RADIUS) -> np.ndarray:
    """The 8-bit image inside :func:`blur_map`: Pillow's blur of :func:`quantize_u8` of ``m`` (uint8).

    ``blur_map(m) == blurred_levels(m) / 255 * max(m)`` in float32; comparing these integer
    levels separates the blur from the float scale factor.
    """
    u8 = quantize_u8(np.asarray(m))
    return np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(radius=radius)))


def blur_maps(maps: np.ndarray, radius: float = BLUR_RADIUS) -> np.ndarray:
    """:func:`blur_map` applied to every map of a (T, H, W) stack; returns float32 (T, H, W)."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"blur_maps expects a (T, H, W) stack, got shape {maps.shape}")
    out = np.empty(maps.shape, dtype=np.float32)
    for i, m in enumerate(maps):
        out[i] = blur_map(m, radius)
    return out


def _box_pass(u: np.ndarray, axis: int, low: int, ww: int, fw: int, offset: int = 1 << 23) -> np.ndarray:
    """One 1-D extended-box pass of Pillow along ``axis`` (edge pixels replicated), int64 out.

    ``offset`` 2**23 rounds to nearest (Pillow); 2**24 - 1 rounds up (:func:`level_difference_bound`).
    """
    pad = low + 1
    width = [(0, 0)] * u.ndim
    width[axis] = (pad, pad)
    p = np.pad(u.astype(np.int64), width, mode="edge")
    n = u.shape[axis]
    csum = np.cumsum(p, axis=axis)
    zero = np.zeros_like(np.take(csum, [0], axis=axis))
    csum = np.concatenate([zero, csum], axis=axis)
    # inner sum over in[x-l .. x+l] for output x: padded indices x+1 .. x+2l+1
    inner = np.take(csum, np.arange(n) + 2 * low + 2, axis=axis) - np.take(csum, np.arange(n) + 1, axis=axis)
    outer = np.take(p, np.arange(n), axis=axis) + np.take(p, np.arange(n) + 2 * pad, axis=axis)
    return (inner * ww + outer * fw + offset) >> 24


def extended_box_blur_u8(u8: np.ndarray, radius: float = BLUR_RADIUS) -> np.ndarray:
    """NumPy fixed-point emulation of Pillow's ``GaussianBlur(radius)`` on 8-bit images (SPEC 8.5).

    ``u8`` is uint8 with shape (..., H, W). With ``(l, ww, fw)`` of :func:`box_weights`:
    three horizontal passes then three vertical passes; each pass computes
    ``(ww * sum(in[x-l..x+l]) + fw * (in[x-l-1] + in[x+l+1]) + 2**23) >> 24`` with edge
    replication and stores uint8 (radius 4: l = 3). Radius 0 leaves the image as it is,
    as Pillow does. Equal to Pillow bit for bit.
    """
    u = np.asarray(u8)
    if u.dtype != np.uint8 or u.ndim < 2:
        raise ValueError(f"expected a uint8 array of shape (..., H, W), got {u.dtype} {u.shape}")
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    if radius == 0:
        return u.copy()
    low, ww, fw = box_weights(radius)
    for axis in (-1, -2):
        for _ in range(_PASSES):
            u = _box_pass(u, axis % u.ndim, low, ww, fw)
    return u.astype(np.uint8)


def level_difference_bound(q_a: np.ndarray, q_b: np.ndarray, radius: float = BLUR_RADIUS) -> np.ndarray:
    """Per pixel, an upper bound of ``|blur(q_a) - blur(q_b)|`` in levels for two 8-bit images
    (same shape (..., H, W)) blurred as :func:`extended_box_blur_u8` / Pillow do.

    Each pass ``P`` has non-negative integer weights summing to 2**24, so it is monotone and
    ``P(x + c) = P(x) + c`` for an integer constant ``c``; and for ``e >= 0``,
    ``P(x + e) <= P(x) + ceil(K e)`` (``floor(s + t) <= floor(s) + ceil(t)``, ``K`` the pass's
    real-valued kernel). Writing ``q_a <= q_b + t + e`` with ``e = max(|q_a - q_b| - t, 0)``
    and composing the six passes gives ``|blur(q_a) - blur(q_b)| <= t + ceil-propagated e``
    for every integer ``t >= 0``. The result is the minimum of that bound over
    ``t = 0 ... max|q_a - q_b|`` (``t = 0``: pixels far from every changed input pixel are
    equal; ``t = max``: the blur never increases the largest difference).
    """
    diff = np.abs(np.asarray(q_a, dtype=np.int64) - np.asarray(q_b, dtype=np.int64))
    if radius == 0:
        return diff
    low, ww, fw = box_weights(radius)
    best = None
    for t in range(int(diff.max(initial=0)) + 1):
        e = np.maximum(diff - t, 0)
        for axis in (-1, -2):
            for _ in range(_PASSES):
                e = _box_pass(e, axis % e.ndim, low, ww, fw, offset=(1 << 24) - 1)
        bound = e + t
        best = bound if best is None else np.minimum(best, bound)
    return best
