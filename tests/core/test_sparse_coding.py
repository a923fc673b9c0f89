"""Batched OMP against scikit-learn's ``sparse_encode(algorithm='omp')`` (SPEC 8.1.3, 12.2, Appendix C.2)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from core.sparse_coding import omp, omp_reconstruct
from tools.authors_way.inference import sklearn_omp_reference

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
INTERMEDIATES = SHARED / "parity" / "expected" / "torus" / "intermediates.npz"


def _residual_norms(x, atoms, codes):
    recon = np.einsum("bk,bkd->bd", codes.astype(np.float64), atoms.astype(np.float64))
    return np.linalg.norm(x.astype(np.float64) - recon, axis=1)


def _merge_duplicates(atoms, codes):
    """Codes summed over groups of identical atoms (kept at the group's first index).

    Which of several identical atoms scikit-learn picks depends on the last bit of BLAS
    dot products of identical rows, so supports are compared modulo identical atoms.
    Without duplicates this is the identity.
    """
    same = (atoms[:, :, None, :] == atoms[:, None, :, :]).all(-1)
    first = same.argmax(2)
    merged = np.zeros_like(codes)
    np.add.at(merged, (np.arange(len(codes))[:, None], first), codes)
    return merged


def _compare(x, atoms, n_nonzero=3, code_tol=1e-5, res_tol=1e-5):
    """Assert equal supports, codes and residual norms between omp() and per-row sklearn."""
    ref = sklearn_omp_reference(x, atoms, n_nonzero)
    codes = omp(torch.from_numpy(x), torch.from_numpy(atoms), n_nonzero).numpy()
    assert codes.dtype == ref.dtype
    merged, merged_ref = _merge_duplicates(atoms, codes), _merge_duplicates(atoms, ref)
    np.testing.assert_array_equal(merged != 0, merged_ref != 0)
    np.testing.assert_allclose(merged, merged_ref, rtol=0, atol=code_tol)
    np.testing.assert_allclose(_residual_norms(x, atoms, codes), _residual_norms(x, atoms, ref), rtol=0, atol=res_tol)
    return codes, ref


@pytest.mark.parametrize("dim,k", [(128, 10), (768, 5)])
def test_random_nonnegative_float32(dim, k):
    rng = np.random.default_rng(dim)
    x = rng.random((300, dim), dtype=np.float32)
    atoms = rng.random((300, k, dim), dtype=np.float32)
    codes, _ = _compare(x, atoms)
    assert ((codes != 0).sum(1) == 3).all()


def test_float64_inputs_match_float64_sklearn_exactly():
    rng = np.random.default_rng(5)
    x = rng.random((100, 64))
    atoms = rng.random((100, 10, 64))
    _compare(x, atoms, code_tol=1e-12, res_tol=1e-12)


def test_real_features_nearest_neighbour_atoms():
    """Test-patch SDF features of the parity fixture, each coded over its 10 nearest other features.

    Near-neighbour atoms are strongly correlated, so scikit-learn's float32 arithmetic is off by
    up to ~1e-5; omp() (float64 solves) must agree with float64 scikit-learn to 1e-9.
    """
    feats = np.load(INTERMEDIATES)["sdf_features"][:600]
    f = torch.from_numpy(feats)
    dist = torch.cdist(f, f)
    dist.fill_diagonal_(float("inf"))
    atoms = feats[dist.topk(10, largest=False).indices.numpy()]
    # put an exact duplicate of each row's nearest atom at position 4
    atoms[::2, 4] = atoms[::2, 0]
    _compare(feats, atoms, code_tol=5e-5, res_tol=1e-5)
    _compare(feats.astype(np.float64), atoms.astype(np.float64), code_tol=1e-9, res_tol=1e-9)


def test_real_rgb_features_parity_backbone():
    """RGB features of the parity backbone: test cells coded over their 5 nearest training cells.

    After one or two atoms these residual correlations are close to the absolute threshold
    (alpha² ~ eps), so scikit-learn's float32 rounding decides a few rows: there the support
    may differ. Everywhere else the supports are equal and the residual norms (the anomaly
    scores) agree to 1e-5.
    """
    from core.rgb_features import build_rgb_extractor, load_rgb_input

    rgb = SHARED / "parity" / "preprocessed" / "torus"
    ext = build_rgb_extractor("wide_resnet50_2", weights=SHARED / "parity" / "rgb_backbone_wrn50_2.pth")
    paths = [rgb / "train" / "good" / "rgb" / f"00{i}.png" for i in (0, 1)] + [rgb / "test" / "crack" / "rgb" / "000.png"]
    feats = ext(torch.stack([load_rgb_input(p) for p in paths]))
    memory, test = feats[:2].reshape(-1, feats.shape[-1]), feats[2]
    atoms = memory[torch.cdist(test, memory).topk(5, largest=False).indices]
    x, atoms = test.numpy(), atoms.numpy()
    ref = sklearn_omp_reference(x, atoms)
    codes = omp(torch.from_numpy(x), torch.from_numpy(atoms)).numpy()
    same = ((codes != 0) == (ref != 0)).all(1)
    assert same.mean() >= 0.995
    assert len(set((ref != 0).sum(1).tolist())) > 1          # early stops do happen here
    np.testing.assert_allclose(_residual_norms(x, atoms, codes)[same], _residual_norms(x, atoms, ref)[same],
                               rtol=0, atol=1e-5)


def test_duplicate_atoms_random():
    rng = np.random.default_rng(7)
    x = rng.random((200, 128), dtype=np.float32)
    atoms = rng.random((200, 10, 128), dtype=np.float32)
    src = rng.integers(0, 10, size=(200, 3))
    dst = rng.integers(0, 10, size=(200, 3))
    for b in range(200):
        atoms[b, dst[b]] = atoms[b, src[b]]
    # queries lying in the span of duplicated atoms exercise the early stops
    rows = np.arange(50)
    x[:50] = atoms[rows, src[:50, 0]] * 2 + atoms[rows, src[:50, 1]]
    _compare(x, atoms)


def test_tie_broken_by_sklearn_swap_order():
    """Atoms [a, a, b, c]: after b (index 2) is swapped to the front, the working order is
    [b, a', a, c], so the tie a/a' goes to index 1, not 0 (hand-checked with scikit-learn)."""
    q = np.linalg.qr(np.random.default_rng(3).standard_normal((32, 32)))[0].astype(np.float32)
    atoms = np.stack([q[0], q[0], q[1], q[2]])[None]
    x = (3 * q[1] + q[0] + 0.5 * q[2])[None].astype(np.float32)
    codes, ref = _compare(x, atoms)
    np.testing.assert_allclose(codes[0], [0, 1, 3, 0.5], atol=1e-6)
    np.testing.assert_allclose(ref[0], [0, 1, 3, 0.5], atol=1e-6)


def test_zero_query_and_zero_atoms():
    rng = np.random.default_rng(11)
    x = rng.random((6, 32), dtype=np.float32)
    atoms = rng.random((6, 5, 32), dtype=np.float32)
    x[0] = 0                       # zero query
    atoms[1] = 0                   # all atoms zero
    atoms[2, [0, 3]] = 0           # some atoms zero
    x[3], atoms[3] = 0, 0          # both
    codes, _ = _compare(x, atoms)
    assert (codes[[0, 1, 3]] == 0).all()
    assert (codes[2, [0, 3]] == 0).all() and (codes[2] != 0).sum() == 3


def test_all_equal_atoms():
    rng = np.random.default_rng(13)
    a = rng.random((4, 1, 48), dtype=np.float32)
    atoms = np.repeat(a, 5, axis=1)
    x = rng.random((4, 48), dtype=np.float32)
    x[0] = 2 * a[0, 0]
    codes, _ = _compare(x, atoms)
    # exact arithmetic picks the first of the identical atoms
    assert ((codes != 0).sum(1) == 1).all() and (codes[:, 0] != 0).all()
    assert codes[0, 0] == pytest.approx(2.0, abs=1e-6)


def test_small_scale_early_stops():
    """Absolute thresholds: tiny features stop on alpha² < eps, slightly larger ones on the pivot."""
    rng = np.random.default_rng(17)
    x = rng.random((300, 768), dtype=np.float32)
    atoms = rng.random((300, 5, 768), dtype=np.float32)
    counts = set()
    for scale in (1e-3, 3e-3, 6e-3):
        codes, _ = _compare(x * np.float32(scale), atoms * np.float32(scale))
        counts |= set((codes != 0).sum(1).tolist())
    assert {0, 2, 3} <= counts


def test_fewer_atoms_than_nonzero_raises_like_sklearn():
    x = np.ones((2, 8), dtype=np.float32)
    atoms = np.ones((2, 2, 8), dtype=np.float32)
    with pytest.raises(ValueError):
        sklearn_omp_reference(x, atoms, 3)
    with pytest.raises(ValueError, match="exceeds the number of atoms"):
        omp(torch.from_numpy(x), torch.from_numpy(atoms), 3)
    # n_nonzero = K is allowed
    _compare(np.random.default_rng(0).random((4, 8), dtype=np.float32),
             np.random.default_rng(1).random((4, 2, 8), dtype=np.float32), n_nonzero=2)


def test_reconstruct_and_empty_batch():
    rng = np.random.default_rng(19)
    x = torch.from_numpy(rng.random((20, 16), dtype=np.float32))
    atoms = torch.from_numpy(rng.random((20, 10, 16), dtype=np.float32))
    codes, recon = omp_reconstruct(x, atoms)
    torch.testing.assert_close(codes, omp(x, atoms), rtol=0, atol=0)
    torch.testing.assert_close(recon, torch.einsum("bk,bkd->bd", codes, atoms), rtol=1e-6, atol=1e-6)
    assert recon.dtype == torch.float32
    c0, r0 = omp_reconstruct(x[:0], atoms[:0])
    assert c0.shape == (0, 10) and r0.shape == (0, 16)


@pytest.mark.cuda
def test_cuda_equals_cpu(accel_device):
    rng = np.random.default_rng(23)
    x = torch.from_numpy(rng.random((500, 128), dtype=np.float32))
    atoms = torch.from_numpy(rng.random((500, 10, 128), dtype=np.float32))
    codes_dev = omp(x.to(accel_device), atoms.to(accel_device))
    assert codes_dev.device.type == accel_device.type
    torch.testing.assert_close(codes_dev.cpu(), omp(x, atoms), rtol=0, atol=1e-6)
