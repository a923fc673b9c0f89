"""Text and JSON reports of ``main.py`` (SPEC 9 and 9.1).

* ``results.txt``: three Markdown tables (pandas ``to_markdown``), byte-identical to the
  reference's file. Per-class values are rounded to 3 decimals first (the AUROCs are
  Python floats, AU-PRO values NumPy floats, each rounded by its own ``round``); the
  "Mean" column is the mean of the rounded values, rounded to 3 decimals (SPEC 11 #33, KEEP).
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
        mean = {
            "image_auroc": np.mean([results[c][m]["image_auroc"] for c in classes]),
            "pixel_auroc": np.mean([results[c][m]["pixel_auroc"] for c in classes]),
            "au_pro": {limit: np.mean([results[c][m]["au_pro"][limit] for c in classes]) for limit in PRO_LIMITS},
        }
        out["mean"][m] = _json_metrics(mean)
    return out
