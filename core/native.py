"""Each test sample's native frame: maps and ground truth at the raw sample's own size (SPEC 9.2).

Preprocessing pads every sample to an L x L square (SPEC 2.1 step 4) and the method works on
224 x 224 maps. The official MVTec 3D-AD evaluation reads one map per test sample, of the raw
gt's size. A sample's :class:`NativeFrame` is its preprocessed size (L, L) with the padding
that made it: :func:`to_native` upsamples a 224 x 224 map bilinearly to L x L and crops the
padding off, for ``--save_maps`` and the native-protocol metrics alike; :func:`native_gt`
crops the preprocessed gt the same way, which gives the raw gt.

Where a sample's raw size comes from (:func:`resolve_frames`), in this order:

1. the preprocessing manifest ``<datasets_path>/.preprocessing_manifest.jsonl``, whose
   records hold each sample's raw (H, W) and padding (``tools/preprocessing.py`` writes them);
2. the raw sample's TIFF header under ``--raw_datasets_path``, padded by
   :func:`core.preprocessing.pad_widths` (data preprocessed by the authors' script);
3. neither: the frame is the preprocessed one (nothing cropped), labelled ``preprocessed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from core.dataset import Sample
from core.preprocessing import MANIFEST, pad_widths
from utils.errors import DataError
from utils.io import read_gray, read_tiff_shape
from utils.manifest import read_records
from utils.metrics import GroundTruthSet

FRAME_RAW = "raw"                     # maps and gt at each raw sample's size
FRAME_PREPROCESSED = "preprocessed"   # raw sizes unknown: the preprocessed (padded) size
FRAME_MIXED = "mixed"                 # some samples of a class in each frame

FROM_MANIFEST = "preprocessing manifest"
FROM_RAW = "raw data set"
FROM_NONE = "none"


@dataclass(frozen=True)
class NativeFrame:
    """A preprocessed sample's size and the padding preprocessing added to its raw sample."""

    size: tuple[int, int]                              # (L, L) of the preprocessed sample
    padding: tuple[tuple[int, int], tuple[int, int]]   # ((top, bottom), (left, right))
    source: str                                        # FROM_MANIFEST, FROM_RAW or FROM_NONE

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the native frame: the raw sample's size, or the preprocessed one."""
        (top, bottom), (left, right) = self.padding
        return self.size[0] - top - bottom, self.size[1] - left - right

    @property
    def frame(self) -> str:
        return FRAME_PREPROCESSED if self.source == FROM_NONE else FRAME_RAW

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The native part of an array of the preprocessed size (the padding cut off)."""
        if tuple(array.shape[:2]) != tuple(self.size):
            raise ValueError(f"crop: array of shape {array.shape}, expected {self.size}")
        (top, _), (left, _) = self.padding
        h, w = self.shape
        return array[top:top + h, left:left + w]


def to_native(m: np.ndarray, frame: NativeFrame) -> np.ndarray:
    """A 224 x 224 map in the native frame: bilinear (align_corners=False) to the preprocessed
    size, padding cropped off; float32."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=frame.size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return np.ascontiguousarray(frame.crop(up))


def native_gt(sample: Sample, frame: NativeFrame) -> np.ndarray:
    """The sample's ground truth in its native frame, bool (any non-zero gt value is anomalous,
    as the official evaluation reads it). A good sample without a gt file gets zeros."""
    if sample.gt is None:
        if sample.label == 0:
            return np.zeros(frame.shape, dtype=bool)
        raise DataError(f"{sample.root / sample.relative / 'gt'}: no ground-truth mask for {sample.stem}")
    gt = read_gray(sample.gt)
    if gt.shape != tuple(frame.size):
        raise DataError(f"{sample.gt}: ground truth is {gt.shape[0]}x{gt.shape[1]} but its xyz {sample.xyz} is "
                        f"{frame.size[0]}x{frame.size[1]}; the preprocessed files of a sample must share one size")
    return frame.crop(gt) != 0


