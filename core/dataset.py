"""MVTec 3D-AD data layer (SPEC section 1).

Discovers classes, splits and defect types (always sorted), pairs the rgb / xyz / gt /
grid files of each sample **by file stem** (never by position, SPEC 1.3 FIX), and
defines the validity rule of SPEC 1.2 (a point is valid iff all three coordinates are
non-zero; NaN and inf are invalid too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from utils.errors import DataError
from utils.io import read_gray

MVTEC_CLASSES = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel",
    "foam", "peach", "potato", "rope", "tire",
)
#: The Eyecandies classes (Bonfiglioli et al., ACCV 2022) in the release's order; converted
#: by ``tools/prepare_eyecandies.py`` into this layout under the same names.
EYECANDIES_CLASSES = (
    "CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto", "GummyBear",
    "HazelnutTruffle", "LicoriceSandwich", "Lollipop", "Marshmallow", "PeppermintCandy",
)
SPLITS = ("train", "validation", "test")
GOOD = "good"
IMAGE_SIZE = 224  # side of the working grid (SPEC conventions: the 224 x 224 grid)
BORDER = 10       # width in pixels of the border strips where the background plane is sampled (SPEC 2.1 step 1)


@dataclass(frozen=True)
class Sample:
    """One sample of the data set: its identity and the paths of its files."""

    root: Path
    cls: str
    split: str
    defect: str
    stem: str
    rgb: Path
    xyz: Path
    gt: Optional[Path] = None

    @property
    def label(self) -> int:
        """0 for anomaly-free samples (``good``), 1 for every defect type."""
        return 0 if self.defect == GOOD else 1

    @property
    def relative(self) -> Path:
        """``<cls>/<split>/<defect>``: the sample's folder relative to the data set root."""
        return Path(self.cls, self.split, self.defect)

    @property
    def name(self) -> str:
        """A readable identifier, e.g. ``bagel/test/crack/003``."""
        return f"{self.cls}/{self.split}/{self.defect}/{self.stem}"

    def grid_file(self, grid_root: str | os.PathLike) -> Path:
        """Patch file of this sample: ``<grid>/<cls>/<split>/<defect>/npz/<stem>.npz`` (SPEC 3.3)."""
        return Path(grid_root, self.cls, self.split, self.defect, "npz", f"{self.stem}.npz")


