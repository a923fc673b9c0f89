"""Synthetic MVTec 3D-AD data set (SPEC section 1 layout), for tests and the offline demo.

Each sample is what a structured-light sensor about 0.4 m away sees of one object lying
on a background plane tilted by 1.5-4 degrees that fills every other pixel:

* ``xyz``: float32 (H, W, 3) organised cloud in metres from a pinhole camera (focal length
  ``3 * min(H, W)`` pixels, so the shorter side sees about 13 cm at every size and the longer
  side proportionally more of the plane); ``x = u * z``, ``y = v * z``. Depth noise is Gaussian, sigma 0.15 mm. Sensor dropouts are stored as
  exactly ``(0, 0, 0)`` (SPEC 1.2): isolated speckles, a few small blobs (on plane and
  object) and about half of the pixels on steep slopes (object silhouettes).
* ``rgb``: uint8 (H, W, 3); a textured object of the class colour on a dark grey plane,
  Lambertian shading, pixel noise.
* ``gt``: uint8 (H, W), 255 on the defect's pixels, 0 elsewhere (all zero for ``good``).

Objects are height fields over the pixel grid (scaled to metres at the plane's depth on
the optical axis): every pixel's ray meets the plane at depth ``z_plane``; an object of
height ``h`` there moves the point ``h`` towards the camera along the same ray
(``z = z_plane - h``). Every object pixel is at least about 6 mm above the plane (rims
are steep walls), every plane pixel is within the noise of it, so the plane removal of
SPEC 2.1 (5 mm) removes exactly the plane pixels. Objects cover about 23-32 % of a square
image and stay clear of the 10-pixel border strips of the plane fit (the tests check it at
160-400 px, square and not). Images need not be square: MVTec 3D-AD samples are not all
square, nor multiples of 100 px, so one class (:data:`DEFAULT_SHAPES`) has such a default.
Three families (:data:`FAMILIES`): ``torus`` (bagel-like), ``disc`` (cookie-like),
``blob`` (potato-like); every MVTec class name maps to one (:data:`CLASSES`), which also
gives its colour. Pose, size, outline, surface lumps and texture vary per sample.

Defects (:data:`DEFECTS`) are placed on the object only, at least 1.5 mm inside its
silhouette, and keep every defect pixel at least 6.5 mm above the plane:

* geometric (``dent``, ``bump``, ``hole``): change the height only (colour changes only
  through shading). ``gt`` is exactly the set of pixels whose height changed; each
  changed by at least 0.6 mm (the profiles end in a step at the rim), four noise sigmas.
* colour (``stain``, ``contamination``): change the albedo only; ``gt`` is exactly the
  set of pixels whose albedo changed. ``xyz`` is bit-identical to the defect-free render.
* combined (``crack``, ``cut``): a groove along a polyline with a different colour.

Determinism: every sample draws from its own generators, seeded from
``(seed, cls, split, defect, index)``, so any sample can be re-rendered alone. A sample
is drawn in three independent streams (shape/texture, sensor, defect); rendering with
``with_defect=False`` skips only the defect, so noise and dropouts are identical and
``xyz`` differs from the defect-free render exactly on the ``gt`` pixels of a geometric
defect (where both are valid) and nowhere for a colour defect. Dropouts follow the
defect-free geometry.

Public API::

    render_sample(cls, split, defect, index, size=None, seed=0, with_defect=True) -> SyntheticSample
    render_scene(...) -> Scene     # the same render before it becomes files (other cameras, lights)
    generate_dataset(out, classes=("bagel", "cookie"), n_train=20, n_val=2, n_test_good=4,
                     n_test_defect=2, size=None, seed=0, defects=DEFAULT_DEFECTS,
                     workers=1, overwrite=False, progress=True) -> Path
    family_of(cls) -> str
    image_shape(size) -> (H, W);  default_shape(cls) -> (H, W)

``size`` is one side (a square image, as before) or ``(H, W)``; ``None`` takes the class's
default (:data:`DEFAULT_SHAPES`, else 400 x 400).

``SyntheticSample.object_mask`` / ``plane_mask`` are the valid (non-dropout) pixels of
the object and of the plane; ``plane`` is the noise-free plane ``(a, b, c, d)`` with unit
normal (``a x + b y + c z + d = 0``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from core.dataset import GOOD, SPLITS
from core.preprocessing import preprocess_arrays
from utils.errors import DataError
from utils.io import write_png, write_text, write_xyz
from utils.pool import ordered_map

# ----------------------------------------------------------------------------- names
FAMILIES = ("torus", "disc", "blob")

#: class name -> (family, base albedo RGB). Family names are classes too.
CLASSES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "bagel": ("torus", (182, 118, 58)),
    "cable_gland": ("torus", (150, 152, 160)),
    "rope": ("torus", (200, 186, 150)),
    "tire": ("torus", (92, 92, 98)),
    "torus": ("torus", (182, 118, 58)),
    "cookie": ("disc", (198, 150, 96)),
    "foam": ("disc", (214, 208, 196)),
    "disc": ("disc", (198, 150, 96)),
    "carrot": ("blob", (232, 122, 44)),
    "dowel": ("blob", (184, 142, 92)),
    "peach": ("blob", (226, 142, 102)),
    "potato": ("blob", (192, 160, 102)),
    "blob": ("blob", (192, 160, 102)),
}

#: defect type -> kind ("geometric", "colour" or "combined").
DEFECTS: dict[str, str] = {
    "dent": "geometric", "bump": "geometric", "hole": "geometric",
    "stain": "colour", "contamination": "colour",
    "crack": "combined", "cut": "combined",
}
DEFAULT_DEFECTS = ("dent", "bump", "stain", "crack")

#: default image size (H, W) of a class; classes not listed are DEFAULT_SIDE x DEFAULT_SIDE.
#: ``rope`` is not square and its sides are no multiples of 100, as some MVTec 3D-AD samples,
#: so preprocessing pads it (to 400 x 400: 35 rows, 15 columns on each side).
DEFAULT_SIDE = 400
DEFAULT_SHAPES: dict[str, tuple[int, int]] = {"rope": (330, 370)}
MIN_SIDE = 64

# ----------------------------------------------------------------------------- scene constants (metres)
NOISE_SIGMA = 1.5e-4          # depth noise
MIN_DEFECT_HEIGHT = 6.5e-3    # every defect pixel stays this high above the plane
DEFECT_MARGIN = 1.5e-3        # defects stay this far inside the object silhouette
RIM_STEP = 0.25               # fraction of a defect's depth that is a step at its rim
_BACKGROUND = np.array([48.0, 48.0, 52.0])
_STAIN_PALETTE = np.array([[40, 90, 200], [40, 160, 60], [200, 40, 40], [240, 240, 240]], float)
_LIGHT = np.array([-0.3, -0.4, 0.866]) / np.linalg.norm([-0.3, -0.4, 0.866])


class SyntheticConfigError(DataError):
    """Unknown class or defect name, or an impossible generator setting."""


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered sample (see the module docstring for the conventions)."""

    xyz: np.ndarray          # (H, W, 3) float32, metres; dropouts exactly (0, 0, 0)
    rgb: np.ndarray          # (H, W, 3) uint8
    gt: np.ndarray           # (H, W) uint8 in {0, 255}
    object_mask: np.ndarray  # (H, W) bool: valid pixels on the object
    plane_mask: np.ndarray   # (H, W) bool: valid pixels on the background plane
    plane: np.ndarray        # (4,) float64: noise-free plane (a, b, c, d), unit normal


