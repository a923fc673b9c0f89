"""Shape-guided inference for one sample (SPEC 8), batched over all its patches.

Per sample (:func:`encode_sample`, then :func:`predict`): one encoder pass over all
patches, one distance matrix + ``topk`` against the SDF memory, one batched OMP
(:func:`core.sparse_coding.omp`, float64 like the reference's, see :func:`_sparse_reconstruct`) for all patches, one decoder pass over all
patches (chunked for memory) with the reconstructed latents, a scatter-min of the
point-wise |SDF| into the 224x224 map, then one distance matrix + ``topk`` + batched OMP
for all foreground RGB cells against the shape-guided RGB pool. No per-patch or
per-point Python loop.

Distances use ``torch.cdist`` in its default compute mode, as the reference does: for
more than 25 rows it evaluates ``|x|² + |y|² − 2x·y`` in float32, whose cancellation
errors decide near-ties; calling it the same way reproduces the reference's neighbour
lists (SPEC 8.1 step 2) up to near-ties that the CPU's float32 GEMM kernels order
differently (4 of ~2,400 RGB cells on the parity fixture). ``torch.topk(largest=False)``
returns them sorted ascending.

"testing" mode keeps neighbours 1..k, "alignment" mode drops the nearest and keeps
2..k+1 (SPEC 7 step 2).

The paper's constants (:data:`K_SDF`, :data:`K_RGB`, :data:`N_NONZERO`, the footprint
shift and the blur radius) are the defaults of keyword arguments; ``main.py`` passes the
values of its method flags (:class:`core.params.MethodParams`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from core.dataset import IMAGE_SIZE
from core.footprint import FEATURE_SIDE, N_CELLS, SHIFT, footprints
from core.memory import DualMemory, EncodedSample, SampleInput, chunk_size, encode_patches
from core.sparse_coding import omp
from utils.blur import BLUR_RADIUS, blur_map
from utils.device import Timer
from utils.precision import FP32, Precision

K_SDF = 10        # SDF neighbours per patch (SPEC 8.1, hard-coded in the reference, KEEP #22)
K_RGB = 5         # RGB neighbours per foreground cell (SPEC 8.2)
N_NONZERO = 3     # OMP atoms (SPEC 8.1 step 3)
PDIST_EPS = 1e-12  # PairwiseDistance eps added to every component of the difference (KEEP #28)
# Patches per decoder call, by (device type, dtype), measured (SPEC 12.3): on CPU, 8 x 500 points
# keeps each (4000, 512) float32 activation (8 MB) in reused allocator memory and was fastest
# (95 GFLOPS vs 56 with 32 patches on 2 cores); in bfloat16, 8 patches ran at 700 GFLOPS on 2
# cores (4: 690, 16: 650, 32: 620). On CUDA larger batches fill the GPU.
DECODER_CHUNK = {("cpu", torch.float32): 8, ("cpu", torch.bfloat16): 8,
                 ("cuda", torch.float32): 512, ("cuda", torch.bfloat16): 512}
MODES = ("testing", "alignment")
STAGE_NAMES = ("sdf_encode", "rgb_features", "sdf_knn_omp", "sdf_decoder", "rgb_knn_omp", "blur_fusion")  # timed stages


@contextlib.contextmanager
def stage(times: Optional[dict], name: str, device: torch.device):
    """Add the wall time of the block to ``times[name]`` (CUDA-synchronised); no-op if ``times`` is None."""
    if times is None:
        yield
        return
    with Timer(device) as timer:
        yield
    times[name] = times.get(name, 0.0) + timer.seconds


@torch.no_grad()
def encode_sample(inp: SampleInput, sdf_model, rgb_extractor, device: torch.device,
                  times: Optional[dict] = None, shift: int = SHIFT, precision: Precision = FP32) -> EncodedSample:
    """Run both feature extractors on one sample (SPEC 5, 8.1 step 1, 8.2 step 1-2);
    ``shift`` is the footprint shift in cells (SPEC 5.1). The networks run in ``precision``
    (SPEC 12.4); the features come out float32."""
    with stage(times, "sdf_encode", device):
        points = inp.points.to(device)
        with precision.region(device):
            feats = encode_patches(sdf_model, points, dtype=precision.dtype)
    with stage(times, "rgb_features", device):
        with precision.region(device):
            rgb = rgb_extractor(inp.rgb.unsqueeze(0).to(device))[0]
    pixels = inp.pixels.to(device)
    with stage(times, "rgb_knn_omp", device):   # the footprints serve the RGB branch's pool (SPEC 5.1)
        indptr, cells = footprints(pixels, shift)
    inp = SampleInput(inp.sample, inp.rgb, points, pixels)
    return EncodedSample(inp, feats, rgb, indptr, cells)


@dataclass
class Prediction:
    """Scores and maps of one sample (SPEC 8.3, 8.4). Maps are NumPy (224, 224).

    ``sdf_map`` and ``fused_map`` are float64 like the reference's; the RGB maps float32.
    In alignment mode the aligned/fused maps and their blurs are None and ``score`` is None.
    """

    sdf_score: np.float32
    rgb_score: np.float32
    score: Optional[np.float32]
    sdf_features: np.ndarray      # (G, 128)
    patch_scores: np.ndarray      # (G,) ||f - OMP(f) + eps||
    sdf_map: np.ndarray           # unblurred, float64
    rgb_map_28: np.ndarray        # (28, 28) float32
    rgb_map: np.ndarray           # bilinear 224 map, float32
    sdf_map_blur: np.ndarray
    rgb_map_blur: np.ndarray
    aligned_map: Optional[np.ndarray] = None   # clamp0(w * rgb_map + b), float32
    fused_map: Optional[np.ndarray] = None     # max(aligned, sdf_map), float64
    aligned_map_blur: Optional[np.ndarray] = None
    fused_map_blur: Optional[np.ndarray] = None


def _neighbours(queries: torch.Tensor, pool: torch.Tensor, k: int, mode: str,
                n_nonzero: int = N_NONZERO) -> torch.Tensor:
    """Indices of the nearest pool rows, ascending (SPEC 8.1 step 2, 8.2 step 4).

    Like the reference, takes the ``k + 1`` smallest distances and keeps 1..k ("testing")
    or 2..k+1 ("alignment"). A pool with at most ``k`` rows (where the reference would
    fail) gives all its rows, minus the nearest in alignment mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    kk = min(k + 1, pool.shape[0])
    if kk - (mode == "alignment") < n_nonzero:
        raise ValueError(f"memory too small for {mode} mode: {pool.shape[0]} entries")
    _, idx = torch.topk(torch.cdist(queries, pool), kk, dim=1, largest=False)
    return idx[:, 1:] if mode == "alignment" else idx[:, :k]


