"""Everything ``main.py`` writes (SPEC 9.1, 10), from the per-class results of :mod:`core.pipeline`.

In ``<output_dir>/<YYYY-mm-dd-HH-MM-SS>-result/`` (a new folder per run):

* ``Congiguration.txt`` / ``.pickle`` (sic, the reference's names) and ``configuration.json``:
  the run's settings, written first;
* per class, as soon as it is done, by the rank that computed it: ``<cls>/testing_state.txt``,
  with ``--viz`` the heatmaps ``<cls>/Visualization/images/NNNNNNNN.png`` and optimal
  thresholds, with ``--save_maps`` the fused maps ``anomaly_maps/<cls>/test/<type>/<stem>.tiff``
  in each sample's native frame (:mod:`core.native`), as the official evaluation reads them;
  and ``alignment.txt`` (one process: rewritten after every class; under torchrun: by rank 0
  once every class is done);
* last, from the classes' :class:`ClassSummary` records (small, picklable: what rank 0
  gathers under torchrun): ``timing.json`` (seconds per class, phase and stage, and the rank that
  ran the class), ``results.json`` (every number, unrounded) and ``results.txt`` (the
  reference's three tables, then the native-protocol table). A run that stopped early has no
  ``results.txt``.

Every file is written atomically (:mod:`utils.io`); the formatting lives in
:mod:`utils.reporting` and the figures in :mod:`utils.visualization`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from core.alignment import Alignment
from core.dataset import IMAGE_SIZE, Sample
from core.inference import Prediction
from core.native import NativeFrame, class_frame, to_native
from utils.io import make_run_dir, save_configuration, write_text, write_tiff_map
from utils.metrics import per_defect_type
from utils.precision import FP32, Precision
from utils.reporting import (METHODS, alignment_line, native_json, native_table, results_json, results_tables,
                             testing_state_text)
from utils.visualization import optimal_threshold, save_heatmaps


@dataclass
class ClassResult:
    """Everything recorded for one class (SPEC 8.4, 9); the outputs are written from it."""

    cls: str
    alignment: Alignment
    samples: list[Sample]
    labels: np.ndarray             # (T,)
    scores: dict[str, np.ndarray]  # method -> (T,) image scores
    maps: dict[str, np.ndarray]    # method -> (T, 224, 224) blurred maps
    masks: np.ndarray              # (T, 224, 224) float32 {0, 1}
    metrics: dict = field(default_factory=dict)
    thresholds: Optional[tuple[float, float]] = None
    times: dict = field(default_factory=dict)   # phase (memory, alignment, test, metrics) -> stage -> seconds
    rgb_images: Optional[np.ndarray] = None  # (T, 224, 224, 3) uint8 inputs, kept only for --viz
    predictions: Optional[list[Prediction]] = None  # kept only with RunConfig.keep_predictions
    frames: list[NativeFrame] = field(default_factory=list)  # per sample, its native frame (SPEC 9.2)
    native: dict = field(default_factory=dict)   # method -> metrics in the native frames (SPEC 9.2)
    memory_samples: list[str] = field(default_factory=list)  # training samples in the memory, fit order
    train_subset: Optional[list[str]] = None  # stems kept by --n_train (None: every training sample)

    @property
    def frame(self) -> str:
        """The class's native frame label: 'raw', 'preprocessed' or 'mixed'."""
        return class_frame(self.frames)


@dataclass
class ClassSummary:
    """What the run's shared files need of one class: no maps, so ranks can send it to rank 0."""

    cls: str
    weight: float
    bias: float
    metrics: dict
    per_defect_type: dict
    native: dict                                # method -> metrics in the native frames (SPEC 9.2)
    frame: str                                  # the class's native frame label
    frame_sources: list[str]                    # where the native frames came from
    memory_samples: int                         # training samples in the memory
    train_subset: Optional[list[str]] = None    # stems kept by --n_train
    thresholds: Optional[tuple[float, float]] = None
    times: dict = field(default_factory=dict)
    rank: int = 0                               # the rank that computed the class


def summarize(result: ClassResult, rank: int = 0) -> ClassSummary:
    """The :class:`ClassSummary` of a finished class (after :func:`write_class_outputs`, which sets the thresholds)."""
    per_type = {m: per_defect_type([s.defect for s in result.samples], result.labels, result.scores[m],
                                   result.masks, result.maps[m])
                for m in METHODS}
    return ClassSummary(result.cls, result.alignment.weight, result.alignment.bias, result.metrics, per_type,
                        result.native, result.frame, sorted({f.source for f in result.frames}),
                        len(result.memory_samples), result.train_subset, result.thresholds, result.times, rank)


def make_result_dir(output_dir: str | Path) -> Path:
    """A new ``<output_dir>/<YYYY-mm-dd-HH-MM-SS>-result`` folder (``-2``, ``-3`` ... when taken)."""
    return make_run_dir(output_dir, "-result")