# ----------------------------------------------------------------------------- discovery
def check_root(root: str | os.PathLike) -> Path:
    """Return ``root`` as a Path, or raise :class:`DataError` if it is not a folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data set path does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data set path is not a folder")
    return root


def find_classes(root: str | os.PathLike) -> list[str]:
    """Class folders under ``root`` (folders holding ``train`` or ``test``).

    Returned in the MVTec 3D-AD order (SPEC 1.1) when every class is an MVTec class, in the
    Eyecandies order when every class is an Eyecandies class, otherwise sorted by name.
    """
    root = check_root(root)
    found = [p.name for p in root.iterdir()
             if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())]
    for known in (MVTEC_CLASSES, EYECANDIES_CLASSES):
        if found and all(c in known for c in found):
            return [c for c in known if c in found]
    return sorted(found)


def resolve_classes(root: str | os.PathLike, requested: Optional[Iterable[str]] = None) -> list[str]:
    """The classes to process: ``requested`` (checked to exist) or every class found."""
    found = find_classes(root)
    if not requested:
        if not found:
            raise DataError(f"{root}: no class folders found (expected <class>/train and <class>/test)")
        return found
    requested = list(requested)
    missing = [c for c in requested if c not in found]
    if missing:
        raise DataError(f"{root}: class folder(s) {missing} not found; classes found: {found or 'none'}")
    return requested


def defect_types(root: str | os.PathLike, cls: str, split: str = "test") -> list[str]:
    """Sorted defect-type folders of a split (``good`` included where present)."""
    folder = Path(root, cls, split)
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder not found")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _stems(folder: Path, suffix: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    # hidden files (e.g. temporaries of an interrupted atomic write) are not samples
    return {p.stem: p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() == suffix and not p.name.startswith(".")}


def _describe_mismatch(kind: dict[str, set[str]]) -> str:
    everything = set().union(*kind.values())
    parts = []
    for name, stems in kind.items():
        lacking = sorted(everything - stems)
        if lacking:
            parts.append(f"no {name} for {lacking}")
    return "; ".join(parts)


def samples_in(root: str | os.PathLike, cls: str, split: str, defect: str,
               need_gt: Optional[bool] = None) -> list[Sample]:
    """Samples of one ``<cls>/<split>/<defect>`` folder, paired by stem and sorted.

    ``need_gt`` defaults to "test split and not good". A gt of a good sample is
    recorded when present (preprocessing pads it) but never required.
    Raises :class:`DataError` when the folder is empty or the stems of rgb / xyz
    (and gt when needed) do not match.
    """
    root = Path(root)
    folder = root / cls / split / defect
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    if need_gt is None:
        need_gt = split == "test" and defect != GOOD
    rgb = _stems(folder / "rgb", ".png")
    xyz = _stems(folder / "xyz", ".tiff")
    gt = _stems(folder / "gt", ".png")
    if not rgb and not xyz:
        raise DataError(f"{folder}: empty split (no rgb/*.png or xyz/*.tiff files)")
    groups = {"rgb/*.png": set(rgb), "xyz/*.tiff": set(xyz)}
    if need_gt:
        groups["gt/*.png"] = set(gt)
    if len({frozenset(s) for s in groups.values()}) > 1:
        raise DataError(f"{folder}: file stems do not match: {_describe_mismatch(groups)}")
    return [Sample(root, cls, split, defect, stem, rgb[stem], xyz[stem], gt.get(stem))
            for stem in sorted(rgb)]


def list_samples(root: str | os.PathLike, cls: str, split: str) -> list[Sample]:
    """All samples of a split of a class: ``train``/``validation`` read ``good``;
    ``test`` reads every defect type, sorted (SPEC 1.3 FIX)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = check_root(root)
    if not (root / cls).is_dir():
        raise DataError(f"{root / cls}: class folder not found; classes found: {find_classes(root) or 'none'}")
    if split == "test":
        types = defect_types(root, cls, split)
        if not types:
            raise DataError(f"{root / cls / split}: empty split (no defect-type folders)")
        return [s for t in types for s in samples_in(root, cls, split, t)]
    return samples_in(root, cls, split, GOOD)


# ----------------------------------------------------------------------------- point validity
def valid_mask(xyz: np.ndarray) -> np.ndarray:
    """Boolean mask of valid points: all three coordinates non-zero and finite (SPEC 1.2, KEEP #6)."""
    return np.all((xyz != 0) & np.isfinite(xyz), axis=-1)


def to_unorganized(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Valid points of an organised cloud (H, W, 3) and their row-major flat pixel indices."""
    flat = xyz.reshape(-1, 3)
    idx = np.flatnonzero(valid_mask(flat))
    return flat[idx], idx


# ----------------------------------------------------------------------------- ground truth
def load_gt_mask(sample: Sample, size: int = IMAGE_SIZE) -> np.ndarray:
    """Ground-truth mask at ``size``x``size`` as float32 {0, 1} (SPEC 1.4).

    Good samples get an all-zero mask (their gt files are ignored). Defect masks are
    resized with PIL nearest (pixel-centre convention, KEEP #7) and binarised at 0.5.
    """
    if sample.label == 0:
        return np.zeros((size, size), dtype=np.float32)
    if sample.gt is None:
        raise DataError(f"{sample.root / sample.relative / 'gt'}: no ground-truth mask for {sample.stem}")
    gt = read_gray(sample.gt)
    resized = np.asarray(Image.fromarray(gt).resize((size, size), Image.NEAREST))
    return ((resized.astype(np.float32) / 255.0) > 0.5).astype(np.float32)
