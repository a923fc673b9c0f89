"""The Eyecandies release (Bonfiglioli et al., ACCV 2022): its layout, depth encoding, camera and masks.

Facts of the release, from its documentation and toolkit:

* ``<root>/<Class>/<split>/data/<id>_<item>.<ext>``; splits ``train`` (1000 good samples per
  class), ``val`` (100 good), ``test_public`` (25 good + 25 anomalous, with ground truth) and
  ``test_private`` (no ground truth; not converted). Ids have 3 digits in ``train``/``val`` and
  2 in ``test_public``.
* per sample: ``image_0`` ... ``image_5`` (RGB PNG under six lightings: all spotlights, bottom,
  right, top, left, global), ``depth.png`` (16-bit, 0 ... 65535) with ``info_depth.yaml``
  holding the metric range ``normalization: {min, max}`` (metric depth = png / 65535 *
  (max - min) + min), ``normals.png``, ``pose.txt`` (4 x 4 camera pose), ``metadata.yaml``,
  the 8-bit masks ``bumps_mask``, ``dents_mask``, ``colors_mask``, ``normals_mask`` and
  ``mask`` (their union), non-zero = anomalous; 512 x 512 pixels.
* one pinhole camera for every image: focal length 711.11 px, principal point at the image
  centre.

Conversion rules (``tools/prepare_eyecandies.py``):

* the organised cloud is the depth back-projected in the **camera frame** (metres; the pose
  is not applied): pixel ``(r, c)`` has its centre at ``(c + 0.5, r + 0.5)`` and the principal
  point is the image centre ``(W / 2, H / 2)``, so ``x = (c + 0.5 - W / 2) z / f``,
  ``y = (r + 0.5 - H / 2) z / f``. MVTec 3D-AD clouds are camera-frame clouds too, and in
  that frame no pixel lies on the optical axis, so no coordinate of a valid point is exactly
  0 (which SPEC 1.2 would read as invalid). The toolkit's snippet uses ``c - W / 2``: half a
  pixel off, and with it the centre row and column would get ``x = 0`` or ``y = 0``. A pixel
  whose depth is not finite or not positive is invalid, ``(0, 0, 0)``.
* images of another size than 512 x 512 (the synthetic test sets) are taken as the same camera
  at another resolution: focal ``711.11 * W / 512``.
* the anomaly type of a test sample comes from its type masks: the one type whose mask is
  non-zero, or ``combined`` when several are; ``good`` when none is. Its ground truth is
  ``mask`` united with the type masks, 255 where anomalous.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from core.dataset import EYECANDIES_CLASSES, GOOD
from utils.errors import DataError
from utils.io import read_png16, read_yaml

FOCAL_LENGTH = 711.11          # pixels, at the release's 512 x 512
RELEASE_SIZE = 512
LIGHTS = ("all spotlights", "bottom spotlight", "right spotlight", "top spotlight", "left spotlight",
          "global lighting")    # image_0 ... image_5
DEFAULT_LIGHT = 4               # image_4, as M3DM, CFM and the other RGB+3D methods
MASK_TYPES = ("bumps", "dents", "colors", "normals")
COMBINED = "combined"
PRIVATE = "test_private"
#: release split -> (converted split, whether it holds test samples with ground truth)
SPLITS = {"train": ("train", False), "val": ("validation", False), "test_public": ("test", True)}
REQUIRED_SPLITS = ("train", "test_public")
_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.(png|yaml|txt)$")


# ----------------------------------------------------------------------------- depth and camera
def focal_length(width: int) -> float:
    """The release camera's focal length for an image ``width`` pixels wide."""
    return FOCAL_LENGTH * width / RELEASE_SIZE


