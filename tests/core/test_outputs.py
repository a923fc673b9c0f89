"""What main.py writes (core/outputs.py): maps in the native frame, the fourth table, the JSON section."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from core.alignment import Alignment
from core.dataset import Sample
from core.native import FROM_MANIFEST, FROM_NONE, NativeFrame, to_native
from core.outputs import ClassResult, ClassSummary, summarize, write_alignment, write_class_outputs, write_results
from utils.metrics import PRO_LIMITS, evaluate_method
from utils.reporting import METHODS, NATIVE_TITLE, results_tables


def _result(cls: str, frames: list[NativeFrame], seed: int = 0) -> ClassResult:
    rng = np.random.default_rng(seed)
    samples = [Sample(Path("/data"), cls, "test", d, "000", Path("r.png"), Path("x.tiff")) for d in ("bump", "good")]
    maps = {m: rng.random((2, 224, 224)).astype(np.float32) for m in METHODS}
    masks = np.zeros((2, 224, 224), np.float32)
    masks[0, 50:70, 60:90] = 1
    one = np.float32(1)
    res = ClassResult(cls, Alignment(one, one, one, one, one, one, 2), samples, np.array([1, 0]),
                      {m: rng.random(2).astype(np.float32) for m in METHODS}, maps, masks, frames=frames)
    res.metrics = {m: evaluate_method(res.labels, res.scores[m], masks, maps[m]) for m in METHODS}
    res.native = {m: {"image_auroc": 0.5, "pixel_auroc": 0.25 + 0.125 * i,
                      "au_pro": {limit: limit + i for limit in PRO_LIMITS}} for i, m in enumerate(METHODS)}
    return res


def test_saved_maps_are_in_each_samples_native_frame(tmp_path):
    frames = [NativeFrame((200, 200), ((0, 0), (15, 15)), FROM_MANIFEST), NativeFrame((300, 300), ((0, 0),) * 2,
                                                                                       FROM_NONE)]
    res = _result("rope", frames)
    write_class_outputs(tmp_path, res, viz=False, save_maps=True)
    for sample, m, frame, shape in zip(res.samples, res.maps["RGB_SDF"], frames, ((200, 170), (300, 300))):
        saved = tifffile.imread(tmp_path / "anomaly_maps" / "rope" / "test" / sample.defect / "000.tiff")
        assert saved.dtype == np.float32 and saved.shape == shape
        np.testing.assert_array_equal(saved, to_native(m, frame))


def test_results_have_the_paper_tables_then_the_native_table(tmp_path):
    raw = [NativeFrame((200, 200), ((0, 0), (15, 15)), FROM_MANIFEST)] * 2
    results = {"bagel": _result("bagel", raw, 1), "rope": _result("rope", [raw[0], NativeFrame(
        (200, 200), ((0, 0),) * 2, FROM_NONE)], 2)}
    tables = write_results(tmp_path, [summarize(r) for r in results.values()], ["bagel", "rope"])
    text = (tmp_path / "results.txt").read_text()
    paper = results_tables({c: r.metrics for c, r in results.items()}, ["bagel", "rope"])
    assert text == tables and text.startswith(paper + " \n\n")
    fourth = text[len(paper) + 3:].splitlines()
    assert fourth[0] == f"{NATIVE_TITLE}, frame per class: Bagel raw, Rope mixed "
    assert fourth[2] == "| Method               |   Bagel |   Rope |   Mean |"
    assert fourth[4] == "| RGB_Pixel_ROCAUC     |   0.25  |  0.25  |  0.25  |"
    assert fourth[12] == "| SDF_Pixel_ROCAUC     |   0.375 |  0.375 |  0.375 |"
    assert fourth[13] == "| SDF_AU_PRO_0.3       |   1.3   |  1.3   |  1.3   |"
    assert fourth[-1] == "| RGB_SDF_AU_PRO_0.01  |   2.01  |  2.01  |  2.01  |"
    assert len(fourth) == 4 + 3 * 8
    report = json.loads((tmp_path / "results.json").read_text())
    native = report["native_protocol"]
    assert native["frame"] == "frame per class: Bagel raw, Rope mixed"
    assert native["classes"]["bagel"]["frame"] == "raw" and native["classes"]["rope"]["frame"] == "mixed"
    assert native["classes"]["rope"]["raw_sizes_from"] == ["none", "preprocessing manifest"]
    assert native["classes"]["rope"]["metrics"]["RGB_SDF"] == {
        "image_auroc_map_max": 0.5, "pixel_auroc": 0.5, "au_pro": {str(k): k + 2 for k in PRO_LIMITS}}
    assert native["mean"]["SDF"]["au_pro"]["0.01"] == 1.01
    assert report["classes"]["bagel"]["metrics"]["RGB"]["pixel_auroc"] == results["bagel"].metrics["RGB"][
        "pixel_auroc"]


def summary(cls: str, value: float, rank: int) -> ClassSummary:
    metrics = {m: {"image_auroc": value, "pixel_auroc": value / 2, "au_pro": {p: value / 3 for p in PRO_LIMITS}}
               for m in METHODS}
    return ClassSummary(cls, np.float32(1.5 * value), np.float32(-value), metrics,
                        per_defect_type={m: {"bump": {"image_auroc": value}} for m in METHODS},
                        native=metrics, frame="raw", frame_sources=["preprocessing manifest"], memory_samples=4,
                        thresholds=(0.25, 0.5), times={"sdf_decoder": 3.0 + rank}, rank=rank)


def test_shared_files_in_class_order_whatever_order_the_summaries_came_in(tmp_path):
    """What rank 0 writes from gathered summaries: the class order of the run, timings in their own file."""
    classes = ["bagel", "cookie"]
    done = [summary("bagel", 0.75, 0), summary("cookie", 0.5, 1)]
    for name, order in (("a", done), ("b", done[::-1])):
        (tmp_path / name).mkdir()
        tables = write_results(tmp_path / name, order, classes)
        write_alignment(tmp_path / name, [next(s for s in order if s.cls == c) for c in classes])
        assert (tmp_path / name / "results.txt").read_text() == tables
    for f in ("results.txt", "results.json", "timing.json", "alignment.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    report = json.loads((tmp_path / "a" / "results.json").read_text())
    assert list(report["classes"]) == classes and "timing_seconds" not in report
    assert report["classes"]["cookie"]["metrics"]["SDF"]["image_auroc"] == 0.5
    assert report["classes"]["bagel"]["per_defect_type"]["RGB"] == {"bump": {"image_auroc": 0.75}}
    assert report["classes"]["bagel"]["alignment"] == {"weight": 1.125, "bias": -0.75}
    assert json.loads((tmp_path / "a" / "timing.json").read_text()) == {
        "classes": {"bagel": {"rank": 0, "seconds": {"sdf_decoder": 3.0}},
                    "cookie": {"rank": 1, "seconds": {"sdf_decoder": 4.0}}}}
    assert (tmp_path / "a" / "alignment.txt").read_text().splitlines()[1].startswith("'cookie'\t:[")
    assert tables.index("Bagel") < tables.index("Cookie")
