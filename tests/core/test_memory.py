"""Dual memory (SPEC 6): batched per-sample build vs the reference's global construction."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from core.dataset import Sample, list_samples
from core.footprint import N_CELLS, footprints, patch_footprint
from core.memory import (EncodedSample, MemoryBuilder, MissingGridError, SampleInput, encode_patches,
                         load_sample_input, read_sample_files, sample_input)
from core.rgb_features import IMAGENET_MEAN, IMAGENET_STD
from core.sdf_model import load_sdf_checkpoint


def _fake_encoded(rng: np.random.Generator, name: str, n_patches: int, dim: int = 6) -> EncodedSample:
    """A sample with random latents, random RGB features and random compact patches."""
    centres = rng.integers(0, 224 * 224, size=n_patches)
    pix = (centres[:, None] + rng.integers(-600, 600, size=(n_patches, 50))).clip(0, 224 * 224 - 1)
    pixels = torch.from_numpy(pix.astype(np.int64))
    indptr, cells = footprints(pixels)
    sample = Sample(Path("."), "c", "train", "good", name, Path(f"{name}.png"), Path(f"{name}.tiff"))
    inp = SampleInput(sample, torch.zeros(3, 224, 224), torch.zeros(n_patches, 50, 3), pixels)
    return EncodedSample(inp, torch.from_numpy(rng.normal(size=(n_patches, 128)).astype(np.float32)),
                         torch.from_numpy(rng.normal(size=(N_CELLS, dim)).astype(np.float32)), indptr, cells)


def test_builder_equals_reference_global_construction():
    """Per-sample foreground subsampling == the reference's global t*784 indexing + unique + origin map."""
    rng = np.random.default_rng(0)
    encs = [_fake_encoded(rng, f"{i:03d}", n) for i, n in enumerate((7, 3, 11))]
    builder = MemoryBuilder()
    for e in encs:
        builder.add(e)
    mem = builder.build()

    # the reference's way (SPEC 6): all rows, global indices, sorted unique, origin remap
    full_rgb = torch.cat([e.rgb_features for e in encs])
    index_table = [t * N_CELLS + torch.from_numpy(patch_footprint(e.input.pixels[g].numpy()))
                   for t, e in enumerate(encs) for g in range(e.input.pixels.shape[0])]
    used = torch.unique(torch.cat(index_table))
    origin = torch.full((full_rgb.shape[0],), -1, dtype=torch.long)
    origin[used] = torch.arange(used.numel())

    assert torch.equal(mem.sdf, torch.cat([e.sdf_features for e in encs]))
    assert torch.equal(mem.rgb, full_rgb[used])
    assert mem.fp_indptr[-1] == mem.fp_rows.numel() and len(mem.fp_indptr) == len(index_table) + 1
    for j, idx in enumerate(index_table):
        assert torch.equal(mem.fp_rows[mem.fp_indptr[j]:mem.fp_indptr[j + 1]], origin[idx])
    assert mem.patch_offsets.tolist() == [0, 7, 10, 21]
    assert mem.sample_names == ["c/train/good/000", "c/train/good/001", "c/train/good/002"]

    # shape-guided rows (SPEC 8.2 step 3): union over the retrieved entries, per-entry loop
    entries = torch.tensor([[3, 0, 3], [20, 8, 0]])
    expected = torch.unique(torch.cat([origin[index_table[j]] for j in entries.flatten().tolist()]))
    assert torch.equal(mem.guided_rows(entries), expected)


def test_empty_builder_raises():
    with pytest.raises(ValueError, match="zero training samples"):
        MemoryBuilder().build()


def test_missing_grid_names_file_and_fix(parity_dir, tmp_path):
    sample = list_samples(parity_dir / "preprocessed", "torus", "train")[0]
    with pytest.raises(MissingGridError) as err:
        load_sample_input(sample, tmp_path / "grids", IMAGENET_MEAN, IMAGENET_STD)
    msg = str(err.value)
    assert str(tmp_path / "grids" / "torus" / "train" / "good" / "npz" / "000.npz") in msg
    assert "cut_patches.py" in msg


U32 = 2.0 ** -24     # float32 unit roundoff
SIGMAS = 8           # tolerance on |ours - ref|, in units of the predicted rms error B of ONE evaluation