def write_configuration(result_dir: Path, cfg, classes: list[str], device, rgb_weights: str,
                        iteration: int, shards: Optional[list[list[str]]] = None,
                        precision: Precision = FP32) -> None:
    """``Congiguration.txt``/``.pickle`` (reference attribute names, SPEC 9.1) and ``configuration.json``
    of a run with the :class:`core.pipeline.RunConfig` ``cfg``; the method flags (SPEC 13) under the
    reference's names where it has one (``k_number``, ``dict_n_component``) and their own otherwise;
    the precision that ran (SPEC 12.4)."""
    method = cfg.method
    config = {
        "BS": 1, "POINT_NUM": cfg.point_num, "ckpt_path": str(cfg.ckpt_path), "classes": classes,
        "datasets_path": str(cfg.datasets_path), "dict_n_component": method.n_nonzero,
        "grid_path": str(cfg.grid_path), "image_size": IMAGE_SIZE, "k_number": method.k_sdf,
        "k_rgb": method.k_rgb, "footprint_shift": method.footprint_shift, "align_samples": method.align_samples,
        "align_sigma": method.align_sigma, "blur_radius": method.blur_radius, "n_train": method.n_train,
        "method_name": list(METHODS),
        "output_dir": str(result_dir), "rgb_method": "Dict", "viz": cfg.viz, "save_maps": cfg.save_maps,
        "raw_datasets_path": None if cfg.raw_datasets_path is None else str(cfg.raw_datasets_path),
        "device": str(device), "seed": cfg.seed, "rgb_backbone": cfg.rgb_backbone,
        "rgb_weights": rgb_weights, "sdf_checkpoint_iteration": iteration, **precision.record(),
    }
    if shards is not None and len(shards) > 1:   # under torchrun: the world size and each rank's classes
        config.update(world_size=len(shards), rank_classes=shards)
    save_configuration(result_dir, config, pickle_protocol=2)
    write_text(result_dir / "configuration.json", json.dumps(config, indent=2) + "\n")


def write_alignment(result_dir: Path, done: list[ClassSummary]) -> None:
    """``alignment.txt``: one line per class of ``done``, in that order."""
    write_text(result_dir / "alignment.txt", "".join(alignment_line(s.cls, s.weight, s.bias) for s in done))


def write_class_outputs(result_dir: Path, result: ClassResult, viz: bool, save_maps: bool) -> None:
    """``<cls>/testing_state.txt``, with ``viz`` the heatmaps and thresholds (stored in ``result.thresholds``),
    with ``save_maps`` the TIFF maps of the fused map in each sample's native frame."""
    cls = result.cls
    det = seg = None
    if viz:
        det = optimal_threshold(result.labels, result.scores["RGB_SDF"])
        seg = optimal_threshold(result.masks, result.maps["RGB_SDF"])
        result.thresholds = (det, seg)
        images_dir = result_dir / cls / "Visualization" / "images"
        save_heatmaps(images_dir, result.rgb_images, result.masks, result.maps["RGB_SDF"], seg)
        result.rgb_images = None
    write_text(result_dir / cls / "testing_state.txt", testing_state_text(cls, result.metrics, det, seg))
    if save_maps:
        items = list(zip(result.samples, result.maps["RGB_SDF"], result.frames, strict=True))
        for sample, m, frame in tqdm(items, desc=f"{cls}: maps", unit="map"):
            path = result_dir / "anomaly_maps" / cls / "test" / sample.defect / f"{sample.stem}.tiff"
            write_tiff_map(path, to_native(m, frame))


def write_results(result_dir: Path, done: list[ClassSummary], classes: list[str],
                  method: Optional[dict] = None, precision: Precision = FP32) -> str:
    """``timing.json``, ``results.json`` then ``results.txt`` (last, so its presence marks a finished run)
    for the summaries ``done`` of ``classes``; returns the tables.

    ``method`` (the run's method flags, SPEC 13) and each class's memory size (and its
    ``--n_train`` subset) are recorded in ``results.json``. A run in reduced precision says so in
    both files (SPEC 12.4): ``results.txt`` starts with a ``Precision:`` line (a faithful fp32 file
    has none, as the reference's), ``results.json`` has the ``precision`` record in every run."""
    summaries = {s.cls: s for s in done}
    metrics = {c: summaries[c].metrics for c in classes}
    native = {c: summaries[c].native for c in classes}
    frames = {c: summaries[c].frame for c in classes}
    tables = f"{results_tables(metrics, classes)} \n\n{native_table(native, frames, classes)}"
    if not precision.faithful:
        tables = f"Precision: {precision.describe()}\n\n{tables}"
    report = results_json(metrics, classes,
                          alignment={c: (summaries[c].weight, summaries[c].bias) for c in classes},
                          thresholds={c: summaries[c].thresholds for c in classes if summaries[c].thresholds})
    if method is not None:
        report["method_params"] = method
    for c in classes:
        entry = report["classes"][c]
        entry["per_defect_type"] = summaries[c].per_defect_type
        entry["memory_samples"] = summaries[c].memory_samples
        if summaries[c].train_subset is not None:
            entry["train_subset"] = summaries[c].train_subset
    report["precision"] = precision.record()
    report["native_protocol"] = native_json(native, frames, {c: summaries[c].frame_sources for c in classes}, classes)
    timing = {"classes": {c: {"rank": summaries[c].rank, "seconds": summaries[c].times} for c in classes}}
    write_text(result_dir / "timing.json", json.dumps(timing, indent=2) + "\n")
    write_text(result_dir / "results.json", json.dumps(report, indent=2) + "\n")
    write_text(result_dir / "results.txt", tables)
    return tables
