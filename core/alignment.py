"""Per-class alignment of RGB scores onto the SDF score scale (SPEC 7).

The alignment samples (the first 25 of a shuffled training order, see
:func:`core.pipeline.reference_sample_orders`) are scored against the class memory in
"alignment" mode (the nearest memory entry is dropped, SPEC 7 step 2). Their **blurred**
SDF maps and blurred, unaligned RGB maps are concatenated in alignment order; over the
non-zero values of each kind, ``lower/upper = mean ∓ 3·std`` (population std) and

    weight = (upper_sdf − lower_sdf) / (upper_rgb − lower_rgb),   bias = lower_sdf − weight · lower_rgb.

Everything runs in float32 NumPy on the concatenated arrays, exactly as the reference
does (its mean/std are NumPy's float32 pairwise sums over the same array), so ``weight``
and ``bias`` are the reference's float32 values bit for bit given the same maps.

The factor 3 (``main.py --align_sigma``) cancels algebraically (``weight = std_sdf /
std_rgb``, ``bias = mean_sdf − weight · mean_rgb``): another factor changes ``weight`` and
``bias`` only by float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from core.inference import predict
from core.memory import DualMemory, EncodedSample
from utils.errors import ShapeGuidedError

N_ALIGN = 25      # alignment samples per class (SPEC 7 step 1)
ALIGN_SIGMA = 3   # the bounds are mean -+ ALIGN_SIGMA * std (SPEC 7 step 4)


class AlignmentError(ShapeGuidedError, ValueError):
    """The alignment statistics are undefined (e.g. an all-zero or constant RGB score set)."""


@dataclass
class Alignment:
    """Result of :func:`align`: the affine map and the statistics it came from."""

    weight: np.float32
    bias: np.float32
    sdf_mean: np.float32
    sdf_std: np.float32
    rgb_mean: np.float32
    rgb_std: np.float32
    n_samples: int
    sigma: float = ALIGN_SIGMA   # the bounds' factor


def _bounds(values: np.ndarray, sigma: float = ALIGN_SIGMA) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    nonzero = values[np.nonzero(values)]
    if nonzero.size == 0:
        raise AlignmentError("every blurred alignment map is zero")
    mean = np.mean(nonzero)
    std = np.std(nonzero)
    return mean - sigma * std, mean + sigma * std, mean, std


def alignment_from_maps(sdf_maps: Sequence[np.ndarray], rgb_maps: Sequence[np.ndarray],
                        sigma: float = ALIGN_SIGMA) -> Alignment:
    """``weight``/``bias`` from the blurred SDF and RGB maps of the alignment samples (SPEC 7 step 4).

    Maps are concatenated (flattened, float32) in the given order; the order matters only
    for the last bits of NumPy's float32 sums. ``sigma`` is the factor of the bounds.
    """
    if len(sdf_maps) == 0 or len(sdf_maps) != len(rgb_maps):
        raise ValueError(f"need the same positive number of SDF and RGB maps, got {len(sdf_maps)} and {len(rgb_maps)}")
    sdf = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in sdf_maps])
    rgb = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in rgb_maps])
    sdf_lower, sdf_upper, sdf_mean, sdf_std = _bounds(sdf, sigma)
    rgb_lower, rgb_upper, rgb_mean, rgb_std = _bounds(rgb, sigma)
    if not rgb_upper > rgb_lower:
        raise AlignmentError(f"the non-zero blurred RGB alignment scores are constant ({rgb_mean}); "
                             f"the RGB-to-SDF scale is undefined")
    weight = (sdf_upper - sdf_lower) / (rgb_upper - rgb_lower)
    bias = sdf_lower - weight * rgb_lower
    return Alignment(weight, bias, sdf_mean, sdf_std, rgb_mean, rgb_std, len(sdf_maps), sigma)


def align(memory: DualMemory, sdf_model, samples: Iterable[EncodedSample],
          times: Optional[dict] = None, progress=None, sigma: float = ALIGN_SIGMA,
          **predict_options) -> Alignment:
    """Score ``samples`` (already encoded, in alignment order) in alignment mode and
    derive the class's ``weight``/``bias`` (SPEC 7). ``progress`` wraps the iterable (tqdm);
    ``predict_options`` (``k_sdf``, ``k_rgb``, ``n_nonzero``, ``blur_radius``, ``precision``) go to
    :func:`core.inference.predict`."""
    sdf_maps, rgb_maps = [], []
    for enc in (progress(samples) if progress else samples):
        pred = predict(memory, sdf_model, enc, mode="alignment", times=times, **predict_options)
        sdf_maps.append(pred.sdf_map_blur)
        rgb_maps.append(pred.rgb_map_blur)
    return alignment_from_maps(sdf_maps, rgb_maps, sigma)
