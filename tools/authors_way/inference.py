"""The authors' way of memory building and shape-guided inference (SPEC 6, 8), as an oracle.

Re-implemented here (not imported from the authors) as the reference computes it: one
encoder forward per patch; one decoder forward per patch with the latent tiled over the
500 points (``fc1`` per point, ``fc3`` on the concatenation); one scikit-learn
``sparse_encode`` call per patch and per foreground RGB cell, given torch tensors (so
scikit-learn works in float64, as in the reference); a Python loop over every (patch,
point) pair for the per-pixel minimum, with the reference's "0 means unset" rule; the
shape-guided pool gathered with a Python loop over the retrieved patches; the footprint
of each test patch from its own call. Given the same memory, RGB features and alignment,
the outputs must agree with :func:`core.inference.predict` up to float rounding;
:func:`agreement` measures by how much. The benchmark times both ways with it and the
tests use it as the independent per-patch implementation. The method flags (SPEC 13) are
keyword arguments here too, replacing the reference's literal constants where they stand.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import sparse_encode

from core.dataset import IMAGE_SIZE
from core.footprint import FEATURE_SIDE, SHIFT
from core.inference import K_RGB, K_SDF, N_NONZERO, PDIST_EPS, stage
from core.memory import DualMemory, SampleInput
from utils.blur import BLUR_RADIUS, blur_map, blurred_levels, level_difference_bound, quantize_u8


def authors_footprint(pix: torch.Tensor, shift: int = SHIFT) -> torch.Tensor:
    """``get_relative_rgb_f_indices`` of one patch (SPEC 5.1): shifted cells, clipped by replacement."""
    cells = torch.unique(torch.div(torch.div(pix, IMAGE_SIZE, rounding_mode="floor"), 8, rounding_mode="floor")
                         * FEATURE_SIDE + torch.div(pix % IMAGE_SIZE, 8, rounding_mode="floor"))
    shifted = torch.cat([cells + shift, cells - shift, cells + shift * FEATURE_SIDE, cells - shift * FEATURE_SIDE])
    shifted[shifted < 0] = torch.max(shifted)
    shifted[shifted > FEATURE_SIDE ** 2 - 1] = torch.min(shifted)
    return torch.unique(shifted)


def authors_encode(sdf_model, points: torch.Tensor) -> torch.Tensor:
    """One encoder forward per patch."""
    return torch.cat([sdf_model.encoder(points[g:g + 1]) for g in range(points.shape[0])])


def authors_decode(nif, latent: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The reference's NIF forward for one patch: latent (128,) tiled over points (P, 3) -> sdf (P,)."""
    tiled = latent.expand(points.shape[0], -1)
    net = torch.cat([F.relu(nif.fc2(points)), F.relu(nif.fc1(tiled))], dim=-1)
    net = F.relu(nif.fc3(net))
    for layer in nif.hidden_layers:
        net = F.relu(layer(net))
    return nif.fc5(net).reshape(-1)


def authors_sparse_code(x: torch.Tensor, atoms: torch.Tensor, n_nonzero: int = N_NONZERO) -> torch.Tensor:
    """``sparse_encode`` on torch tensors for one query (float64 inside), code cast back, reconstruction."""
    code = sparse_encode(X=x.view(1, -1), dictionary=atoms, algorithm="omp", n_nonzero_coefs=n_nonzero,
                         alpha=1e-10)
    return torch.matmul(torch.Tensor(code), atoms)


