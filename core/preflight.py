"""What ``main.py`` checks before it loads a model or computes anything (SPEC 1.2-1.4, 3.3).

A run over ten classes spends minutes on memory building and alignment before it reads
its last test sample, so every input is checked first: the output folder can be written,
every training and test sample has its patch file (all missing files listed at once),
no patch file was cut from a TIFF that has changed since (its source record, SPEC 3.3),
and every ground-truth mask has the size of its RGB image and point cloud (SPEC 1.4).
Only headers and file metadata are read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from core.dataset import list_samples
from core.memory import MissingGridError
from core.patch_files import open_patch_manifest, stale_patch_file
from utils.errors import DataError
from utils.io import check_output_dir, read_image_shape, read_tiff_shape

_SHOWN = 8  # file stems listed per folder in a message


def _compact(paths: list[Path]) -> str:
    """``folder/{000,001,...}.npz`` per folder, at most :data:`_SHOWN` stems each."""
    folders: dict[Path, list[str]] = {}
    for p in paths:
        folders.setdefault(p.parent, []).append(p.stem)
    parts = []
    for folder, stems in folders.items():
        shown = ",".join(stems[:_SHOWN]) + (f",... (+{len(stems) - _SHOWN})" if len(stems) > _SHOWN else "")
        parts.append(f"{folder}/{{{shown}}}.npz" if len(stems) > 1 else f"{folder}/{stems[0]}.npz")
    return "; ".join(parts)


def _gt_size_error(sample) -> str | None:
    gt = read_image_shape(sample.gt)
    rgb = read_image_shape(sample.rgb)
    xyz = read_tiff_shape(sample.xyz)[:2]
    if gt == rgb == xyz:
        return None
    return (f"{sample.gt}: ground-truth mask is {gt[0]}x{gt[1]} but its rgb image is {rgb[0]}x{rgb[1]} and its "
            f"point cloud {xyz[0]}x{xyz[1]}; masks are not resized to fit, replace the mask (or rerun "
            f"tools/preprocessing.py on the raw data set, which pads all three alike)")


def check_run_inputs(datasets_path: str | os.PathLike, grid_path: str | os.PathLike, classes: Iterable[str],
                     output_dir: str | os.PathLike) -> None:
    """Raise a one-line :class:`DataError` for the first kind of problem found (module docstring)."""
    check_output_dir(output_dir, "--output_dir")
    grid_path = Path(grid_path)
    manifest = open_patch_manifest(grid_path, repair=False) if grid_path.is_dir() else None
    missing, stale = [], []
    for cls in classes:
        for split in ("train", "test"):
            for sample in list_samples(datasets_path, cls, split):
                grid = sample.grid_file(grid_path)
                if not grid.is_file():
                    missing.append(grid)
                    continue
                why = stale_patch_file(manifest, grid, sample.xyz) if manifest is not None else None
                if why:
                    stale.append(why)
                if sample.label == 1 and (error := _gt_size_error(sample)):
                    raise DataError(error)
    cut = f"python cut_patches.py --datasets_path {datasets_path} --save_grid_path {grid_path}"
    if missing:
        raise MissingGridError(f"{len(missing)} patch file(s) not found: {_compact(missing)}; run `{cut}` first")
    if stale:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise DataError(f"{stale[0]}{more}; run `{cut}` again: it recuts the files whose source changed")