def _sparse_reconstruct(x: torch.Tensor, atoms: torch.Tensor,
                        n_nonzero: int = N_NONZERO) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP reconstruction of ``x`` (B, D) over ``atoms`` (B, K, D) with at most ``n_nonzero``
    atoms, and its error (SPEC 8.1 steps 3-4).

    The reference hands torch tensors to ``sparse_encode``, which converts them to
    float64: its OMP runs in float64 with float64's machine epsilon in the stopping tests.
    The code is then cast to float32 and the reconstruction ``code @ atoms`` and the
    PairwiseDistance score are float32, as here.
    """
    codes = omp(x.to(torch.float64), atoms.to(torch.float64), n_nonzero).to(x.dtype)
    recon = (codes.unsqueeze(1) @ atoms).squeeze(1)
    return recon, F.pairwise_distance(x, recon, p=2.0, eps=PDIST_EPS)


def scatter_min_map(values: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Per-pixel minimum of ``values`` over every entry hitting the pixel, float64 (224, 224).

    ``values`` and ``pixels`` (flat indices in the 224x224 grid) have the same shape, e.g.
    (G, K). Pixels hit by no entry are 0 (SPEC 8.1 step 5). The reference treats an exact
    0.0 as "unset", so a later larger value could replace it; here 0.0 is a value like any
    other (SPEC 11 #29, FIX).
    """
    flat = torch.full((IMAGE_SIZE * IMAGE_SIZE,), float("inf"), dtype=values.dtype, device=values.device)
    flat.scatter_reduce_(0, pixels.reshape(-1), values.reshape(-1), reduce="amin")
    flat = torch.where(torch.isinf(flat), torch.zeros_like(flat), flat)
    return flat.to(torch.float64).view(IMAGE_SIZE, IMAGE_SIZE)


@torch.no_grad()
def sdf_score_map(sdf_model, latents: torch.Tensor, points: torch.Tensor, pixels: torch.Tensor,
                  chunk: Optional[int] = None, precision: Precision = FP32) -> torch.Tensor:
    """Per-pixel minimum of |SDF| over all (patch, point) pairs (SPEC 8.1 step 5), float64 (224, 224).

    One decoder pass over all patches (``chunk`` at a time, default :data:`DECODER_CHUNK`) with
    latents (G, 128) at the patch points (G, K, 3), in ``precision`` (SPEC 12.4); then
    :func:`scatter_min_map` on the float32 |SDF|.
    """
    chunk = chunk or chunk_size(DECODER_CHUNK, latents.device, precision.dtype)
    with precision.region(latents.device):
        values = sdf_model.NIF.abs_sdf(latents, points, chunk, precision.dtype)
    return scatter_min_map(values, pixels)


