"""Converting the Eyecandies release into the MVTec 3D-AD layout (SPEC 1.2) that the four scripts read.

For every sample of ``train``, ``val`` and ``test_public`` (``test_private`` has no ground
truth and is skipped) this writes, under ``OUT/<Class>/``:

* ``train/good`` and ``validation/good`` (from ``val``): ``rgb/NNN.png`` (the ``image_<light>``
  lighting) and ``xyz/NNN.tiff`` (the camera-frame cloud of :mod:`tools.eyecandies.release`);
* ``test/<type>`` with ``rgb``, ``xyz`` and ``gt/NNN.png`` (255 where anomalous): ``good`` for
  samples without anomaly (all-zero gt), ``bumps``, ``dents``, ``colors`` or ``normals`` for a
  sample with one anomaly type, ``combined`` for several.

``RAW`` is only read. Each sample's files are staged beside their targets and committed
together through the manifest ``OUT/.eyecandies_manifest.jsonl`` (:mod:`utils.manifest`), so
an interrupted run leaves no half-written file and a rerun skips finished samples; a rerun
with another ``--light`` is refused. Workers run through :func:`utils.pool.ordered_map` and
write the same bytes as one worker.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from core.dataset import GOOD
from tools.eyecandies.release import (DEFAULT_LIGHT, LIGHTS, MASK_TYPES, PRIVATE, SPLITS, ReleaseSample,
                                      anomaly_type, backproject, discover, read_depth)
from utils.errors import ConfigError, DataError
from utils.io import disjoint_roots, read_gray, read_rgb, write_png, write_xyz
from utils.manifest import Manifest, stage_files
from utils.pool import ordered_map

MANIFEST = ".eyecandies_manifest.jsonl"
TMP_SUFFIX = ".eyecandies-tmp"


@dataclass
class ConvertConfig:
    """Options of ``tools/prepare_eyecandies.py``."""

    raw: Path
    out: Path
    light: int = DEFAULT_LIGHT
    classes: Optional[list[str]] = None
    workers: int = 1


@dataclass
class ConvertSummary:
    """What a run did: converted samples per ``(class, split, type)`` and what it skipped."""

    out: Path
    converted: Counter = field(default_factory=Counter)
    skipped: int = 0                 # finished by an earlier run
    recovered: int = 0               # interrupted commits completed
    private: dict = field(default_factory=dict)
    missing_val: list = field(default_factory=list)
    totals: Counter = field(default_factory=Counter)   # every converted sample in OUT, by folder

    def report(self) -> str:
        lines = [f"converted {sum(self.converted.values())} sample(s) into {self.out}; {self.skipped} already "
                 f"done (manifest), {self.recovered} interrupted commit(s) completed"]
        for (cls, split, kind), n in sorted(self.totals.items()):
            lines.append(f"  {cls}/{split}/{kind}: {n}")
        skipped = {c: n for c, n in self.private.items() if n}
        if skipped:
            lines.append(f"skipped {PRIVATE} (no ground truth): "
                         + ", ".join(f"{c} {n}" for c, n in skipped.items()))
        if self.missing_val:
            lines.append(f"no val split in: {', '.join(self.missing_val)} (validation/good not written)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    sample: ReleaseSample
    out: Path
    light: int


def _same_size(sample: ReleaseSample, shape: tuple, arrays: dict) -> None:
    for item, arr in arrays.items():
        if arr.shape[:2] != shape:
            raise DataError(f"{sample.file(item)}: {arr.shape[1]}x{arr.shape[0]} pixels, but the depth map "
                            f"{sample.file('depth')} has {shape[1]}x{shape[0]}")


def convert_sample(sample: ReleaseSample, light: int = DEFAULT_LIGHT) -> tuple[str, dict[str, np.ndarray]]:
    """``(type, {"rgb", "xyz", "gt"})`` of one sample: ``type`` the converted test folder (``good``
    outside ``test_public``); ``gt`` only for test samples."""
    depth = read_depth(sample.file("depth"), sample.file("info_depth", "yaml"))
    image = f"image_{light}"
    arrays = {image: read_rgb(sample.file(image))}
    is_test = SPLITS[sample.split][1]
    if is_test:
        arrays.update({f"{t}_mask": read_gray(sample.file(f"{t}_mask")) for t in MASK_TYPES})
        if "mask.png" in sample.files:
            arrays["mask"] = read_gray(sample.file("mask"))
    _same_size(sample, depth.shape, arrays)
    out = {"rgb": arrays[image], "xyz": backproject(depth)}
    kind = GOOD
    if is_test:
        masks = {t: arrays[f"{t}_mask"] for t in MASK_TYPES}
        kind = anomaly_type(masks)
        union = np.any([m > 0 for m in masks.values()], axis=0)
        if "mask" in arrays:
            if arrays["mask"].any() and not union.any():
                raise DataError(f"{sample.file('mask')}: marks anomalous pixels, but every type mask of "
                                f"sample {sample.key} is empty, so its anomaly type is unknown")
            union |= arrays["mask"] > 0
        out["gt"] = union.astype(np.uint8) * 255
    return kind, out


def _targets(job: _Job, kind: str) -> dict[str, Path]:
    s = job.sample
    folder = job.out / s.cls / SPLITS[s.split][0] / kind
    names = {"rgb": f"rgb/{s.stem}.png", "xyz": f"xyz/{s.stem}.tiff", "gt": f"gt/{s.stem}.png"}
    return {k: folder / v for k, v in names.items() if k != "gt" or SPLITS[s.split][1]}


def _run_job(job: _Job) -> dict:
    """Worker: convert one sample and stage its files (never renames)."""
    kind, arrays = convert_sample(job.sample, job.light)
    writers = {"rgb": write_png, "xyz": write_xyz, "gt": write_png}
    files = stage_files([(target, lambda tmp, k=k: writers[k](tmp, arrays[k]))
                         for k, target in _targets(job, kind).items()], TMP_SUFFIX)
    return dict(key=job.sample.key, kind=kind, files=files)


def _discard_stale_staging(out: Path) -> None:
    """Staging files left by an interrupted run whose commits are all resolved are garbage."""
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                Path(dirpath, name).unlink(missing_ok=True)


def convert(cfg: ConvertConfig, progress: bool = True) -> ConvertSummary:
    """What ``tools/prepare_eyecandies.py`` runs (module docstring); :class:`DataError` /
    :class:`ConfigError` for bad input, before any file is written where possible."""
    if cfg.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.light not in range(len(LIGHTS)):
        raise ConfigError(f"--light must be 0 ... {len(LIGHTS) - 1} (image_0 ... image_5), got {cfg.light}")
    raw, out = Path(cfg.raw), Path(cfg.out)
    disjoint_roots(raw, out)
    release = discover(raw, cfg.classes, cfg.light)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out, MANIFEST, TMP_SUFFIX)
    lights = {r.get("light") for r in manifest.records.values()}
    if lights - {cfg.light}:
        raise ConfigError(f"{out}: converted with --light {sorted(lights)[0]} before; pass the same --light "
                          f"to resume, or another output folder")
    summary = ConvertSummary(out, private=release.private, missing_val=release.missing_val)
    pending = []
    for sample in release.samples:
        state, _ = manifest.resume(sample.key)
        if state == "done":
            summary.skipped += 1
        elif state == "recovered":
            summary.recovered += 1
        else:   # todo, missing, failed: RAW is untouched, so convert it (again)
            pending.append(_Job(sample, out, cfg.light))
    _discard_stale_staging(out)
    by_key = {job.sample.key: job.sample for job in pending}
    with tqdm(total=len(pending), desc="eyecandies", unit="sample", disable=not progress) as bar:
        for result in ordered_map(_run_job, pending, cfg.workers):
            sample = by_key[result["key"]]
            manifest.commit(result["key"], result["files"], light=cfg.light, type=result["kind"])
            summary.converted[(sample.cls, SPLITS[sample.split][0], result["kind"])] += 1
            bar.update()
    for sample in release.samples:
        record = manifest.records[sample.key]
        summary.totals[(sample.cls, SPLITS[sample.split][0], record.get("type", GOOD))] += 1
    return summary