def family_of(cls: str) -> str:
    """The object family of a class name; :class:`SyntheticConfigError` for unknown names."""
    if cls not in CLASSES:
        raise SyntheticConfigError(f"unknown class {cls!r}; known classes: {', '.join(sorted(CLASSES))}")
    return CLASSES[cls][0]


def default_shape(cls: str) -> tuple[int, int]:
    """The class's default image size (H, W)."""
    family_of(cls)
    return DEFAULT_SHAPES.get(cls, (DEFAULT_SIDE, DEFAULT_SIDE))


def image_shape(size) -> tuple[int, int]:
    """(H, W) of a ``size`` given as one side (square), ``(side,)`` or ``(H, W)``.

    :class:`SyntheticConfigError` for anything else or a side below :data:`MIN_SIDE`.
    """
    sides = [size] if np.isscalar(size) else list(size)
    if len(sides) not in (1, 2) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                            for v in sides):
        raise SyntheticConfigError(f"size (--size) must be one side or H W, in pixels; got {size!r}")
    h, w = (int(sides[0]), int(sides[-1]))
    if min(h, w) < MIN_SIDE:
        raise SyntheticConfigError(f"size (--size): need image sides >= {MIN_SIDE} px; got {h} x {w}")
    return h, w


def _check_defect(defect: str) -> None:
    if defect != GOOD and defect not in DEFECTS:
        raise SyntheticConfigError(f"unknown defect type {defect!r}; known defect types: {', '.join(DEFECTS)}")


# ----------------------------------------------------------------------------- random helpers
def _sample_rngs(seed: int, cls: str, split: str, defect: str, index: int) -> list[np.random.Generator]:
    """Three independent generators (shape, sensor, defect) for one sample."""
    key = hashlib.sha256(f"{cls}/{split}/{defect}/{index}".encode()).digest()
    ss = np.random.SeedSequence([int(seed), *np.frombuffer(key, dtype=np.uint32).tolist()])
    return [np.random.default_rng(s) for s in ss.spawn(3)]


