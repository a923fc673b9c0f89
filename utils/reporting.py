"""Text and JSON reports of ``main.py`` (SPEC 9 and 9.1).

* ``results.txt``: three Markdown tables (pandas ``to_markdown``), byte-identical to the
  reference's file. Per-class values are rounded to 3 decimals first (the AUROCs are
  Python floats, AU-PRO values NumPy floats, each rounded by its own ``round``); the
  "Mean" column is the mean of the rounded values, rounded to 3 decimals (SPEC 11 #33, KEEP).
  After them, not in the reference, a fourth table in the same style: pixel AUROC and
  AU-PRO of the official MVTec 3D-AD protocol at native resolution (SPEC 9.2), titled with
  the frame the maps are in.
* ``<cls>/testing_state.txt``: the reference's per-class log, including its runs of spaces.
* ``alignment.txt``: one ``'<cls>'\\t:[w, b],`` line per class.
* ``results.json``: every number, unrounded (not in the reference).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from utils.metrics import PRO_LIMITS

METHODS = ("RGB", "SDF", "RGB_SDF")

# The reference builds its log line from an f-string continued with backslashes inside
# the literal, so every AU-PRO entry is preceded by 17 spaces (cosmetic, kept).
_PRO_INDENT = " " * 17


def _round_auroc(value: float) -> float:
    return round(float(value), 3)  # the reference rounds scikit-learn's Python float


def _round_pro(value: float) -> float:
    return float(round(np.float64(value), 3))  # ... and the AU-PRO NumPy float64


def class_title(cls: str) -> str:
    """A class's column title (SPEC 1.1): ``str.title()`` of a lower-case name, as the reference
    writes the MVTec classes (``cable_gland`` -> ``Cable_Gland``); a name with capitals stays as
    written (Eyecandies ``CandyCane``, not ``Candycane``)."""
    return cls.title() if cls == cls.lower() else cls


def _table(row_names: Sequence[str], columns: Mapping[str, Mapping[str, float]]) -> str:
    df = pd.DataFrame(list(row_names), columns=["Method"])
    for name, values in columns.items():
        df[name] = df["Method"].map(dict(values))
    df["Mean"] = round(df.iloc[:, 1:].mean(axis=1), 3)
    return df.to_markdown(index=False)


def results_tables(results: Mapping[str, Mapping[str, dict]], classes: Sequence[str]) -> str:
    """The content of ``results.txt`` (SPEC 9.1), exactly as the reference writes it.

    ``results[cls][method]`` is the output of :func:`utils.metrics.evaluate_method` for
    every class in ``classes`` and every method in :data:`METHODS`. Columns are
    :func:`class_title` in the order of ``classes``, then ``Mean``. No trailing newline.
    """
    image, pixel, pro = {}, {}, {}
    for cls in classes:
        image[class_title(cls)] = {m: _round_auroc(results[cls][m]["image_auroc"]) for m in METHODS}
        pixel[class_title(cls)] = {m: _round_auroc(results[cls][m]["pixel_auroc"]) for m in METHODS}
        pro[class_title(cls)] = {
            f"{m}_{limit}": _round_pro(results[cls][m]["au_pro"][limit]) for m in METHODS for limit in PRO_LIMITS
        }
    pro_rows = [f"{m}_{limit}" for m in METHODS for limit in PRO_LIMITS]
    return (
        f"Image ROCAUC Results \n\n{_table(METHODS, image)} \n\n"
        f"Pixel ROCAUC Results \n\n{_table(METHODS, pixel)} \n\n"
        f"AU PRO Results \n\n{_table(pro_rows, pro)}"
    )


NATIVE_TITLE = "Native Resolution Results (official MVTec 3D-AD protocol: Pixel ROCAUC, AU PRO)"
FRAME_TEXT = {"raw": "maps and gt at each raw sample's size",
              "preprocessed": "maps and gt in the preprocessed, padded frame: raw sizes unknown"}


def native_frame_text(frames: Mapping[str, str], classes: Sequence[str]) -> str:
    """Which frame the native-protocol numbers are in (``frames[cls]`` 'raw', 'preprocessed' or 'mixed')."""
    kinds = {frames[c] for c in classes}
    if len(kinds) == 1 and (kind := kinds.pop()) in FRAME_TEXT:
        return FRAME_TEXT[kind]
    return "frame per class: " + ", ".join(f"{c.title()} {frames[c]}" for c in classes)


def native_table(native: Mapping[str, Mapping[str, dict]], frames: Mapping[str, str], classes: Sequence[str]) -> str:
    """The fourth table of ``results.txt``: per method its pixel AUROC and AU-PRO at every limit in the
    native frame (``native[cls][method]`` as :meth:`utils.metrics.GroundTruthSet.evaluate` returns),
    rounded and averaged as the other tables; the title names the frame."""
    columns = {}
    for cls in classes:
        col = {}
        for m in METHODS:
            col[f"{m}_Pixel_ROCAUC"] = _round_auroc(native[cls][m]["pixel_auroc"])
            col.update({f"{m}_AU_PRO_{limit}": _round_pro(native[cls][m]["au_pro"][limit]) for limit in PRO_LIMITS})
        columns[cls.title()] = col
    rows = [r for m in METHODS for r in [f"{m}_Pixel_ROCAUC"] + [f"{m}_AU_PRO_{limit}" for limit in PRO_LIMITS]]
    return f"{NATIVE_TITLE}, {native_frame_text(frames, classes)} \n\n{_table(rows, columns)}"


def testing_state_text(
    cls: str,
    results_for_cls: Mapping[str, dict],
    det_threshold: float | None = None,
    seg_threshold: float | None = None,
) -> str:
    """The content of ``<cls>/testing_state.txt`` (SPEC 9.1), as the reference writes it.

    With ``--viz`` the optimal detection and segmentation thresholds (SPEC 10) come
    first, with 2 decimals; then one block per method with 3-decimal metrics.
    """
    lines = []
    if det_threshold is not None:
        lines.append(f"Optimal DET Threshold: {det_threshold:.2f}\n")
    if seg_threshold is not None:
        lines.append(f"Optimal SEG Threshold: {seg_threshold:.2f}\n")
    for m in METHODS:
        r = results_for_cls[m]
        pros = "\n".join(f"{_PRO_INDENT}AU-PRO {limit}: {r['au_pro'][limit]:.3f}" for limit in PRO_LIMITS)
        lines.append(
            f"Class: {cls}, {m} Image ROCAUC: {r['image_auroc']:.3f}, "
            f"{m} Pixel ROCAUC: {r['pixel_auroc']:.3f}, {m}{pros}\n"
        )
    return "".join(lines)


def alignment_line(cls: str, weight: float, bias: float) -> str:
    """One line of ``alignment.txt`` (SPEC 7, 9.1): ``'<cls>'\\t:[<w>, <b>],`` with 16 decimals."""
    return "'%s'\t:[%.16f, %.16f],\n" % (cls, weight, bias)


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _json_metrics(r: Mapping) -> dict:
    return {
        "image_auroc": _json_number(r["image_auroc"]),
        "pixel_auroc": _json_number(r["pixel_auroc"]),
        "au_pro": {str(limit): _json_number(r["au_pro"][limit]) for limit in PRO_LIMITS},
    }


def _json_native(r: Mapping) -> dict:
    return {
        "image_auroc_map_max": _json_number(r["image_auroc"]),
        "pixel_auroc": _json_number(r["pixel_auroc"]),
        "au_pro": {str(limit): _json_number(r["au_pro"][limit]) for limit in PRO_LIMITS},
    }


def _mean_metrics(per_class: Sequence[Mapping]) -> dict:
    """The plain mean over classes of unrounded metric dicts (``image_auroc``, ``pixel_auroc``, ``au_pro``)."""
    return {
        "image_auroc": np.mean([r["image_auroc"] for r in per_class]),
        "pixel_auroc": np.mean([r["pixel_auroc"] for r in per_class]),
        "au_pro": {limit: np.mean([r["au_pro"][limit] for r in per_class]) for limit in PRO_LIMITS},
    }


NATIVE_PROTOCOL = ("the official MVTec 3D-AD evaluation's metrics on the fused and single-expert maps at "
                   "native resolution: each 224 x 224 map upsampled (bilinear) to the preprocessed size, the "
                   "padding cropped off, against the gt at the same size (any non-zero value anomalous); "
                   "pixel AUROC over all pixels, AU-PRO as in the paper tables (8-connected regions, 100 "
                   "thresholds), image AUROC from each map's maximum")


def native_json(native: Mapping[str, Mapping[str, dict]], frames: Mapping[str, str],
                sources: Mapping[str, Sequence[str]], classes: Sequence[str]) -> dict:
    """The ``native_protocol`` section of ``results.json`` (SPEC 9.2): per class its frame
    ('raw', 'preprocessed' or 'mixed'), where the raw sizes came from, and every number unrounded;
    "mean" is the plain mean over classes."""
    return {
        "protocol": NATIVE_PROTOCOL,
        "frame": native_frame_text(frames, classes),
        "classes": {c: {"frame": frames[c], "raw_sizes_from": list(sources[c]),
                        "metrics": {m: _json_native(native[c][m]) for m in METHODS}} for c in classes},
        "mean": {m: _json_native(_mean_metrics([native[c][m] for c in classes])) for m in METHODS},
    }


def results_json(
    results: Mapping[str, Mapping[str, dict]],
    classes: Sequence[str],
    alignment: Mapping[str, tuple[float, float]] | None = None,
    thresholds: Mapping[str, tuple[float, float]] | None = None,
) -> dict:
    """Every number of a run, unrounded, as a JSON-serialisable dict (for ``results.json``).

    ``alignment[cls] = (weight, bias)`` and ``thresholds[cls] = (det, seg)`` are optional.
    Layout: ``{"methods", "pro_limits", "classes": {cls: {"metrics": {method: {...}},
    "alignment": {...}, "optimal_thresholds": {...}}}, "mean": {method: {...}}}``; "mean" is
    the plain mean over classes of the unrounded values. Undefined values (NaN) become null.
    """
    out: dict = {"methods": list(METHODS), "pro_limits": list(PRO_LIMITS), "classes": {}, "mean": {}}
    for cls in classes:
        entry: dict = {"metrics": {m: _json_metrics(results[cls][m]) for m in METHODS}}
        if alignment is not None and cls in alignment:
            weight, bias = alignment[cls]
            entry["alignment"] = {"weight": float(weight), "bias": float(bias)}
        if thresholds is not None and cls in thresholds:
            det, seg = thresholds[cls]
            entry["optimal_thresholds"] = {"detection": float(det), "segmentation": float(seg)}
        out["classes"][cls] = entry
    for m in METHODS:
        out["mean"][m] = _json_metrics(_mean_metrics([results[c][m] for c in classes]))
    return out
