"""The CUDA code paths against the CPU (``pytest -m cuda``; skipped without a CUDA device).

``SHAPE_GUIDED_TEST_DEVICE=cpu`` runs the same tests on the CPU (CPU against CPU), which is the
device check's dry run. Each test records what it measured (differences, peak GPU memory) for
``tools/device_check.py`` through the ``record`` fixture.

Bounds (float32 unit roundoff u = 2**-24 ~ 6e-8; TF32 keeps 10 mantissa bits, u_tf32 = 2**-11 ~ 5e-4):
a length-K dot product computed in another order differs by at most ~K u sum|a_i b_i|, so a
network of 1x1 convolutions and linear layers up to K = 1024 moves its outputs by at most about
1e-4 of their largest value in strict float32 (FP32_BOUND), and by about u_tf32 per layer, a
few 1e-3 over the network, with TF32 inputs (TF32_BOUND = 2e-2, margin for ten layers).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from core.grouping import fps_start, group_patches, load_cloud, patch_count
from core.patch_files import load_grid, normalize_patches
from core.sdf_model import SDFModel, load_sdf_checkpoint
from core.sdf_training import PretrainSet, epoch_batches, pcp_loss
from core.sparse_coding import omp
from tests.core.patch_data import RNG_TABLE
from tests.core.test_sdf_training import write_pretrain
from tools.authors_way.inference import sklearn_omp_reference

pytestmark = pytest.mark.cuda

FP32_BOUND = 1e-4
TF32_BOUND = 2e-2


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class _Precision:
    """Strict float32 (``tf32=False``) or TF32 matrix products and convolutions on CUDA, restored after."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_fps_and_knn_on_device_give_the_authors_patch_files(parity_dir, accel_device, record):
    """FPS + kNN on the device reproduce the authors' grid files of the parity fixture exactly,
    as the CPU path does (same float32 distance rounding; ties ordered by the reference's argsort)."""
    _reset_peak(accel_device)
    for draw, (rel, n, count, _) in enumerate(RNG_TABLE[:3]):
        points, pixels, _ = load_cloud(parity_dir / "preprocessed" / "torus" / rel)
        assert len(points) == n and patch_count(n) == count
        start = fps_start(0, draw, n)
        ours_pts, ours_idx = group_patches(points, pixels, count, start, device=accel_device)
        ref_pts, ref_idx = load_grid(parity_dir / "grids" / "torus" / rel.replace("xyz", "npz").replace(".tiff", ".npz"))
        np.testing.assert_array_equal(ours_idx, ref_idx)
        np.testing.assert_array_equal(ours_pts, ref_pts)
    record(device=str(accel_device), clouds=3, identical=True, peak_gpu_mib=_peak_mib(accel_device))


@pytest.fixture(scope="module")
def parity_model(parity_dir):
    model, _ = load_sdf_checkpoint(parity_dir / "sdf_checkpoint.pth")
    pts, _ = load_grid(parity_dir / "grids" / "torus" / "test" / "good" / "npz" / "000.npz")
    return model, normalize_patches(torch.from_numpy(pts))


@pytest.mark.parametrize("tf32, bound", [(False, FP32_BOUND), (True, TF32_BOUND)])
def test_encoder_and_decoder_on_device_within_the_float_bound(parity_model, accel_device, record, tf32, bound):
    model, patches = parity_model
    with torch.no_grad():
        cpu_feats = model.encoder(patches)
        cpu_sdf = model.NIF.abs_sdf(cpu_feats, patches, 8)
        dev = copy.deepcopy(model).to(accel_device)
        _reset_peak(accel_device)
        with _Precision(tf32):
            feats = dev.encoder(patches.to(accel_device))
            sdf = dev.NIF.abs_sdf(feats, patches.to(accel_device), 512)
    enc, dec = _rel(feats, cpu_feats), _rel(sdf, cpu_sdf)
    record(device=str(accel_device), tf32=tf32, encoder_rel=enc, decoder_rel=dec, bound=bound,
           patches=len(patches), peak_gpu_mib=_peak_mib(accel_device))
    assert enc <= bound and dec <= bound, (enc, dec)
    assert cpu_feats.abs().max() > 0 and cpu_sdf.std() > 1e-3           # non-trivial outputs


def test_batched_omp_on_device_equals_scikit_learn(accel_device, record):
    rng = np.random.default_rng(29)
    x = rng.random((300, 128), dtype=np.float32)
    atoms = rng.random((300, 10, 128), dtype=np.float32)
    _reset_peak(accel_device)
    codes = omp(torch.from_numpy(x).double().to(accel_device), torch.from_numpy(atoms).double().to(accel_device))
    ref = sklearn_omp_reference(x.astype(np.float64), atoms.astype(np.float64))
    codes = codes.cpu().numpy()
    record(device=str(accel_device), rows=len(x), max_abs=float(np.abs(codes - ref).max()),
           peak_gpu_mib=_peak_mib(accel_device))
    np.testing.assert_array_equal(codes != 0, ref != 0)                  # the same supports
    np.testing.assert_allclose(codes, ref, rtol=1e-9, atol=1e-9)         # float64 both ways


@pytest.fixture(scope="module")
def pretrain_grid(tmp_path_factory):
    return write_pretrain(tmp_path_factory.mktemp("cuda_pretrain") / "grid", {"a": [16]}, point_num=500, n_copies=2)


def _two_steps(model: SDFModel, data: PretrainSet, device: torch.device, amp: bool, compiled: bool):
    model = copy.deepcopy(model).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.compile(pcp_loss) if compiled else pcp_loss
    index, copies = epoch_batches(len(data), data.n_copies, 8, 0, 0)
    losses = []
    for b in range(2):
        targets, queries = (t.to(device) for t in data.batch(index[b], copies[b]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model, targets, queries)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def test_training_steps_with_amp_and_compile_on_device(pretrain_grid, accel_device, record):
    """Two training steps in float32, under bfloat16 autocast and compiled: finite and close to float32."""
    data = PretrainSet(pretrain_grid, 500, progress=False)
    torch.manual_seed(0)
    init = SDFModel()
    out = {}
    for name, amp, compiled in (("fp32", False, False), ("amp", True, False), ("compile", False, True)):
        _reset_peak(accel_device)
        losses, params = _two_steps(init, data, accel_device, amp, compiled)
        out[name] = (losses, params)
        record(device=str(accel_device), mode=name, losses=losses, peak_gpu_mib=_peak_mib(accel_device))
        assert all(np.isfinite(losses)), (name, losses)
    (ref_losses, ref_params), (amp_losses, _), (c_losses, c_params) = out["fp32"], out["amp"], out["compile"]
    # bfloat16 keeps 8 mantissa bits (u = 2**-9): the loss, a mean of distances, moves by well under 5 %
    assert abs(amp_losses[0] - ref_losses[0]) <= 5e-2 * ref_losses[0], (amp_losses, ref_losses)
    # compiled = the same maths in another kernel order: float32 rounding of the loss, 1e-4 relative
    assert abs(c_losses[0] - ref_losses[0]) <= 1e-4 * ref_losses[0], (c_losses, ref_losses)
    assert _rel(c_params, ref_params) <= 1e-3