@torch.no_grad()
def encoder_rounding_scale(encoder, points: torch.Tensor) -> torch.Tensor:
    """Predicted rms rounding error B (G, 128) of any float32 evaluation of the PointNet encoder.

    Random-walk model of float32 rounding, whatever the summation order, blocking or FMA use of
    the CPU's kernels (Higham & Mary, SIAM J. Sci. Comput. 2019): a K-term dot product (bias
    included) errs by about sqrt(K) u sum|w x|; an error already in the inputs passes through
    the weights in quadrature (sqrt(W^2 e^2)); BatchNorm's affine map (eval mode, a = g / sqrt(v + eps),
    x a + (beta - mean a)) adds about 3 u (|a x| + |beta| + |mean a|); ReLU and max pooling
    never enlarge an error. Two evaluations (ours, the reference's) then differ by about sqrt(2) B.
    """
    def linear(x, e, weight, bias):
        w = weight.reshape(weight.shape[0], -1)
        k = w.shape[1] + 1
        return (x @ w.T + bias, torch.sqrt((e * e) @ (w * w).T
                                           + (k ** 0.5 * U32 * (x.abs() @ w.abs().T + bias.abs())) ** 2))

    def batch_norm(x, e, bn):
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.running_mean * a
        y = x * a + (bn.bias - shift)
        return y.clamp_min(0), torch.sqrt((e * a) ** 2 + (3 * U32 * (y.abs() + bn.bias.abs() + shift.abs())) ** 2)

    x = points.float()                       # (G, P, 3): channels last, so 1x1 convolutions are matmuls
    e = torch.zeros_like(x)
    for conv, bn in ((encoder.conv1, encoder.bn1), (encoder.conv2, encoder.bn2), (encoder.conv3, encoder.bn3)):
        x, e = batch_norm(*linear(x, e, conv.weight, conv.bias), bn)
    x, e = x.amax(dim=1), e.amax(dim=1)      # |max(a) - max(b)| <= max|a - b|
    for fc, bn in ((encoder.fc1, encoder.bn4), (encoder.fc2, encoder.bn5)):
        x, e = batch_norm(*linear(x, e, fc.weight, fc.bias), bn)
    return e


def test_encoder_features_match_reference_and_chunking(parity_dir):
    """Batched and one-patch-per-call encoder vs the reference's recorded features, within the float32
    rounding that separates any two evaluations (the CPU's kernels decide the last bits, not the code)."""
    inter = np.load(parity_dir / "expected" / "torus" / "intermediates.npz")
    rows = list(inter["sample_paths"])
    sample = next(s for s in list_samples(parity_dir / "preprocessed", "torus", "test") if s.defect == "bump")
    r = rows.index("torus/test/bump/rgb/000.png")
    ref = torch.from_numpy(inter["sdf_features"][inter["patch_offsets"][r]:inter["patch_offsets"][r + 1]][:24])
    model, _ = load_sdf_checkpoint(parity_dir / "sdf_checkpoint.pth")
    inp = load_sample_input(sample, parity_dir / "grids", IMAGENET_MEAN, IMAGENET_STD)
    points = inp.points[:24]
    scale = encoder_rounding_scale(model.encoder, points)
    # the prediction itself is small: a wrong patch, order or normalisation moves features by far more
    assert scale.max() < 2e-4 * ref.abs().max()
    with torch.no_grad():
        chunked = encode_patches(model, points, chunk=10)               # 10 + 10 + 4 patches
        single = torch.cat([model.encoder(points[g:g + 1]) for g in range(24)])
    for ours in (chunked, single):
        assert ((ours - ref).abs() <= SIGMAS * scale).all(), float(((ours - ref).abs() / scale).max())
    assert torch.equal(chunked[10:20], encode_patches(model, points[10:20], chunk=10))   # same call, same bits


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_reading_a_sample_starts_no_torch_threads(parity_dir):
    """SPEC 12.3: the reading half of loading runs in a thread without any torch operation, so no second
    OpenMP pool competes with the computation; the torch half equals load_sample_input's result."""
    sample = next(s for s in list_samples(parity_dir / "preprocessed", "torus", "test") if s.defect == "bump")
    torch.ones(1 << 20).mul_(2)                       # the main thread's pool exists already

    def threads_after(fn, *args):                     # counted inside the reading thread, whose own
        return fn(*args), len(os.listdir("/proc/self/task"))   # OpenMP pool would live as long as it

    def run_in_thread(fn, *args):
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(threads_after, fn, *args).result()

    _, baseline = run_in_thread(lambda: None)
    files, reading = run_in_thread(read_sample_files, sample, parity_dir / "grids")
    assert reading == baseline
    if torch.get_num_threads() > 1:                   # the check can fail: a torch op in the thread adds its pool
        assert run_in_thread(load_sample_input, sample, parity_dir / "grids", IMAGENET_MEAN, IMAGENET_STD)[1] > baseline
    assert isinstance(files.points, np.ndarray) and files.rgb.dtype == np.uint8 and files.rgb.shape == (224, 224, 3)
    inp = sample_input(files, IMAGENET_MEAN, IMAGENET_STD)
    ref = load_sample_input(sample, parity_dir / "grids", IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(inp.points, ref.points) and torch.equal(inp.rgb, ref.rgb) and torch.equal(inp.pixels, ref.pixels)