def _frame(size: tuple[int, int], raw_shape: tuple[int, int], source: str, sample: Sample, where: str,
           fix: str, padding=None) -> NativeFrame:
    """The frame of a raw sample of ``raw_shape`` padded to ``size``; :class:`DataError` (ending in
    ``fix``) if that is not what SPEC 2.1 step 4 gives (``padding``: the recorded one, checked too)."""
    expected = pad_widths(*raw_shape)
    frame = NativeFrame(size, expected, source)
    if frame.shape != tuple(raw_shape) or (padding is not None and tuple(map(tuple, padding)) != expected):
        (t, b), (l, r) = expected
        raise DataError(f"{where}: a raw sample of {raw_shape[0]}x{raw_shape[1]} pads to "
                        f"{raw_shape[0] + t + b}x{raw_shape[1] + l + r} (SPEC 2.1 step 4), not to the "
                        f"{size[0]}x{size[1]} of {sample.xyz}"
                        + ("" if padding is None else f" with the recorded padding {padding}") + f"; {fix}")
    return frame


def resolve_frames(samples: Iterable[Sample], raw_root: Optional[str | os.PathLike] = None) -> list[NativeFrame]:
    """The native frame of every sample (module docstring: manifest, then ``raw_root``, then none).

    Raises :class:`DataError` when a recorded or raw size does not pad to the preprocessed
    size, or when ``raw_root`` lacks a sample or disagrees with the manifest.
    """
    records: dict[Path, dict] = {}
    frames = []
    for s in samples:
        root = Path(s.root)
        if root not in records:
            records[root] = read_records(root / MANIFEST)
        size = tuple(read_tiff_shape(s.xyz)[:2])
        key = s.xyz.relative_to(root).as_posix()
        record = records[root].get(key) or {}
        stats = record.get("stats", {}) if record.get("state") == "done" else {}
        frame = None
        if "raw_shape" in stats and "padding" in stats:
            frame = _frame(size, tuple(stats["raw_shape"]), FROM_MANIFEST, s, f"{root / MANIFEST} ({key})",
                           "the file changed after preprocessing; preprocess the raw sample again",
                           padding=stats["padding"])
        if raw_root is not None:
            raw_xyz = Path(raw_root) / key
            if not raw_xyz.is_file():
                raise DataError(f"{raw_xyz}: not found; --raw_datasets_path must be the raw data set that "
                                f"{root} was preprocessed from")
            raw_shape = tuple(read_tiff_shape(raw_xyz)[:2])
            if frame is not None and raw_shape != frame.shape:
                raise DataError(f"{raw_xyz}: the raw sample is {raw_shape[0]}x{raw_shape[1]} but {root / MANIFEST} "
                                f"records {frame.shape[0]}x{frame.shape[1]} for it; --raw_datasets_path must be "
                                f"the raw data set that {root} was preprocessed from")
            if frame is None:
                frame = _frame(size, raw_shape, FROM_RAW, s, str(raw_xyz),
                               f"--raw_datasets_path must be the raw data set that {root} was preprocessed from")
        frames.append(frame or NativeFrame(size, ((0, 0), (0, 0)), FROM_NONE))
    return frames


def class_frame(frames: list[NativeFrame]) -> str:
    """FRAME_RAW or FRAME_PREPROCESSED when all samples agree, else FRAME_MIXED."""
    kinds = {f.frame for f in frames}
    return kinds.pop() if len(kinds) == 1 else FRAME_MIXED


def frame_notice(datasets_path: str | os.PathLike) -> str:
    """What main.py says once when some raw sizes are unknown."""
    return (f"note: {Path(datasets_path) / MANIFEST} does not record the raw sizes of the samples (data "
            f"preprocessed elsewhere, or by an older version) and --raw_datasets_path was not given: the "
            f"--save_maps maps and the native-protocol metrics stay in the preprocessed (padded) frame and are "
            f"labelled so. Pass --raw_datasets_path RAW (the data set before preprocessing) to get them at the "
            f"raw sizes.")


def native_metrics(samples: list[Sample], frames: list[NativeFrame], maps: dict[str, np.ndarray]) -> dict:
    """Metrics of every method's (T, 224, 224) maps in the native frames (SPEC 9.2).

    The gt is read once; each method's native maps are made and consumed one sample at a
    time (:class:`utils.metrics.GroundTruthSet`), so memory stays at about one float32
    value per native pixel of the class. Returns ``{method: GroundTruthSet.evaluate(...)}``.
    """
    truth = GroundTruthSet(native_gt(s, f) for s, f in zip(samples, frames, strict=True))
    return {method: truth.evaluate(to_native(m, f) for m, f in zip(stack, frames, strict=True))
            for method, stack in maps.items()}