def decode_depth(png: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Metric depth (float64) of a 16-bit depth PNG: ``png / 65535 * (hi - lo) + lo``."""
    return png.astype(np.float64) / 65535.0 * (hi - lo) + lo


def encode_depth(depth: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The inverse, for the synthetic writer: (uint16 PNG, min, max) with the range of ``depth``
    itself; the round trip errs by at most ``(max - min) / 65535 / 2``."""
    lo, hi = float(depth.min()), float(depth.max())
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    return np.rint((depth - lo) * scale).astype(np.uint16), lo, hi


def pixel_rays(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x / z per column (W,), y / z per row (H,))`` of the release camera (module docstring)."""
    f = focal_length(width)
    return (np.arange(width) + 0.5 - width / 2) / f, (np.arange(height) + 0.5 - height / 2) / f


def backproject(depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 camera-frame cloud of a metric depth map; invalid depths give (0, 0, 0)."""
    rx, ry = pixel_rays(*depth.shape)
    xyz = np.stack([rx[None, :] * depth, ry[:, None] * depth, depth], axis=-1)
    xyz[~(np.isfinite(depth) & (depth > 0))] = 0.0
    return xyz.astype(np.float32)


def read_depth_range(path: Path) -> tuple[float, float]:
    """``normalization: {min, max}`` of an ``info_depth.yaml``; :class:`DataError` naming the file."""
    data = read_yaml(path)
    try:
        lo, hi = float(data["normalization"]["min"]), float(data["normalization"]["max"])
    except (TypeError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: expected 'normalization: {{min: <metres>, max: <metres>}}' "
                        f"({type(exc).__name__}: {exc})") from exc
    if not (np.isfinite(lo) and np.isfinite(hi) and hi >= lo):
        raise DataError(f"{path}: depth range min {lo}, max {hi} is not a range")
    return lo, hi


def read_depth(png: Path, info: Path) -> np.ndarray:
    """Metric depth map (float64) of a sample."""
    return decode_depth(read_png16(png), *read_depth_range(info))


def anomaly_type(masks: dict[str, np.ndarray]) -> str:
    """``good``, the one non-zero type of :data:`MASK_TYPES`, or :data:`COMBINED`."""
    found = [t for t in MASK_TYPES if masks[t].any()]
    return GOOD if not found else found[0] if len(found) == 1 else COMBINED


# ----------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class ReleaseSample:
    """One sample of the release: where it is and its files (item -> path)."""

    cls: str
    split: str                  # release split: train, val, test_public
    id: str                     # as in the file names, e.g. "07"
    files: dict = field(compare=False)

    @property
    def stem(self) -> str:
        """The converted file stem: the id with 3 digits (``07`` -> ``007``)."""
        return f"{int(self.id):03d}"

    @property
    def key(self) -> str:
        return f"{self.cls}/{self.split}/{self.id}"

    def file(self, item: str, ext: str = "png") -> Path:
        """Path of ``<id>_<item>.<ext>``; :class:`DataError` when the release lacks it."""
        path = self.files.get(f"{item}.{ext}")
        if path is None:
            folder = Path(next(iter(self.files.values()))).parent
            raise DataError(f"{folder / f'{self.id}_{item}.{ext}'}: missing (sample {self.key})")
        return path


@dataclass
class Release:
    """What :func:`discover` found under a release root."""

    root: Path
    classes: list[str]
    samples: list[ReleaseSample]
    private: dict[str, int]     # class -> test_private samples (skipped)
    missing_val: list[str]      # classes without a val split


def _is_class(folder: Path) -> bool:
    return any((folder / split / "data").is_dir() for split in (*SPLITS, PRIVATE))


def _samples_in(folder: Path, cls: str, split: str) -> list[ReleaseSample]:
    groups: dict[str, dict] = {}
    for path in sorted(folder.iterdir()):
        m = _FILE.match(path.name)
        if m and path.is_file():
            groups.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = path
    stems: dict[str, str] = {}
    for sample_id in groups:
        other = stems.setdefault(f"{int(sample_id):03d}", sample_id)
        if other != sample_id:
            raise DataError(f"{folder}: ids {other!r} and {sample_id!r} are the same sample number")
    return [ReleaseSample(cls, split, i, groups[i]) for i in sorted(groups, key=int)]


def discover(root: str | Path, classes: Optional[list[str]] = None, light: int = DEFAULT_LIGHT) -> Release:
    """Every sample to convert under ``root`` (sorted), each checked to have the files it needs:
    ``image_<light>.png``, ``depth.png``, ``info_depth.yaml`` and, in ``test_public``, the four
    type masks. :class:`DataError` names the first missing file or folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: Eyecandies release folder not found")
    if _is_class(root):
        raise DataError(f"{root}: looks like one class folder of the release; pass the folder that holds "
                        f"the class folders ({root.parent})")
    found = [p.name for p in root.iterdir() if p.is_dir() and _is_class(p)]
    order = [c for c in EYECANDIES_CLASSES if c in found] + sorted(c for c in found if c not in EYECANDIES_CLASSES)
    if not order:
        raise DataError(f"{root}: no Eyecandies class folders found (expected <Class>/train/data/000_depth.png, "
                        f"e.g. {root / 'CandyCane' / 'train' / 'data'})")
    if classes:
        unknown = [c for c in classes if c not in order]
        if unknown:
            raise DataError(f"{root}: class folder(s) {unknown} not found; found: {order}")
        order = [c for c in order if c in classes]
    release = Release(root, order, [], {}, [])
    needed = [f"image_{light}.png", "depth.png", "info_depth.yaml"]
    for cls in order:
        for split, (_, is_test) in SPLITS.items():
            folder = root / cls / split / "data"
            if not folder.is_dir():
                if split in REQUIRED_SPLITS:
                    raise DataError(f"{folder}: folder not found (the release has {cls}/{split}/data)")
                release.missing_val.append(cls)
                continue
            samples = _samples_in(folder, cls, split)
            if not samples:
                raise DataError(f"{folder}: no samples (<id>_depth.png, ...)")
            for s in samples:
                for item in needed + ([f"{t}_mask.png" for t in MASK_TYPES] if is_test else []):
                    s.file(*item.rsplit(".", 1))
            release.samples += samples
        private = root / cls / PRIVATE / "data"
        release.private[cls] = len(_samples_in(private, cls, PRIVATE)) if private.is_dir() else 0
    return release
