"""Synthetic Eyecandies release: the objects of :mod:`tools.synthetic.mvtec` written as the release's files.

``tools/make_synthetic_dataset.py OUT --format eyecandies`` writes
``OUT/<Class>/{train,val,test_public}/data/<id>_<item>.<ext>`` (ids: 3 digits in ``train`` and
``val``, 2 in ``test_public``, where good and anomalous samples are interleaved in a seeded
order), so that ``tools/prepare_eyecandies.py`` can be tested end to end. Each sample is one
scene of :func:`tools.synthetic.mvtec.render_scene` (an object on a slightly tilted plane that
fills the background) seen by the release's camera (:mod:`tools.eyecandies.release`: focal
711.11 px at 512 x 512, scaled with the size; principal point at the image centre) as a
rendered depth map: no sensor noise, no dropouts. Its files:

* ``depth.png``: the depth along the optical axis as 16 bits over the sample's own range,
  written to ``info_depth.yaml`` (``normalization: {min, max}``), so the quantisation error
  is at most ``(max - min) / 65535 / 2``;
* ``image_0`` ... ``image_5``: the object shaded under all four spotlights, then the bottom,
  right, top and left spotlight alone, then an overhead light;
* ``bumps_mask`` (height raised), ``dents_mask`` (height lowered), ``colors_mask`` (albedo
  changed), ``normals_mask`` (always empty here) and ``mask`` (their union), 255 where
  anomalous: a dent or hole is a dent, a bump a bump, a stain or contamination a colour
  anomaly, a crack or cut both a dent and a colour anomaly;
* ``normals.png`` (the release's encoding: ``(n + 1) * 127.5`` with y and z flipped from the
  camera frame), ``pose.txt`` (a camera-to-world pose looking down at the table; the
  converter does not apply it) and ``metadata.yaml`` (image-level labels).

:func:`render_eyecandies` also returns the generator's own camera-frame cloud, against which
the converter's output is checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.dataset import GOOD
from tools.eyecandies.release import MASK_TYPES, encode_depth, focal_length
from tools.synthetic.mvtec import (Camera, SyntheticConfig, SyntheticConfigError, check_request, render_scene,
                                   write_classes)
from utils.io import write_png, write_text, write_yaml

#: Eyecandies class -> (object family, albedo) of the synthetic objects.
LOOKS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "CandyCane": ("torus", (214, 48, 56)),
    "ChocolateCookie": ("disc", (124, 82, 52)),
    "ChocolatePraline": ("blob", (92, 58, 38)),
    "Confetto": ("blob", (236, 214, 226)),
    "GummyBear": ("blob", (228, 124, 44)),
    "HazelnutTruffle": ("blob", (150, 106, 62)),
    "LicoriceSandwich": ("disc", (60, 56, 60)),
    "Lollipop": ("disc", (226, 64, 150)),
    "Marshmallow": ("disc", (244, 238, 232)),
    "PeppermintCandy": ("disc", (232, 232, 226)),
}
DEFAULT_CLASSES = ("CandyCane", "ChocolateCookie")
#: release split -> the generator's split
SPLITS = {"train": "train", "val": "validation", "test_public": "test"}


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


SPOTLIGHTS = {"bottom": _unit([0, 0.6, 0.8]), "right": _unit([0.6, 0, 0.8]), "top": _unit([0, -0.6, 0.8]),
              "left": _unit([-0.6, 0, 0.8])}
OVERHEAD = _unit([0, 0, 1])
#: camera-to-world pose: the camera 18 cm above the table, looking down
POSE = np.array([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, -1.0, 0.18], [0, 0, 0, 1.0]])


def check_class(cls: str) -> None:
    if cls not in LOOKS:
        raise SyntheticConfigError(f"unknown Eyecandies class {cls!r}; known: {', '.join(LOOKS)}")


@dataclass(frozen=True)
class EyecandiesSample:
    depth: np.ndarray        # (H, W) float64 metres along the optical axis
    xyz: np.ndarray          # (H, W, 3) float64 the generator's own camera-frame cloud
    images: list             # six (H, W, 3) uint8 images, image_0 ... image_5
    masks: dict              # type -> (H, W) uint8 {0, 255}, and "mask" (the union)
    object_mask: np.ndarray  # (H, W) bool object pixels
    normals: np.ndarray      # (H, W, 3) uint8


def render_eyecandies(cls: str, split: str, defect: str, index: int, size: int = 512, seed: int = 0
                      ) -> EyecandiesSample:
    """Sample ``index`` of ``defect`` in the release split ``split`` (train, val, test_public)."""
    check_class(cls)
    if size % 2:
        raise SyntheticConfigError(f"size must be even (the optical axis would pass through a pixel "
                                   f"centre and give x = 0), got {size}")
    scene = render_scene(cls, SPLITS[split], defect, index, size, seed, look=LOOKS[cls],
                         camera=Camera(focal_length(size), (size - 1) / 2), sensor=False)
    z = scene.z
    xyz = np.stack([scene.ray_x[None, :] * z, scene.ray_y[:, None] * z, z], axis=-1)
    images = [scene.rgb(*SPOTLIGHTS.values()), *(scene.rgb(v) for v in SPOTLIGHTS.values()), scene.rgb(OVERHEAD)]
    kinds = {"bumps": scene.dh > 0, "dents": scene.dh < 0, "colors": scene.alpha > 0,
             "normals": np.zeros(z.shape, bool)}
    masks = {t: m.astype(np.uint8) * 255 for t, m in kinds.items()}
    masks["mask"] = scene.gt.astype(np.uint8) * 255
    gy, gx = np.gradient(scene.height, scene.pitch)
    n = np.stack([-gx, gy, np.ones_like(gx)], axis=-1) / np.sqrt(gx * gx + gy * gy + 1)[..., None]
    normals = np.clip(np.rint((n + 1) * 127.5), 0, 255).astype(np.uint8)
    return EyecandiesSample(z, xyz, images, masks, scene.inside, normals)


def _write_sample(job: tuple) -> None:
    folder, cls, split, defect, index, sample_id, size, seed = job
    s = render_eyecandies(cls, split, defect, index, size, seed)

    def path(item: str) -> Path:
        return folder / f"{sample_id}_{item}"

    png, lo, hi = encode_depth(s.depth)
    write_png(path("depth.png"), png)
    write_yaml(path("info_depth.yaml"), {"normalization": {"min": lo, "max": hi}})
    for k, image in enumerate(s.images):
        write_png(path(f"image_{k}.png"), image)
    write_png(path("normals.png"), s.normals)
    write_text(path("pose.txt"), "\n".join(" ".join(f"{v:.6f}" for v in row) for row in POSE) + "\n")
    labels = {t: int(s.masks[t].any()) for t in MASK_TYPES}
    write_yaml(path("metadata.yaml"), {"anomalous": int(s.masks["mask"].any()), **labels})
    for t in MASK_TYPES:
        write_png(path(f"{t}_mask.png"), s.masks[t])
    write_png(path("mask.png"), s.masks["mask"])


def public_test_order(n_good: int, defects: list[str], n_defect: int, seed: int) -> list[tuple[str, int]]:
    """``(defect, index)`` of every test_public id: good and anomalous samples in a seeded order."""
    samples = [(GOOD, i) for i in range(n_good)] + [(d, i) for d in defects for i in range(n_defect)]
    return [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]


def generate(cfg: SyntheticConfig, progress: bool = True) -> Path:
    """What ``tools/make_synthetic_dataset.py --format eyecandies`` runs (module docstring)."""
    counts = {"n_train": cfg.n_train, "n_val": cfg.n_val, "n_test_good": cfg.n_test_good,
              "n_test_defect": cfg.n_test_defect}
    classes, defects = check_request(cfg.classes, cfg.defects, counts, cfg.size, cfg.seed, cfg.workers, check_class)
    if cfg.size % 2:
        raise SyntheticConfigError(f"--size must be even for --format eyecandies, got {cfg.size}")
    settings = {cls: {"format": "eyecandies", "class": cls, **counts, "size": cfg.size, "seed": cfg.seed,
                      "defects": defects} for cls in classes}
    order = public_test_order(cfg.n_test_good, defects, cfg.n_test_defect, cfg.seed)
    width = max(2, len(str(len(order) - 1)))

    def tasks(staging: Path, cls: str) -> list[tuple]:
        out = [(staging / cls / "train" / "data", cls, "train", GOOD, i, f"{i:03d}", cfg.size, cfg.seed)
               for i in range(cfg.n_train)]
        out += [(staging / cls / "val" / "data", cls, "val", GOOD, i, f"{i:03d}", cfg.size, cfg.seed)
                for i in range(cfg.n_val)]
        return out + [(staging / cls / "test_public" / "data", cls, "test_public", d, i, f"{k:0{width}d}",
                       cfg.size, cfg.seed) for k, (d, i) in enumerate(order)]

    return write_classes(Path(cfg.out), settings, tasks, _write_sample, cfg.workers, cfg.overwrite, progress)
