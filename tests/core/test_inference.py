"""Batched shape-guided inference (SPEC 8) vs per-point / per-patch / per-row reference computations."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from core.dataset import list_samples
from core.inference import _neighbours, _sparse_reconstruct, encode_sample, predict, scatter_min_map
from core.memory import MemoryBuilder, SampleInput, load_sample_input
from core.rgb_features import build_rgb_extractor
from core.sdf_model import load_sdf_checkpoint
from tools.authors_way.inference import agreement, authors_predict
from utils.blur import blur_map


def test_scatter_min_equals_point_loop():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 3000, size=(40, 50))           # many collisions, most pixels untouched
    values = rng.random((40, 50)).astype(np.float32) + 0.01
    expected = np.zeros(224 * 224)
    for v, p in zip(values.ravel(), pixels.ravel()):
        if expected[p] == 0 or expected[p] > v:
            expected[p] = v
    got = scatter_min_map(torch.from_numpy(values), torch.from_numpy(pixels))
    assert got.dtype == torch.float64 and got.shape == (224, 224)
    np.testing.assert_array_equal(got.numpy().ravel(), expected)


def test_neighbours_sorted_topk_and_modes():
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.normal(size=(30, 16)).astype(np.float32))
    pool = torch.from_numpy(rng.normal(size=(200, 16)).astype(np.float32))
    order = torch.argsort(torch.cdist(q, pool), dim=1)      # no ties in random data
    assert torch.equal(_neighbours(q, pool, 10, "testing"), order[:, :10])
    assert torch.equal(_neighbours(q, pool, 10, "alignment"), order[:, 1:11])
    assert torch.equal(_neighbours(q, pool[:8], 10, "testing"), order_small := torch.argsort(torch.cdist(q, pool[:8]), 1))
    assert torch.equal(_neighbours(q, pool[:8], 10, "alignment"), order_small[:, 1:])
    with pytest.raises(ValueError, match="mode"):
        _neighbours(q, pool, 10, "test")


def test_sparse_reconstruct_equals_sparse_encode_on_tensors():
    """The reference hands torch tensors to sparse_encode, which then works in float64: a residual
    correlation below float32's epsilon (but above float64's) does NOT stop OMP there."""
    from sklearn.decomposition import sparse_encode

    rng = np.random.default_rng(3)
    base = (rng.random((5, 64)) * 0.05 + 0.05).astype(np.float32)   # small features: tiny correlations
    atoms = np.stack([base + rng.normal(scale=s, size=base.shape).astype(np.float32) * base
                      for s in (1e-2, 1e-3, 1e-4)] * 20)          # near-collinear neighbour atoms
    x = (base[None] + rng.normal(scale=1e-3, size=(60, 5, 64)) * base).astype(np.float32)[:, 0]
    x, atoms = torch.from_numpy(x), torch.from_numpy(atoms)
    recon, err = _sparse_reconstruct(x, atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        codes = [sparse_encode(X=x[b].view(1, -1), dictionary=atoms[b], algorithm="omp", n_nonzero_coefs=3)
                 for b in range(len(x))]
        codes32 = [sparse_encode(X=x[b:b + 1].numpy(), dictionary=atoms[b].numpy(), algorithm="omp",
                                 n_nonzero_coefs=3) for b in range(len(x))]
    ref = torch.cat([torch.Tensor(c) @ a for c, a in zip(codes, atoms)])
    np.testing.assert_allclose(recon.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(err.numpy(), torch.nn.functional.pairwise_distance(x, ref, eps=1e-12).numpy(),
                               rtol=1e-4, atol=1e-7)
    # the float32 path would have taken different (shorter) supports on some rows
    assert any((c32 != 0).sum() != (c != 0).sum() for c32, c in zip(codes32, codes))


@pytest.fixture(scope="module")
def parity_parts(parity_dir):
    """Two parity training samples (90 patches each), a 40-patch test sample, the models."""
    model, _ = load_sdf_checkpoint(parity_dir / "sdf_checkpoint.pth")
    rgb = build_rgb_extractor(weights=parity_dir / "rgb_backbone_wrn50_2.pth")
    root, grids = parity_dir / "preprocessed", parity_dir / "grids"

    def cut(inp, n):
        return SampleInput(inp.sample, inp.rgb, inp.points[:n], inp.pixels[:n])

    train = list_samples(root, "torus", "train")
    train_inputs = [cut(load_sample_input(s, grids, rgb.mean, rgb.std), 90) for s in (train[6], train[2])]
    test = next(s for s in list_samples(root, "torus", "test") if s.defect == "crack")
    inp = cut(load_sample_input(test, grids, rgb.mean, rgb.std), 40)
    return model, rgb, train_inputs, inp, torch.device("cpu")


def _memory(parts, shift=2):
    model, rgb, train_inputs, _, device = parts
    builder = MemoryBuilder()
    for t in train_inputs:
        builder.add(encode_sample(t, model, rgb, device, shift=shift))
    return builder.build()


@pytest.fixture(scope="module")
def small_parity_memory(parity_parts):
    """A memory from two parity training samples, 90 patches each, and a 40-patch test sample."""
    model, rgb, _, inp, device = parity_parts
    return _memory(parity_parts), model, rgb, inp, device


MAP_RTOL, MAP_ATOL = 1e-4, 1e-6   # unblurred maps: float32 rounding of batched vs per-patch calls


@pytest.mark.parametrize("mode", ["testing", "alignment"])
def test_batched_predict_equals_authors_way(small_parity_memory, mode):
    memory, model, rgb, inp, device = small_parity_memory
    w, b = np.float32(0.07), np.float32(4e-4)
    times: dict = {}
    ours = predict(memory, model, encode_sample(inp, model, rgb, device, times), mode, w, b, times)
    ref = authors_predict(memory, model, rgb, inp, device, mode, w, b)
    assert set(times) == {"sdf_encode", "rgb_features", "sdf_knn_omp", "sdf_decoder", "rgb_knn_omp", "blur_fusion"}
    np.testing.assert_allclose(ours.sdf_features, ref["sdf_features"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.patch_scores, ref["patch_scores"], rtol=1e-4, atol=1e-6)
    maps = [("sdf_map", ours.sdf_map), ("rgb_map", ours.rgb_map)] + [("fused_map", ours.fused_map)] * (mode == "testing")
    for key, m in maps:
        np.testing.assert_allclose(m, ref[key], rtol=MAP_RTOL, atol=MAP_ATOL, err_msg=key)
    np.testing.assert_allclose(ours.rgb_map_28, ref["rgb_map_28"], rtol=MAP_RTOL, atol=MAP_ATOL)
    assert (ours.sdf_map > 0).sum() == (ref["sdf_map"] > 0).sum() > 1000
    assert (ours.rgb_map_28 > 0).sum() > 100
    diff = agreement(ours, ref)
    assert diff["score_rel"] < 1e-5
    # Blurred maps, in integer levels: maps within MAP_RTOL/MAP_ATOL of each other give 8-bit inputs at most
    # quant_bound apart (|m/M - m'/M'| <= 2 (atol + rtol M) / M, then truncation adds one level), and the
    # blurred levels may differ only as far as level_difference_bound allows (exact, any CPU).
    quant_bound = 1 + int(255 * 2 * (MAP_RTOL + MAP_ATOL / min(m.max() for _, m in maps)))
    assert quant_bound == 1 and diff["quant_levels"] <= quant_bound and diff["blur_excess"] <= 0
    if mode == "testing":
        assert ours.score == np.float32(ours.sdf_score * ours.rgb_score)
        assert ours.fused_map.dtype == np.float64 and ours.aligned_map.min() >= 0
        np.testing.assert_array_equal(ours.fused_map, np.maximum(ours.aligned_map, ours.sdf_map))
    else:
        assert ours.score is None and ours.fused_map is None


def test_testing_mode_needs_alignment(small_parity_memory):
    memory, model, rgb, inp, device = small_parity_memory
    with pytest.raises(ValueError, match="weight and bias"):
        predict(memory, model, encode_sample(inp, model, rgb, device), "testing")


# ----------------------------------------------------------------------------- method flags (SPEC 13)
W, B = np.float32(0.07), np.float32(4e-4)
NON_DEFAULT = dict(k_sdf=4, k_rgb=3, n_nonzero=2, blur_radius=2.5)


def _first_patches(inp, n):
    return SampleInput(inp.sample, inp.rgb, inp.points[:n], inp.pixels[:n])


@pytest.fixture(scope="module")
def shift1(parity_parts):
    """The memory and a 12-patch test sample encoded with footprint shift 1 (and shift 2)."""
    model, rgb, _, inp, device = parity_parts
    inp = _first_patches(inp, 12)   # the authors' per-patch decoder is slow
    return (_memory(parity_parts, shift=1), encode_sample(inp, model, rgb, device, shift=1),
            encode_sample(inp, model, rgb, device), inp)


def test_method_flags_equal_the_authors_code_with_its_constants_replaced(parity_parts, shift1):
    model, rgb, _, _, device = parity_parts
    memory, enc, _, inp = shift1
    ours = predict(memory, model, enc, "testing", W, B, **NON_DEFAULT)
    ref = authors_predict(memory, model, rgb, inp, device, "testing", W, B, shift=1, **NON_DEFAULT)
    diff = agreement(ours, ref)
    assert diff["score_rel"] < 1e-5 and diff["blur_levels"] <= 1.0 + 1e-6, diff
    np.testing.assert_allclose(ours.patch_scores, ref["patch_scores"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.rgb_map_28, ref["rgb_map_28"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.sdf_map, ref["sdf_map"], rtol=1e-4, atol=1e-6)


def _spy_omp(monkeypatch):
    """Record (atoms per query, n_nonzero) of every batched OMP call of core.inference."""
    import core.inference as inference

    calls, real = [], inference.omp
    monkeypatch.setattr(inference, "omp", lambda x, atoms, n: calls.append((atoms.shape[1], n)) or real(x, atoms, n))
    return calls


@pytest.mark.parametrize("flag", sorted(NON_DEFAULT))
def test_a_method_flag_reaches_the_computation(small_parity_memory, shift1, monkeypatch, flag):
    """One non-default value: OMP sees that many neighbours / atoms, and exactly the outputs
    that the value acts on change."""
    memory, model, *_ = small_parity_memory
    enc = shift1[2]
    default = predict(memory, model, enc, "testing", W, B)
    calls = _spy_omp(monkeypatch)
    ours = predict(memory, model, enc, "testing", W, B, **{flag: NON_DEFAULT[flag]})
    expected = {"k_sdf": 10, "k_rgb": 5, "n_nonzero": 3, flag: NON_DEFAULT[flag]}
    assert calls == [(expected["k_sdf"], expected["n_nonzero"]), (expected["k_rgb"], expected["n_nonzero"])]

    def changed(key):
        return not np.array_equal(getattr(ours, key), getattr(default, key))

    # k_sdf also changes the shape-guided RGB pool (the retrieved patches' footprints), so its
    # RGB map may change too; k_rgb never touches the SDF branch; the radius only the blurred maps
    if flag in ("k_sdf", "n_nonzero"):
        assert changed("patch_scores") and changed("sdf_map")
    if flag in ("k_rgb", "n_nonzero"):
        assert changed("rgb_map_28") and changed("rgb_map_blur")
    if flag == "k_rgb":
        assert not changed("patch_scores") and not changed("sdf_map_blur")
    if flag == "blur_radius":
        assert not changed("sdf_map") and not changed("rgb_map") and not changed("fused_map")
        assert changed("sdf_map_blur") and changed("rgb_map_blur") and changed("fused_map_blur")
        np.testing.assert_array_equal(ours.sdf_map_blur, blur_map(ours.sdf_map, 2.5))


def test_footprint_shift_reaches_memory_and_test_sample(small_parity_memory, shift1):
    """--footprint_shift 1: every footprint of the test sample is the shift-1 set, the memory keeps
    other RGB cells, and only the RGB branch changes."""
    memory2, model, *_ = small_parity_memory
    memory1, enc1, enc2, inp = shift1
    for g in range(inp.pixels.shape[0]):
        cells = {int(p) // 224 // 8 * 28 + int(p) % 224 // 8 for p in inp.pixels[g]}
        shifted = [c + d for c in cells for d in (1, -1, 28, -28)]
        # the reference's clipping: negatives -> the current maximum, then > 783 -> the current minimum
        shifted = [max(shifted) if v < 0 else v for v in shifted]
        shifted = [min(shifted) if v > 783 else v for v in shifted]
        assert enc1.fp_cells[enc1.fp_indptr[g]:enc1.fp_indptr[g + 1]].tolist() == sorted(set(shifted))
    assert memory1.rgb.shape[0] != memory2.rgb.shape[0]
    ours, default = predict(memory1, model, enc1, "testing", W, B), predict(memory2, model, enc2, "testing", W, B)
    assert not np.array_equal(ours.rgb_map_28, default.rgb_map_28)
    np.testing.assert_array_equal(ours.patch_scores, default.patch_scores)   # the SDF branch is untouched
