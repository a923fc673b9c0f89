"""Dual memory of one class (SPEC 6): SDF memory, foreground RGB memory, footprint table.

Every training sample is loaded and encoded in one batched pass
(:func:`load_sample_input`, :func:`core.inference.encode_sample`): all its patches go through the
PointNet encoder in one call (chunked for memory), its RGB image through the backbone
once, and the shifted footprints of all its patches (SPEC 5.1) come from one vectorised
call. :class:`MemoryBuilder` appends the sample in fit order ``t``:

* SDF memory: one 128-d latent per training patch (no coreset, SPEC 11 #20);
* RGB memory with **foreground subsampling**: the reference stores all 784 cells of every
  image at global rows ``t·784 + q`` and keeps the sorted unique rows referenced by some
  patch footprint, ``U``. Sample ``t``'s rows all lie in ``[t·784, t·784 + 783]``, so ``U``
  is the concatenation, in fit order, of each sample's sorted used cells: the builder keeps
  only those rows as it goes and never holds the full (T·784, D) matrix;
* footprint table: the footprint of SDF row ``j`` as rows of the subsampled RGB memory,
  i.e. ``origin[I_j]`` of SPEC 6, in CSR form (``fp_indptr``, ``fp_rows``).

The finished :class:`DualMemory` lives on the compute device for the whole class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.dataset import IMAGE_SIZE, Sample
from core.footprint import N_CELLS, union_cells
from core.patch_files import POINT_NUM, load_grid, normalize_patches
from core.rgb_features import read_rgb_resized, rgb_tensor
from utils.errors import DataError

# Patches per encoder call, by (device type, dtype), measured (SPEC 12.3). The float32 (B, 1024, 500)
# activation is 2 MB per patch; 4 patches (8 MB) was fastest on CPU (32-128 are slower: cache), and
# the float32 CPU chunk also fixes the kernels' shapes, hence the faithful path's bits. bfloat16
# halves the activation: on 2 cores 8 patches ran at 520 GFLOPS, 16 at 490, 32 at 460 (one core:
# 8-32 alike, 64 falls out of the cache). On CUDA large batches fill the GPU.
ENCODER_CHUNK = {("cpu", torch.float32): 4, ("cpu", torch.bfloat16): 8,
                 ("cuda", torch.float32): 512, ("cuda", torch.bfloat16): 512}


def chunk_size(table: dict, device: torch.device, dtype: torch.dtype) -> int:
    """The measured chunk of ``table`` for (``device``'s type, ``dtype``); the float32 CPU one otherwise."""
    return table.get((torch.device(device).type, dtype), table[("cpu", torch.float32)])


class MissingGridError(DataError):
    """A sample has no patch file: ``cut_patches.py`` has not been run for it."""


@dataclass
class SampleInput:
    """Everything the method reads of one sample (SPEC 8 "inputs per test sample")."""

    sample: Sample
    rgb: torch.Tensor      # (3, 224, 224) normalised image
    points: torch.Tensor   # (G, K, 3) per-patch normalised points (SPEC 3.4)
    pixels: torch.Tensor   # (G, K) int64 flat pixel indices in the 224x224 grid


@dataclass
class EncodedSample:
    """A sample after the two feature extractors, on the compute device."""

    input: SampleInput
    sdf_features: torch.Tensor  # (G, 128) PointNet latents, patch order of the grid file
    rgb_features: torch.Tensor  # (784, D) RGB features, row q = cell (q // 28, q % 28)
    fp_indptr: torch.Tensor     # (G + 1,) CSR of the patches' shifted footprints (SPEC 5.1)
    fp_cells: torch.Tensor      # (M,) cells in [0, 783]


@dataclass
class SampleFiles:
    """What :func:`read_sample_files` reads of one sample, as NumPy arrays (no torch)."""

    sample: Sample
    rgb: np.ndarray      # (224, 224, 3) uint8 after the bicubic resize
    points: np.ndarray   # (G, K, 3) float32 patch points as stored
    pixels: np.ndarray   # (G, K) int64 flat pixel indices


def read_sample_files(sample: Sample, grid_root: str | os.PathLike, point_num: int = POINT_NUM) -> SampleFiles:
    """Read and check a sample's RGB image and patch file (SPEC 3.3, 5): the I/O half of
    :func:`load_sample_input`, with no torch operation, so a reading thread can run it while the
    main thread computes (SPEC 12.3).

    Raises :class:`MissingGridError` when the patch file does not exist and
    :class:`DataError` for unreadable files or pixel indices outside the 224x224 grid.
    """
    grid = sample.grid_file(grid_root)
    if not grid.is_file():
        raise MissingGridError(
            f"{grid}: patch file of sample {sample.name} not found; run "
            f"`python cut_patches.py --datasets_path {sample.root} --save_grid_path {Path(grid_root)}` first")
    pts, pix = load_grid(grid, point_num)
    if pix.min() < 0 or pix.max() >= IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(f"{grid}: points_idx outside the {IMAGE_SIZE}x{IMAGE_SIZE} grid "
                        f"(range [{pix.min()}, {pix.max()}])")
    return SampleFiles(sample, read_rgb_resized(sample.rgb, IMAGE_SIZE), pts, pix)


def sample_input(files: SampleFiles, mean, std) -> SampleInput:
    """The tensors of a read sample: normalised image (SPEC 5) and per-patch normalised points (SPEC 3.4)."""
    return SampleInput(files.sample, rgb_tensor(files.rgb, mean, std),
                       normalize_patches(torch.from_numpy(files.points)), torch.from_numpy(files.pixels))


def load_sample_input(sample: Sample, grid_root: str | os.PathLike, mean, std,
                      point_num: int = POINT_NUM) -> SampleInput:
    """Read a sample's RGB image (SPEC 5) and patch file (SPEC 3.3, normalised as in 3.4):
    :func:`read_sample_files`, then :func:`sample_input`."""
    return sample_input(read_sample_files(sample, grid_root, point_num), mean, std)


def encode_patches(sdf_model, points: torch.Tensor, chunk: Optional[int] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PointNet latents (G, 128) float32 of normalised patches (G, K, 3), batched by ``chunk`` patches
    (default :data:`ENCODER_CHUNK`) in ``dtype`` (:meth:`core.sdf_model.PointNetEncoder.latents`)."""
    chunk = chunk or chunk_size(ENCODER_CHUNK, points.device, dtype)
    return sdf_model.encoder.latents(points, chunk, dtype)


@dataclass
class DualMemory:
    """The class's memory (SPEC 6), resident on one device."""

    sdf: torch.Tensor        # (N, 128) SDF memory M_sdf, one row per training patch, fit order
    rgb: torch.Tensor        # (R, D) foreground-subsampled RGB memory M_rgb
    fp_indptr: torch.Tensor  # (N + 1,) SDF row j owns fp_rows[fp_indptr[j]:fp_indptr[j+1]]
    fp_rows: torch.Tensor    # (M,) rows of ``rgb`` under each patch's shifted footprint (origin[I_j])
    sample_names: list[str]  # training samples in fit order
    patch_offsets: torch.Tensor  # (T + 1,) sample t owns SDF rows patch_offsets[t]:patch_offsets[t+1]

    def guided_rows(self, entries: torch.Tensor) -> torch.Tensor:
        """Shape-guided RGB rows (SPEC 8.2 step 3): sorted unique union of the footprints
        of the SDF memory rows in ``entries`` (any shape; duplicates allowed)."""
        return union_cells(self.fp_indptr, self.fp_rows, torch.unique(entries.reshape(-1)))


class MemoryBuilder:
    """Accumulates encoded training samples in fit order (SPEC 6) into a :class:`DualMemory`."""

    def __init__(self) -> None:
        self._sdf: list[torch.Tensor] = []
        self._rgb: list[torch.Tensor] = []
        self._fp_rows: list[torch.Tensor] = []
        self._fp_counts: list[torch.Tensor] = []
        self._names: list[str] = []
        self._patches: list[int] = []
        self._n_rgb = 0

    def add(self, enc: EncodedSample) -> None:
        """Append sample ``t = len(self)``: its latents, its used RGB cells and its footprints."""
        cells = enc.fp_cells
        used = torch.zeros(N_CELLS, dtype=torch.bool, device=cells.device)
        used[cells] = True
        used_cells = used.nonzero().squeeze(1)                     # sorted used cells of this image
        remap = torch.cumsum(used.long(), 0) - 1 + self._n_rgb      # cell -> row of the kept memory
        self._sdf.append(enc.sdf_features)
        self._rgb.append(enc.rgb_features[used_cells])
        self._fp_rows.append(remap[cells])
        self._fp_counts.append(enc.fp_indptr[1:] - enc.fp_indptr[:-1])
        self._names.append(enc.input.sample.name)
        self._patches.append(enc.sdf_features.shape[0])
        self._n_rgb += used_cells.numel()

    def __len__(self) -> int:
        return len(self._names)

    def build(self) -> DualMemory:
        if not self._names:
            raise DataError("cannot build a memory from zero training samples")
        counts = torch.cat(self._fp_counts)
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        offsets = torch.zeros(len(self._patches) + 1, dtype=torch.long)
        torch.cumsum(torch.tensor(self._patches), 0, out=offsets[1:])
        return DualMemory(torch.cat(self._sdf), torch.cat(self._rgb), indptr, torch.cat(self._fp_rows),
                          list(self._names), offsets)