@dataclass(frozen=True)
class _Frame:
    """Affine map from pixel ``(row, col)`` to metric coordinates ``(a, b)``:
    ``(a, b) = origin + row * drow + col * dcol``."""

    shape: tuple[int, int]
    origin: np.ndarray
    drow: np.ndarray
    dcol: np.ndarray

    def grids(self) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.arange(self.shape[0])[:, None], np.arange(self.shape[1])[None, :]
        return tuple(self.origin[i] + rows * self.drow[i] + cols * self.dcol[i] for i in range(2))

    def local(self, shift: np.ndarray, angle: float) -> "_Frame":
        """The frame of coordinates shifted by ``-shift`` and rotated by ``-angle``."""
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, s], [-s, c]])
        return _Frame(self.shape, rot @ (self.origin - shift), rot @ self.drow, rot @ self.dcol)


def _fourier_field(rng: np.random.Generator, frame: _Frame, wavelengths: tuple[float, float],
                   terms: int = 8) -> np.ndarray:
    """Smooth random field of about unit variance: a sum of plane waves over ``frame``'s
    coordinates. The waves are separable in rows and columns, so it costs one matrix product."""
    k = 2 * np.pi / rng.uniform(*wavelengths, terms)
    ang = rng.uniform(0, 2 * np.pi, terms)
    phase = rng.uniform(0, 2 * np.pi, terms)
    wave = np.stack([k * np.cos(ang), k * np.sin(ang)])  # (2, terms)
    rows = np.outer(np.arange(frame.shape[0]), frame.drow @ wave)
    cols = np.outer(frame.dcol @ wave, np.arange(frame.shape[1])) + (frame.origin @ wave + phase)[:, None]
    # cos(r + c) = cos r cos c - sin r sin c, all terms in one product; einsum, not BLAS,
    # so the result does not depend on the number of BLAS threads
    both = np.einsum("ik,kj->ij", np.hstack([np.cos(rows), -np.sin(rows)]), np.vstack([np.cos(cols), np.sin(cols)]))
    return both * np.sqrt(2.0 / terms)


def _harmonics(rng: np.random.Generator, phi: np.ndarray, orders: Sequence[int], amplitude: float) -> np.ndarray:
    """``1 + sum_k c_k cos(k phi + p_k)`` with ``|c_k| <= amplitude``: a wobbly outline factor."""
    out = np.ones(phi.shape)
    for k in orders:
        out += rng.uniform(-amplitude, amplitude) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return out