def _knn(queries: torch.Tensor, pool: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    _, idx = torch.topk(torch.cdist(queries, pool), k=k + 1, largest=False)
    return idx[:, 1:] if mode == "alignment" else idx[:, :-1]


@torch.no_grad()
def authors_predict(memory: DualMemory, sdf_model, rgb_extractor, inp: SampleInput, device: torch.device,
                    mode: str = "testing", weight: Optional[float] = None, bias: Optional[float] = None,
                    times: Optional[dict] = None, *, k_sdf: int = K_SDF, k_rgb: int = K_RGB,
                    n_nonzero: int = N_NONZERO, shift: int = SHIFT, blur_radius: float = BLUR_RADIUS) -> dict:
    """One sample the reference's way (SPEC 8); returns the same quantities as :func:`core.inference.predict`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # premature OMP stops, silenced as in the reference
        with stage(times, "sdf_encode", device):
            points = inp.points.to(device)
            feats = authors_encode(sdf_model, points)
        with stage(times, "rgb_features", device):
            rgb = rgb_extractor(inp.rgb.unsqueeze(0).to(device))[0]
        with stage(times, "sdf_knn_omp", device):
            knn = _knn(feats, memory.sdf, k_sdf, mode).cpu()
            feats_cpu, sdf_lib = feats.cpu(), memory.sdf.cpu()
            recon = torch.cat([authors_sparse_code(feats_cpu[g], sdf_lib[knn[g]], n_nonzero)
                               for g in range(knn.shape[0])])
            patch_scores = F.pairwise_distance(feats_cpu, recon, eps=PDIST_EPS)
        with stage(times, "sdf_decoder", device):
            s_map = np.zeros(IMAGE_SIZE * IMAGE_SIZE, dtype=float)
            pixels = inp.pixels.numpy()
            for g in range(points.shape[0]):
                sdf = np.abs(authors_decode(sdf_model.NIF, recon[g].to(device), points[g]).cpu().numpy())
                for value, pix in zip(sdf, pixels[g]):
                    if s_map[pix] == 0 or s_map[pix] > value:
                        s_map[pix] = value
        with stage(times, "rgb_knn_omp", device):
            fp = [authors_footprint(inp.pixels[g], shift) for g in range(inp.pixels.shape[0])]
            cells = torch.unique(torch.cat(fp))
            fp_rows, indptr = memory.fp_rows.cpu(), memory.fp_indptr.cpu()
            guided = torch.unique(torch.cat([fp_rows[indptr[j]:indptr[j + 1]]
                                             for j in torch.unique(knn.flatten()).tolist()]))
            pool = memory.rgb[guided.to(device)]
            queries = rgb[cells.to(device)]
            idx = _knn(queries, pool, k_rgb, mode).cpu()
            queries, pool = queries.cpu(), pool.cpu()
            rec = torch.cat([authors_sparse_code(queries[q], pool[idx[q]], n_nonzero) for q in range(idx.shape[0])])
            map28 = torch.zeros(FEATURE_SIDE ** 2)
            map28[cells] = F.pairwise_distance(queries, rec, eps=PDIST_EPS)
            rgb_map = F.interpolate(map28.view(1, 1, FEATURE_SIDE, FEATURE_SIDE), size=(IMAGE_SIZE, IMAGE_SIZE),
                                    mode="bilinear", align_corners=False).view(IMAGE_SIZE, IMAGE_SIZE)
        with stage(times, "blur_fusion", device):
            out = dict(sdf_score=patch_scores.max().numpy(), rgb_score=map28.max().numpy(),
                       sdf_features=feats_cpu.numpy(), patch_scores=patch_scores.numpy(),
                       sdf_map=s_map.reshape(IMAGE_SIZE, IMAGE_SIZE), rgb_map_28=map28.view(28, 28).numpy(),
                       rgb_map=rgb_map.numpy())
            out["sdf_map_blur"] = blur_map(out["sdf_map"], blur_radius)
            out["rgb_map_blur"] = blur_map(out["rgb_map"], blur_radius)
            if mode == "testing":
                out["score"] = (patch_scores.max() * map28.max()).numpy()
                aligned = rgb_map * weight + bias
                aligned = torch.clip(aligned, min=0, max=aligned.max())
                fused = torch.maximum(aligned, torch.from_numpy(out["sdf_map"]))
                out["aligned_map"], out["fused_map"] = aligned.numpy(), fused.numpy()
                out["aligned_map_blur"] = blur_map(out["aligned_map"], blur_radius)
                out["fused_map_blur"] = blur_map(out["fused_map"], blur_radius)
    return out


@torch.no_grad()
def authors_memory_features(sdf_model, rgb_extractor, inp: SampleInput, device: torch.device
                            ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Memory building of one training sample the reference's way: per-patch encoder and
    footprint calls, the sample's RGB features moved to the CPU."""
    feats = authors_encode(sdf_model, inp.points.to(device))
    rgb = rgb_extractor(inp.rgb.unsqueeze(0).to(device))[0].cpu()
    return feats.cpu(), rgb, [authors_footprint(inp.pixels[g]) for g in range(inp.pixels.shape[0])]


# ----------------------------------------------------------------------------- comparison
def blur_agreement(pairs) -> dict:
    """How far blurred maps differ, in integer 8-bit levels, for ``(ours, ref)`` unblurred map pairs.

    ``quant_levels``: largest difference of the quantised inputs (:func:`utils.blur.quantize_u8`);
    ``blur_levels``: largest difference of the blurred levels (:func:`utils.blur.blurred_levels`);
    ``blur_excess``: largest amount by which a pixel's blurred difference exceeds
    :func:`utils.blur.level_difference_bound` (<= 0 whenever the blur is Pillow's);
    ``blur_changed``: share of pixels whose blurred level differs.
    """
    quant = blurred = excess = changed = pixels = 0
    for ours, ref in pairs:
        q_a, q_b = quantize_u8(np.asarray(ours)), quantize_u8(np.asarray(ref))
        diff = np.abs(blurred_levels(ours).astype(np.int64) - blurred_levels(ref))
        quant = max(quant, int(np.abs(q_a.astype(np.int64) - q_b).max()))
        blurred = max(blurred, int(diff.max()))
        excess = max(excess, int((diff - level_difference_bound(q_a, q_b)).max()))
        changed, pixels = changed + int((diff > 0).sum()), pixels + diff.size
    return dict(quant_levels=quant, blur_levels=blurred, blur_excess=excess, blur_changed=changed / max(pixels, 1))


def agreement(ours, ref: dict) -> dict:
    """Largest differences between a :class:`core.inference.Prediction` and :func:`authors_predict`'s output.

    Blurred maps are compared in integer levels (:func:`blur_agreement`): a float kernel that
    rounds differently moves a pixel across a level boundary, which the blur spreads.
    """
    def rel(a, b):
        return float(abs(np.float64(a) - np.float64(b)) / max(abs(np.float64(b)), 1e-30))

    pairs = [(ours.sdf_map, ref["sdf_map"]), (ours.rgb_map, ref["rgb_map"])]
    out = dict(score_rel=max(rel(ours.sdf_score, ref["sdf_score"]), rel(ours.rgb_score, ref["rgb_score"])),
               sdf_map_abs=float(np.abs(ours.sdf_map - ref["sdf_map"]).max()),
               rgb28_abs=float(np.abs(ours.rgb_map_28 - ref["rgb_map_28"]).max()))
    if ours.score is not None:
        out["score_rel"] = max(out["score_rel"], rel(ours.score, ref["score"]))
        pairs.append((ours.fused_map, ref["fused_map"]))
    out.update(blur_agreement(pairs))
    return out


def sklearn_omp_reference(x: np.ndarray, atoms: np.ndarray, n_nonzero: int = 3) -> np.ndarray:
    """The reference's way: one scikit-learn ``sparse_encode`` call per row (for tests and timing)."""
    x = np.asarray(x)
    atoms = np.asarray(atoms)
    codes = np.zeros(atoms.shape[:2], dtype=np.result_type(x.dtype, atoms.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # premature-stop warnings, silenced as in the reference
        for b in range(x.shape[0]):
            codes[b] = sparse_encode(x[b:b + 1], atoms[b], algorithm="omp", n_nonzero_coefs=n_nonzero)[0]
    return codes