def rgb_score_map(memory: DualMemory, enc: EncodedSample, sdf_neighbours: torch.Tensor,
                  mode: str, k_rgb: int = K_RGB, n_nonzero: int = N_NONZERO) -> torch.Tensor:
    """The 28x28 RGB map (SPEC 8.2 steps 2-5), float32 (784,): OMP error per foreground cell."""
    cells = torch.unique(enc.fp_cells)                       # F_test, sorted
    pool = memory.rgb[memory.guided_rows(sdf_neighbours)]    # M_guided
    queries = enc.rgb_features[cells]
    nn_idx = _neighbours(queries, pool, k_rgb, mode, n_nonzero)
    _, err = _sparse_reconstruct(queries, pool[nn_idx], n_nonzero)
    out = torch.zeros(N_CELLS, dtype=err.dtype, device=err.device)
    out[cells] = err
    return out


@torch.no_grad()
def predict(memory: DualMemory, sdf_model, enc: EncodedSample, mode: str = "testing",
            weight: Optional[float] = None, bias: Optional[float] = None,
            times: Optional[dict] = None, *, k_sdf: int = K_SDF, k_rgb: int = K_RGB,
            n_nonzero: int = N_NONZERO, blur_radius: float = BLUR_RADIUS,
            precision: Precision = FP32) -> Prediction:
    """Score one encoded sample against the class memory (SPEC 8; alignment mode: SPEC 7).

    Testing mode needs the class's alignment ``weight`` and ``bias`` (SPEC 8.3).
    ``k_sdf``/``k_rgb`` neighbours, ``n_nonzero`` OMP atoms and the blur radius default to
    the paper's values (KEEP #22, #27).
    ``times`` (optional dict) accumulates seconds per stage: ``sdf_knn_omp``,
    ``sdf_decoder``, ``rgb_knn_omp``, ``blur_fusion``. ``precision``: that of the decoder
    (SPEC 12.4); everything else runs in the dtypes of the reference.
    """
    if mode == "testing" and (weight is None or bias is None):
        raise ValueError("testing mode needs the alignment weight and bias")
    device = enc.sdf_features.device
    feats = enc.sdf_features
    with stage(times, "sdf_knn_omp", device):
        sdf_nn = _neighbours(feats, memory.sdf, k_sdf, mode, n_nonzero)   # (G, 10)
        recon, patch_scores = _sparse_reconstruct(feats, memory.sdf[sdf_nn], n_nonzero)
        sdf_score = patch_scores.max()
    with stage(times, "sdf_decoder", device):
        sdf_map = sdf_score_map(sdf_model, recon, enc.input.points, enc.input.pixels, precision=precision)
    with stage(times, "rgb_knn_omp", device):
        map28 = rgb_score_map(memory, enc, sdf_nn, mode, k_rgb, n_nonzero)
        rgb_score = map28.max()
        rgb_map = F.interpolate(map28.view(1, 1, FEATURE_SIDE, FEATURE_SIDE), size=(IMAGE_SIZE, IMAGE_SIZE),
                                mode="bilinear", align_corners=False).view(IMAGE_SIZE, IMAGE_SIZE)

    with stage(times, "blur_fusion", device):
        out = dict(sdf_score=np.float32(sdf_score.item()), rgb_score=np.float32(rgb_score.item()), score=None,
                   sdf_features=feats.cpu().numpy(), patch_scores=patch_scores.cpu().numpy(),
                   sdf_map=sdf_map.cpu().numpy(), rgb_map_28=map28.view(FEATURE_SIDE, FEATURE_SIDE).cpu().numpy(),
                   rgb_map=rgb_map.cpu().numpy())
        out["sdf_map_blur"] = blur_map(out["sdf_map"], blur_radius)
        out["rgb_map_blur"] = blur_map(out["rgb_map"], blur_radius)
        if mode == "testing":
            # SPEC 8.3, in the reference's dtypes: float32 affine map, float64 maximum.
            out["score"] = np.float32((sdf_score * rgb_score).item())
            aligned = (rgb_map * float(weight) + float(bias)).clamp_min(0.0)
            out["aligned_map"] = aligned.cpu().numpy()
            out["fused_map"] = np.maximum(out["aligned_map"].astype(np.float64), out["sdf_map"])
            out["aligned_map_blur"] = blur_map(out["aligned_map"], blur_radius)
            out["fused_map_blur"] = blur_map(out["fused_map"], blur_radius)
    return Prediction(**out)