def _paint_discs(mask: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> None:
    """Set ``mask`` True inside discs (centres as (row, col), radii in pixels), each on its own window."""
    for (r, c), rad in zip(centres, radii):
        r0, r1 = max(int(r - rad), 0), min(int(r + rad) + 2, mask.shape[0])
        c0, c1 = max(int(c - rad), 0), min(int(c + rad) + 2, mask.shape[1])
        if r0 < r1 and c0 < c1:
            rows, cols = np.ogrid[r0:r1, c0:c1]
            mask[r0:r1, c0:c1] |= (rows - r) ** 2 + (cols - c) ** 2 < rad * rad


# ----------------------------------------------------------------------------- object families
def _torus(rng: np.random.Generator, frame: _Frame) -> np.ndarray:
    """Bagel: upper half of a torus lying on the plane; rim height = tube radius (>= 9 mm)."""
    a, b = frame.grids()
    big_r, tube_r = rng.uniform(0.029, 0.032), rng.uniform(0.011, 0.013)
    e, flat = rng.uniform(0.0, 0.06), rng.uniform(0.85, 1.0)
    rho = np.hypot(a / (1 + e), b / (1 - e))
    phi = np.arctan2(b, a)
    ring = big_r * _harmonics(rng, phi, (2,), 0.04)
    tube = tube_r * _harmonics(rng, phi, (3,), 0.08)
    lumps = 1 + 0.03 * _fourier_field(rng, frame, (0.01, 0.03))
    delta = rho - ring
    inside = np.abs(delta) < tube
    return np.where(inside, flat * (tube + np.sqrt(np.clip(tube**2 - delta**2, 0, None))) * lumps, 0.0)


def _disc(rng: np.random.Generator, frame: _Frame) -> np.ndarray:
    """Cookie: a slightly domed, lumpy disc with a rounded rim (rim height >= 7 mm)."""
    a, b = frame.grids()
    radius, thick = rng.uniform(0.036, 0.041), rng.uniform(0.011, 0.015)
    round_r = 0.3 * thick
    rho, phi = np.hypot(a, b), np.arctan2(b, a)
    outline = radius * _harmonics(rng, phi, (3, 4, 5), 0.01)
    top = thick * (1 + 0.06 * (1 - (rho / outline) ** 2)) + 5e-4 * _fourier_field(rng, frame, (0.008, 0.025))
    d = outline - rho  # inward distance from the rim
    rim = round_r - np.sqrt(np.clip(round_r**2 - (round_r - np.clip(d, 0, round_r)) ** 2, 0, None))
    return np.where(d > 0, top - rim, 0.0)


def _blob(rng: np.random.Generator, frame: _Frame) -> np.ndarray:
    """Potato: a lumpy ellipsoid lying on the plane, seen down to its equator (rim 12-16 mm)."""
    a, b = frame.grids()
    ax, bx, height = rng.uniform(0.040, 0.048), rng.uniform(0.030, 0.035), rng.uniform(0.024, 0.032)
    phi = np.arctan2(b, a)
    rho = np.hypot(a / ax, b / bx) / _harmonics(rng, phi, (2, 3, 4), 0.02)
    lumps = 1 + 0.08 * _fourier_field(rng, frame, (0.012, 0.035))
    return np.where(rho < 1, height * (0.5 + 0.5 * np.sqrt(np.clip(1 - rho**2, 0, None))) * lumps, 0.0)


_FAMILY_SHAPES: dict[str, Callable[[np.random.Generator, _Frame], np.ndarray]] = {
    "torus": _torus, "disc": _disc, "blob": _blob}


def _albedo(rng: np.random.Generator, family: str, base: np.ndarray, frame: _Frame, centre_px: np.ndarray,
            pitch: float, height: np.ndarray) -> np.ndarray:
    """Object albedo (H, W, 3) in 0-255 units: base colour, smooth variation, family marks."""
    albedo = base * (1 + 0.10 * _fourier_field(rng, frame, (0.006, 0.03)))[..., None]
    if family == "torus":  # baked, darker top
        albedo *= (1 - 0.25 * height / max(height.max(), 1e-9))[..., None]
    n_marks = rng.integers(6, 13)
    marks = np.zeros(height.shape, bool)
    _paint_discs(marks, centre_px + rng.uniform(-0.03, 0.03, (n_marks, 2)) / pitch,
                 rng.uniform(0.0012, 0.0028, n_marks) / pitch)
    # chocolate chips on cookies, darker spots elsewhere
    albedo[marks] = np.array([70.0, 42.0, 26.0]) if family == "disc" else 0.7 * base
    return albedo


def _shading(height: np.ndarray, pitch: float, light: np.ndarray = _LIGHT) -> np.ndarray:
    """Lambertian shading factor of a height field (pixels of ``pitch`` metres) under a unit
    ``light`` direction (x right, y down, z towards the camera)."""
    gy, gx = np.gradient(height, pitch)
    lambert = np.clip((light[2] - light[0] * gx - light[1] * gy) / np.sqrt(gx * gx + gy * gy + 1), 0, None)
    return 0.3 + 0.7 * lambert


# ----------------------------------------------------------------------------- defects
DEFECT_REACH = 0.02  # metres: no defect reaches farther than this from its centre


@dataclass
class _Defect:
    dh: np.ndarray          # height change (metres), 0 outside the defect
    alpha: np.ndarray       # albedo blend weight, 0 outside the defect
    colour: np.ndarray      # (3,) colour blended in with ``alpha``

    @property
    def mask(self) -> np.ndarray:
        """The defect's pixels (the ground-truth mask): changed height or blended colour."""
        return (self.dh != 0) | (self.alpha > 0)


def _contrast_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """The palette colour farthest from ``base``, jittered a little."""
    far = _STAIN_PALETTE[np.argmax(np.linalg.norm(_STAIN_PALETTE - base, axis=1))]
    return np.clip(far + rng.uniform(-15, 15, 3), 0, 255)


def _blob_region(rng, pa, pb, radius) -> tuple[np.ndarray, np.ndarray]:
    """Irregular disc around the origin of local coordinates: (mask, normalised radius s in [0, 1))."""
    s = np.hypot(pa, pb) / (radius * _harmonics(rng, np.arctan2(pb, pa), (2, 3, 4), 0.12))
    return s < 1, s


def _polyline_region(rng, pa, pb, length, half_width, jagged) -> tuple[np.ndarray, np.ndarray]:
    """Band around a polyline through the origin: (mask, normalised distance s in [0, 1))."""
    n_seg = 4 if jagged else 1
    direction = rng.uniform(0, np.pi)
    t = np.linspace(-length / 2, length / 2, n_seg + 1)
    offset = rng.uniform(-0.12, 0.12, n_seg + 1) * length / n_seg if jagged else np.zeros(n_seg + 1)
    c, s_ = np.cos(direction), np.sin(direction)
    verts = np.stack([t * c - offset * s_, t * s_ + offset * c], axis=1)
    dist = np.full(np.broadcast_shapes(pa.shape, pb.shape), np.inf)
    for (a0, b0), (a1, b1) in zip(verts[:-1], verts[1:]):
        da, db = a1 - a0, b1 - b0
        u = np.clip(((pa - a0) * da + (pb - b0) * db) / (da * da + db * db), 0, 1)
        dist = np.minimum(dist, np.hypot(pa - a0 - u * da, pb - b0 - u * db))
    s = dist / half_width
    return s < 1, s


def _draw_defect(rng: np.random.Generator, name: str, scale: float, pa: np.ndarray, pb: np.ndarray,
                 base: np.ndarray) -> _Defect:
    """One attempt at a defect centred on the origin of (pa, pb) (metres), ``scale`` <= 1."""
    zeros = np.zeros(np.broadcast_shapes(pa.shape, pb.shape))
    if name in ("dent", "bump", "hole"):
        radius = scale * {"dent": rng.uniform(0.005, 0.007), "bump": rng.uniform(0.004, 0.0055),
                          "hole": rng.uniform(0.0025, 0.0035)}[name]
        mask, s = _blob_region(rng, pa, pb, radius)
        if name == "hole":
            dh = -rng.uniform(0.004, 0.006) * mask
        else:
            depth = rng.uniform(0.003, 0.004) * (-1 if name == "dent" else 1)
            dh = np.where(mask, depth * (RIM_STEP + (1 - RIM_STEP) * (1 - s**2)), 0.0)
        return _Defect(dh, zeros, np.zeros(3))
    if name == "stain":
        mask, s = _blob_region(rng, pa, pb, scale * rng.uniform(0.005, 0.008))
        alpha = np.where(mask, 0.65 + 0.3 * (1 - s**2), 0.0)
        return _Defect(zeros, alpha, _contrast_colour(rng, base))
    if name == "contamination":
        mask = zeros > 0
        for ca, cb in rng.uniform(-0.004, 0.004, (rng.integers(3, 7), 2)) * scale:
            mask |= _blob_region(rng, pa - ca, pb - cb, scale * rng.uniform(0.0015, 0.003))[0]
        return _Defect(zeros, 0.9 * mask, _contrast_colour(rng, base))
    # combined: crack (thin, jagged, dark) or cut (wide, straight, exposed interior)
    crack = name == "crack"
    length = scale * (rng.uniform(0.018, 0.028) if crack else rng.uniform(0.02, 0.03))
    half_width = rng.uniform(0.0009, 0.00125) if crack else rng.uniform(0.00125, 0.00175)
    mask, s = _polyline_region(rng, pa, pb, length, half_width, jagged=crack)
    depth = rng.uniform(0.0025, 0.0035) if crack else rng.uniform(0.003, 0.004)
    dh = np.where(mask, -depth * (RIM_STEP + (1 - RIM_STEP) * (1 - s**2)), 0.0)
    if crack:
        colour = np.array([35.0, 25.0, 20.0])
    else:
        # exposed interior: darker and warmer on bright objects, pale yellow on dark ones; a hue
        # shift, so that the groove's change of shading cannot hide it
        colour = np.array([0.6, 0.45, 0.3]) * base if base.mean() > 150 else np.array([230.0, 200.0, 120.0])
    return _Defect(dh, 0.85 * mask, colour)


def _place_defect(rng: np.random.Generator, name: str, height: np.ndarray, pitch: float,
                  base: np.ndarray) -> _Defect:
    """Draw a defect on the object, inside its silhouette and high enough above the plane.

    Candidates are centred on the upper part of the object; a draw that leaves the allowed
    region is redrawn (after every ten failures the defect shrinks by 10 %). Each draw is
    computed on the window within :data:`DEFECT_REACH` of its centre only.
    """
    allowed = ndimage.distance_transform_edt(height > 0) * pitch >= DEFECT_MARGIN
    centres = np.flatnonzero(allowed & (height >= 0.75 * height.max()))
    reach = int(np.ceil(DEFECT_REACH / pitch))
    for attempt in range(60):
        r, c = np.unravel_index(centres[rng.integers(len(centres))], height.shape)
        win = np.s_[max(r - reach, 0):min(r + reach + 1, height.shape[0]),
                    max(c - reach, 0):min(c + reach + 1, height.shape[1])]
        rows, cols = np.ogrid[win]
        d = _draw_defect(rng, name, 1.0 - 0.1 * (attempt // 10), (cols - c) * pitch, (rows - r) * pitch, base)
        mask = d.mask
        if mask.any() and allowed[win][mask].all() and (height[win] + d.dh)[mask].min() >= MIN_DEFECT_HEIGHT:
            full = _Defect(np.zeros(height.shape), np.zeros(height.shape), d.colour)
            full.dh[win], full.alpha[win] = d.dh, d.alpha
            return full
    raise RuntimeError(f"could not place a {name!r} defect on the object")  # pragma: no cover


# ----------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Camera:
    """A pinhole camera: ``focal`` length and principal point ``centre`` (both axes) in pixels,
    pixel-index coordinates (pixel ``i`` at ``i``). The plane is placed at ``focal / (3 size)``
    times the MVTec camera's distance, so every camera sees the same scene in metres at the same
    pixel pitch."""

    focal: float
    centre: float | tuple[float, float]   # one value for both axes, or (row, column)


def mvtec_camera(shape: tuple[int, int]) -> Camera:
    """The MVTec-layout camera of an (H, W) image: focal ``3 * min(H, W)``; the centre off the pixel
    grid, so no x or y is exactly zero (a zero coordinate would make the point invalid, SPEC 1.2)."""
    return Camera(3.0 * min(shape), tuple((n - 1) / 2 + 0.3 for n in shape))


@dataclass
class Scene:
    """One rendered sample before it becomes files (see :func:`render_scene`)."""

    z: np.ndarray            # (H, W) float64 depth along the optical axis, noise included, no dropouts
    ray_x: np.ndarray        # (W,) x / z of each column
    ray_y: np.ndarray        # (H,) y / z of each row
    height: np.ndarray       # (H, W) height above the plane, metres (defect included)
    pitch: float             # metres per pixel at the plane
    albedo: np.ndarray       # (H, W, 3) 0-255 units (defect included)
    pixel_noise: np.ndarray  # (H, W, 3)
    drop: np.ndarray         # (H, W) bool sensor dropouts
    inside: np.ndarray       # (H, W) bool object pixels
    gt: np.ndarray           # (H, W) bool defect pixels
    dh: np.ndarray           # (H, W) height change of the defect (0 outside)
    alpha: np.ndarray        # (H, W) albedo blend weight of the defect (0 outside)
    plane: np.ndarray        # (4,) float64 noise-free plane, unit normal

    def xyz(self) -> np.ndarray:
        """(H, W, 3) float32 organised cloud, dropouts exactly (0, 0, 0)."""
        xyz = np.stack([self.ray_x[None, :] * self.z, self.ray_y[:, None] * self.z, self.z], axis=-1).astype(np.float32)
        xyz[self.drop] = 0.0
        return xyz

    def rgb(self, *lights: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image under unit light directions (default: the MVTec renders' light),
        several lights shading with the mean of their factors."""
        shades = [_shading(self.height, self.pitch, light) for light in (lights or (_LIGHT,))]
        shade = (shades[0] if len(shades) == 1 else np.mean(shades, axis=0))[..., None]
        return np.clip(np.rint(self.albedo * shade + self.pixel_noise), 0, 255).astype(np.uint8)


def render_sample(cls: str, split: str, defect: str, index: int, size=None, seed: int = 0,
                  with_defect: bool = True) -> SyntheticSample:
    """Render sample ``<cls>/<split>/<defect>/<index:03d>`` of the data set for ``seed``.

    ``size``: one side (square), ``(H, W)``, or None for the class default (:func:`default_shape`).
    A square size renders exactly what it rendered before non-square sizes existed.
    ``with_defect=False`` renders the same sample (same object, texture, noise, dropouts)
    without its defect; its ``gt`` is then all zero.
    """
    scene = render_scene(cls, split, defect, index, size, seed, with_defect)
    return SyntheticSample(xyz=scene.xyz(), rgb=scene.rgb(), gt=(scene.gt * 255).astype(np.uint8),
                           object_mask=scene.inside & ~scene.drop, plane_mask=~scene.inside & ~scene.drop,
                           plane=scene.plane)


def render_scene(cls: str, split: str, defect: str, index: int, size=None, seed: int = 0,
                 with_defect: bool = True, *, look: tuple[str, tuple[int, int, int]] | None = None,
                 camera: Camera | None = None, sensor: bool = True) -> Scene:
    """The scene of :func:`render_sample`. ``size`` as there (for a class name this module does
    not know, give it); ``look`` = (family, albedo) for such a name (default: :data:`CLASSES`);
    ``camera`` another camera (default: :func:`mvtec_camera`); ``sensor=False`` a rendered depth
    map: no depth noise and no dropouts (the random draws are made all the same, so everything
    else is unchanged)."""
    family, colour = look if look is not None else (family_of(cls), CLASSES[cls][1])
    if family not in FAMILIES:
        raise SyntheticConfigError(f"unknown object family {family!r}; known: {', '.join(FAMILIES)}")
    _check_defect(defect)
    if split not in SPLITS:
        raise SyntheticConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split != "test" and defect != GOOD:
        raise SyntheticConfigError(f"split {split!r} holds only {GOOD!r} samples, got defect {defect!r}")
    shape = default_shape(cls) if size is None else image_shape(size)
    if index < 0 or seed < 0:
        raise SyntheticConfigError(f"need index >= 0 and seed >= 0; got {index}, {seed}")
    shape_rng, sensor_rng, defect_rng = _sample_rngs(seed, cls, split, defect, index)
    base = np.array(colour, float)

    # Camera rays and the tilted plane z = z0 + gx x + gy y. The scene (object, textures)
    # lives on the image grid scaled to the plane's depth on the optical axis: ``pitch``
    # metres per pixel. The optical axis is at the camera's centre (row, col).
    camera = camera or mvtec_camera(shape)
    focal = camera.focal
    centre = np.broadcast_to(np.asarray(camera.centre, dtype=float), (2,)).copy()
    ray_r, ray_c = ((np.arange(n) - c) / focal for n, c in zip(shape, centre))
    z0 = shape_rng.uniform(0.375, 0.395) * (focal / (3.0 * min(shape)))
    tilt, tilt_dir = np.radians(shape_rng.uniform(1.5, 4.0)), shape_rng.uniform(0, 2 * np.pi)
    gx, gy = np.tan(tilt) * np.cos(tilt_dir), np.tan(tilt) * np.sin(tilt_dir)
    z_plane = z0 / (1 - gx * ray_c[None, :] - gy * ray_r[:, None])
    pitch = z0 / focal
    scene = _Frame(shape, -centre[::-1] * pitch, np.array([0.0, pitch]), np.array([pitch, 0.0]))

    # object: height field in object-local coordinates, texture; background texture
    shift, rot = shape_rng.uniform(-0.005, 0.005, 2), shape_rng.uniform(0, 2 * np.pi)
    obj = scene.local(shift, rot)
    height = _FAMILY_SHAPES[family](shape_rng, obj)
    inside = height > 0
    obj_albedo = _albedo(shape_rng, family, base, obj, centre + shift[::-1] / pitch, pitch, height)
    background = _BACKGROUND * (1 + 0.06 * _fourier_field(shape_rng, scene, (0.01, 0.05)))[..., None]
    albedo = np.where(inside[..., None], obj_albedo, background)

    # sensor: depth noise, pixel noise, dropouts (speckles, blobs, steep slopes of the defect-free shape)
    depth_noise = sensor_rng.normal(0.0, NOISE_SIGMA, shape)
    pixel_noise = sensor_rng.normal(0.0, 2.0, albedo.shape)
    drop = sensor_rng.random(shape) < 0.004
    gy_h, gx_h = np.gradient(height, pitch)
    drop |= (gx_h * gx_h + gy_h * gy_h > 2.5**2) & (sensor_rng.random(shape) < 0.5)
    n_blobs = sensor_rng.integers(3, 8)
    _paint_discs(drop, sensor_rng.uniform(0, shape, (n_blobs, 2)), sensor_rng.uniform(0.0003, 0.0012, n_blobs) / pitch)

    d = _Defect(np.zeros(shape), np.zeros(shape), np.zeros(3))
    if with_defect and defect != GOOD:
        d = _place_defect(defect_rng, defect, height, pitch, base)
        height = height + d.dh
        albedo = albedo * (1 - d.alpha[..., None]) + d.alpha[..., None] * d.colour
    if not sensor:
        depth_noise, drop = np.zeros(shape), np.zeros(shape, bool)

    z = z_plane - height + depth_noise
    plane = np.array([gx, gy, -1.0, z0]) / np.sqrt(gx * gx + gy * gy + 1)
    return Scene(z=z, ray_x=ray_c, ray_y=ray_r, height=height, pitch=pitch, albedo=albedo, pixel_noise=pixel_noise,
                 drop=drop, inside=inside, gt=d.mask, dh=d.dh, alpha=d.alpha, plane=plane)


# ----------------------------------------------------------------------------- data set
def _write_sample(task: tuple) -> None:
    folder, cls, split, defect, index, size, seed, background_removed = task
    sample = render_sample(cls, split, defect, index, size=size, seed=seed)
    stem = f"{index:03d}"
    xyz, rgb, gt = sample.xyz, sample.rgb, sample.gt
    if background_removed:   # what tools/preprocessing.py writes, from the known plane instead of RANSAC
        done = preprocess_arrays(xyz, rgb, gt, plane=sample.plane, name=f"{folder}/{stem}")
        xyz, rgb, gt = done.xyz, done.rgb, done.gt
    write_png(folder / "rgb" / f"{stem}.png", rgb)
    write_xyz(folder / "xyz" / f"{stem}.tiff", xyz)
    if split == "test":
        write_png(folder / "gt" / f"{stem}.png", gt)


MARKER = ".synthetic.json"  # settings of a generated class folder, written inside it


@dataclass
class SyntheticConfig:
    """Options of ``tools/make_synthetic_dataset.py`` (the arguments of :func:`generate_dataset`)."""

    out: Path
    classes: list[str] = field(default_factory=lambda: ["bagel", "cookie"])
    n_train: int = 20
    n_val: int = 2
    n_test_good: int = 4
    n_test_defect: int = 2
    size: Optional[list[int]] = None   # [side] or [H, W]; None: each class's default size
    seed: int = 0
    defects: list[str] = field(default_factory=lambda: list(DEFAULT_DEFECTS))
    workers: int = 1
    overwrite: bool = False
    background_removed: bool = False
    format: str = "mvtec"   # or "eyecandies": the release's files (tools/synthetic/eyecandies.py)


def generate(cfg: SyntheticConfig, progress: bool = True) -> Path:
    """What ``tools/make_synthetic_dataset.py --format mvtec`` runs: :func:`generate_dataset` with ``cfg``'s options."""
    return generate_dataset(cfg.out, cfg.classes, cfg.n_train, cfg.n_val, cfg.n_test_good, cfg.n_test_defect,
                            cfg.size, cfg.seed, cfg.defects, cfg.workers, cfg.overwrite, progress,
                            cfg.background_removed)


def generate_dataset(out: str | os.PathLike, classes: Iterable[str] = ("bagel", "cookie"), n_train: int = 20,
                     n_val: int = 2, n_test_good: int = 4, n_test_defect: int = 2, size=None, seed: int = 0,
                     defects: Iterable[str] = DEFAULT_DEFECTS, workers: int = 1, overwrite: bool = False,
                     progress: bool = True, background_removed: bool = False) -> Path:
    """Write the MVTec 3D-AD layout (SPEC 1.2) for ``classes`` under ``out``; return ``out``.

    ``size`` is one side (square images), ``(H, W)``, or None for each class's default size
    (:func:`default_shape`). ``n_test_defect`` counts per defect type; a split or defect type
    with count 0 gets no folder. Each class is built in a hidden staging folder (``out/.synthetic-partial-*``,
    never mistaken for a class) and moved to ``out/<cls>`` only when complete, with its
    settings in ``out/<cls>/.synthetic.json``. An existing class folder generated with
    the same settings is kept as it is (reruns are cheap); any other existing
    ``out/<cls>`` is an error unless ``overwrite``, which replaces it once the new one
    is complete. ``background_removed`` writes the samples as ``tools/preprocessing.py`` would
    leave them (same bytes, tested), with the generator's own plane instead of a RANSAC fit, so
    that machines without Open3D get preprocessed data.
    """
    counts = {"n_train": n_train, "n_val": n_val, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
    classes, defects = check_request(classes, defects, counts, size, seed, workers, family_of)
    out = Path(out)
    shapes = {cls: default_shape(cls) if size is None else image_shape(size) for cls in classes}
    # a square size is recorded as one number, as before non-square sizes existed
    extra = {"background_removed": True} if background_removed else {}
    settings = {cls: {"class": cls, **counts, "size": h if h == w else [h, w], "seed": seed, "defects": defects,
                      **extra} for cls, (h, w) in shapes.items()}
    plan = [("train", GOOD, n_train), ("validation", GOOD, n_val), ("test", GOOD, n_test_good)]
    plan += [("test", d, n_test_defect) for d in defects]

    def tasks(staging: Path, cls: str) -> list[tuple]:
        return [(staging / cls / split / defect, cls, split, defect, i, shapes[cls], seed, background_removed)
                for split, defect, n in plan for i in range(n)]

    return write_classes(out, settings, tasks, _write_sample, workers, overwrite, progress)


def check_request(classes: Iterable[str], defects: Iterable[str], counts: dict[str, int], size, seed: int,
                  workers: int, check_class: Callable[[str], object]) -> tuple[list[str], list[str]]:
    """The de-duplicated class and defect lists of a generator request, or :class:`SyntheticConfigError`."""
    classes, defects = list(dict.fromkeys(classes)), list(dict.fromkeys(defects))
    for cls in classes:
        check_class(cls)
    for defect in defects:
        _check_defect(defect)
        if defect == GOOD:
            raise SyntheticConfigError(f"{GOOD!r} is not a defect type")
    if not classes or any(not 0 <= n <= 1000 for n in counts.values()) or counts["n_train"] < 1 or workers < 1:
        raise SyntheticConfigError(f"need at least one class, 1 <= n_train, 0 <= counts <= 1000 and "
                                   f"workers >= 1; got classes={classes}, {counts}, workers={workers}")
    if seed < 0:
        raise SyntheticConfigError(f"need seed >= 0; got seed={seed}")
    if size is not None:
        image_shape(size)
    return classes, defects


def write_classes(out: Path, settings: dict[str, dict], tasks: Callable[[Path, str], list], write: Callable,
                  workers: int = 1, overwrite: bool = False, progress: bool = True) -> Path:
    """Build every class of ``settings`` (class -> its generator settings) in a hidden staging
    folder and move it to ``out/<cls>`` when complete (see :func:`generate_dataset`).

    ``tasks(staging, cls)`` lists the jobs of a class, ``write(job)`` writes one of them (in a
    worker process). A class whose ``out/<cls>/.synthetic.json`` holds the same settings is kept.
    """
    text = {cls: json.dumps(v, sort_keys=True) + "\n" for cls, v in settings.items()}

    def up_to_date(cls: str) -> bool:
        marker = out / cls / MARKER
        return marker.is_file() and marker.read_text(encoding="utf-8") == text[cls]

    todo = [cls for cls in settings if overwrite or not up_to_date(cls)]
    clash = [out / cls for cls in todo if (out / cls).exists() and not overwrite]
    if clash:
        raise DataError(f"{clash[0]}: already exists with other contents or settings; "
                        "pass overwrite (--overwrite) to replace it")
    if not todo:
        return out
    out.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=".synthetic-partial-", dir=out))
    try:
        jobs = [job for cls in todo for job in tasks(staging, cls)]
        with tqdm(total=len(jobs), desc="synthetic samples", unit="sample", disable=not progress) as bar:
            for _ in ordered_map(write, jobs, workers):
                bar.update()
        for cls in todo:
            write_text(staging / cls / MARKER, text[cls])
            target = out / cls
            if target.exists():  # move the old folder into staging; it is deleted with it
                os.replace(target, staging / f"old-{cls}")
            os.replace(staging / cls, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
