"""What ``main.py`` runs (SPEC 6-10, Appendix D): per class fit -> align -> test -> metrics -> outputs.

The SDF model and the RGB backbone are built once (the reference rebuilt them per class,
SPEC 11 #36 FIX); the class memory, its alignment samples and the test loop stay on the
compute device. Sample files are read one or two samples ahead in a background thread.

Sample orders. The reference iterates the training set through shuffled DataLoaders
whose permutations come from torch's global RNG after ``manual_seed(seed)`` and the
random initialisation of its SDF network (Appendix A). :func:`reference_sample_orders`
replays exactly those draws (without a DataLoader) so that the memory is concatenated in
the reference's fit order and alignment uses the reference's first 25 samples; with
float arithmetic the order changes the last bits of sums (NumPy's alignment statistics,
summation order in nothing else), and the alignment subset itself when a class has more
than 25 training samples. Test samples are processed in sorted order (SPEC 11 #18 FIX).

Outputs (SPEC 9.1) go to ``<output_dir>/<YYYY-mm-dd-HH-MM-SS>-result/``; ``results.txt``
and ``results.json`` are written last, atomically, so a run that stopped early has none.
"""
from __future__ import annotations

import datetime
import itertools
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from core.alignment import N_ALIGN, Alignment, align
from core.dataset import IMAGE_SIZE, Sample, list_samples, load_gt_mask, resolve_classes
from core.inference import K_RGB, K_SDF, N_NONZERO, Prediction, encode_sample, predict
from core.memory import DualMemory, EncodedSample, MemoryBuilder, load_sample_input
from core.patches import POINT_NUM
from utils.device import resolve_device
from utils.io import DataError, atomic_path, save_configuration, write_text
from utils.metrics import evaluate_method
from utils.metrics import per_defect_type
from utils.reporting import METHODS, alignment_line, results_json, results_tables, testing_state_text

PREFETCH = 2  # samples read ahead of the computation


@dataclass
class RunConfig:
    """Everything ``main.py`` takes on its command line."""

    datasets_path: Path
    grid_path: Path
    ckpt_path: Path
    output_dir: Path = Path("output")
    classes: Optional[list[str]] = None
    device: str = "auto"
    seed: int = 0
    viz: bool = False
    save_maps: bool = False
    rgb_backbone: str = "wide_resnet50_2"
    rgb_weights: Optional[str] = None
    point_num: int = POINT_NUM
    keep_predictions: bool = False  # keep every test sample's full Prediction (tests, debugging)


# ----------------------------------------------------------------------------- sample orders
def _replay_reference_sdf_init() -> None:
    """Consume the global-RNG draws of the reference's SDF network construction (Appendix A).

    The reference builds its PointNet encoder and NIF decoder with PyTorch's default layer
    initialisation plus normal re-initialisations of ``fc3``, the seven ``fc4*`` layers
    (created as plain Linear layers, then weight-normalised) and ``fc5``, in that order.
    Only the number of draws matters, so throwaway layers of the same shapes are built.
    """
    for c_in, c_out in ((3, 64), (64, 128), (128, 1024)):
        nn.Conv1d(c_in, c_out, 1)
    for f_in, f_out in ((1024, 512), (512, 128), (128, 512), (3, 512)):
        nn.Linear(f_in, f_out)
    nn.init.normal_(nn.Linear(1024, 512).weight)
    for _ in range(7):
        nn.init.normal_(nn.Linear(512, 512).weight)
    nn.init.normal_(nn.Linear(512, 1).weight)


def _shuffled_loader_order(n: int) -> list[int]:
    """The permutation a fresh ``DataLoader(shuffle=True)`` iterator draws from the global RNG:
    one int64 for the iterator's base seed, one for the sampler's generator seed, then
    ``randperm(n)`` on that generator (torch.utils.data RandomSampler)."""
    torch.empty((), dtype=torch.int64).random_()  # _BaseDataLoaderIter._base_seed
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.randperm(n, generator=gen).tolist()


def reference_sample_orders(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit order, align order) of ``n`` training samples as the reference draws them (Appendix A).

    Replays ``manual_seed(seed)``, the SDF network's initialisation draws and two shuffled
    loaders, on a forked RNG (the caller's RNG state is untouched). Reproduces the
    reference's orders with the same PyTorch version (checked on the parity fixture).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _replay_reference_sdf_init()
        fit = _shuffled_loader_order(n)
        align_order = _shuffled_loader_order(n)
    return fit, align_order


# ----------------------------------------------------------------------------- helpers
def prefetch(fn: Callable, items: Iterable, depth: int = PREFETCH) -> Iterator:
    """``map(fn, items)`` evaluated ``depth`` items ahead in background threads, in order."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending = deque(pool.submit(fn, item) for item in itertools.islice(items, depth))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result


def original_size(sample: Sample) -> tuple[int, int]:
    """(H, W) of the sample's xyz TIFF, read from its header."""
    import tifffile

    try:
        with tifffile.TiffFile(sample.xyz) as tif:
            shape = tif.pages[0].shape
    except Exception as exc:  # tifffile raises many types for corrupt data
        raise DataError(f"{sample.xyz}: cannot read TIFF header ({type(exc).__name__}: {exc})") from exc
    return int(shape[0]), int(shape[1])


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) resize of a (224, 224) map to ``size``, float32."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def write_tiff_map(path: Path, m: np.ndarray) -> None:
    """Atomically write a float32 2-D map as TIFF."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(m, dtype=np.float32))


# ----------------------------------------------------------------------------- results
@dataclass
class ClassResult:
    """Everything recorded for one class (SPEC 8.4, 9)."""

    cls: str
    alignment: Alignment
    samples: list[Sample]
    labels: np.ndarray             # (T,)
    scores: dict[str, np.ndarray]  # method -> (T,) image scores
    maps: dict[str, np.ndarray]    # method -> (T, 224, 224) blurred maps
    masks: np.ndarray              # (T, 224, 224) float32 {0, 1}
    metrics: dict = field(default_factory=dict)
    thresholds: Optional[tuple[float, float]] = None
    times: dict = field(default_factory=dict)
    rgb_images: Optional[np.ndarray] = None  # (T, 224, 224, 3) uint8 inputs, kept only for --viz
    predictions: Optional[list[Prediction]] = None  # kept only with RunConfig.keep_predictions


class Pipeline:
    """Runs classes with one SDF model and one RGB extractor on one device."""

    def __init__(self, cfg: RunConfig, sdf_model, rgb_extractor, device: torch.device):
        self.cfg = cfg
        self.sdf_model = sdf_model.to(device).eval()
        self.rgb = rgb_extractor.to(device).eval()
        self.device = device

    def load(self, sample: Sample):
        return load_sample_input(sample, self.cfg.grid_path, self.rgb.mean, self.rgb.std, self.cfg.point_num)

    def encode(self, inp, times: Optional[dict] = None) -> EncodedSample:
        return encode_sample(inp, self.sdf_model, self.rgb, self.device, times)

    def fit(self, cls: str, train: list[Sample], fit_order: list[int], keep: set[int],
            times: Optional[dict] = None) -> tuple[DualMemory, dict[int, EncodedSample]]:
        """Build the class memory in ``fit_order`` (SPEC 6); return it and the encodings of ``keep``."""
        builder, kept = MemoryBuilder(), {}
        ordered = [train[i] for i in fit_order]
        bar = tqdm(prefetch(self.load, ordered), total=len(ordered), desc=f"{cls}: memory", unit="sample")
        for i, inp in zip(fit_order, bar):
            enc = self.encode(inp, times)
            builder.add(enc)
            if i in keep:
                kept[i] = enc
        return builder.build(), kept

    def run_class(self, cls: str) -> ClassResult:
        """fit -> align -> test loop -> metrics for one class (Appendix D)."""
        cfg = self.cfg
        times: dict = {}
        train = list_samples(cfg.datasets_path, cls, "train")
        test = list_samples(cfg.datasets_path, cls, "test")
        fit_order, align_order = reference_sample_orders(len(train), cfg.seed)
        align_ids = align_order[:N_ALIGN]
        with torch.no_grad():
            memory, kept = self.fit(cls, train, fit_order, set(align_ids), times)
            alignment = align(memory, self.sdf_model, [kept.pop(i) for i in align_ids], times,
                              progress=lambda it: tqdm(it, total=len(align_ids), desc=f"{cls}: alignment",
                                                       unit="sample"))
            del kept
            preds, full = [], []
            bar = tqdm(prefetch(self.load, test), total=len(test), desc=f"{cls}: test", unit="sample")
            for inp in bar:
                pred = predict(memory, self.sdf_model, self.encode(inp, times), "testing",
                               alignment.weight, alignment.bias, times)
                preds.append(self._record(inp, pred))
                if cfg.keep_predictions:
                    full.append(pred)
        result = ClassResult(
            cls, alignment, test,
            labels=np.array([s.label for s in test], dtype=np.int64),
            scores={"RGB": np.array([p["rgb_score"] for p in preds], dtype=np.float32),
                    "SDF": np.array([p["sdf_score"] for p in preds], dtype=np.float32),
                    "RGB_SDF": np.array([p["score"] for p in preds], dtype=np.float32)},
            maps={"RGB": np.stack([p["rgb_map"] for p in preds]),
                  "SDF": np.stack([p["sdf_map"] for p in preds]),
                  "RGB_SDF": np.stack([p["fused_map"] for p in preds])},
            masks=np.stack([load_gt_mask(s, IMAGE_SIZE) for s in test]),
            times=times,
            rgb_images=np.stack([p["rgb_image"] for p in preds]) if cfg.viz else None,
            predictions=full if cfg.keep_predictions else None)
        for method in METHODS:
            result.metrics[method] = evaluate_method(result.labels, result.scores[method], result.masks,
                                                     result.maps[method])
        return result

    def _record(self, inp, pred: Prediction) -> dict:
        """What the test loop keeps of one sample (SPEC 8.4)."""
        out = dict(sdf_score=pred.sdf_score, rgb_score=pred.rgb_score, score=pred.score,
                   sdf_map=pred.sdf_map_blur, rgb_map=pred.rgb_map_blur, fused_map=pred.fused_map_blur)
        if self.cfg.viz:
            from utils.visualization import denormalize_rgb

            out["rgb_image"] = denormalize_rgb(inp.rgb.cpu().numpy(), self.rgb.mean, self.rgb.std)
        return out

    # ------------------------------------------------------------------------- outputs
    def write_class_outputs(self, result: ClassResult, result_dir: Path) -> None:
        """``alignment.txt`` line, ``<cls>/testing_state.txt``, optional heatmaps and TIFF maps."""
        cls = result.cls
        with open(result_dir / "alignment.txt", "a", encoding="utf-8") as fh:
            fh.write(alignment_line(cls, result.alignment.weight, result.alignment.bias))
        det = seg = None
        if self.cfg.viz:
            from utils.visualization import optimal_threshold, save_heatmaps

            det = optimal_threshold(result.labels, result.scores["RGB_SDF"])
            seg = optimal_threshold(result.masks, result.maps["RGB_SDF"])
            result.thresholds = (det, seg)
            images_dir = result_dir / cls / "Visualization" / "images"
            save_heatmaps(images_dir, result.rgb_images, result.masks, result.maps["RGB_SDF"], seg)
            result.rgb_images = None
        write_text(result_dir / cls / "testing_state.txt", testing_state_text(cls, result.metrics, det, seg))
        if self.cfg.save_maps:
            for sample, m in tqdm(list(zip(result.samples, result.maps["RGB_SDF"])), desc=f"{cls}: maps",
                                  unit="map"):
                path = result_dir / "anomaly_maps" / cls / "test" / sample.defect / f"{sample.stem}.tiff"
                write_tiff_map(path, upsample_map(m, original_size(sample)))


def make_result_dir(output_dir: Path) -> Path:
    """A new ``<output_dir>/<YYYY-mm-dd-HH-MM-SS>-result`` folder (a suffix avoids collisions)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    for n in itertools.count():
        path = Path(output_dir, f"{stamp}-result" + (f"-{n}" if n else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def write_configuration(cfg: RunConfig, classes: list[str], result_dir: Path, extra: dict) -> None:
    """``Congiguration.txt``/``.pickle`` (reference attribute names, SPEC 9.1) and ``configuration.json``."""
    config = {
        "BS": 1, "POINT_NUM": cfg.point_num, "ckpt_path": str(cfg.ckpt_path), "classes": classes,
        "datasets_path": str(cfg.datasets_path), "dict_n_component": N_NONZERO, "grid_path": str(cfg.grid_path),
        "image_size": IMAGE_SIZE, "k_number": K_SDF, "k_rgb": K_RGB, "method_name": list(METHODS),
        "output_dir": str(result_dir), "rgb_method": "Dict", "viz": cfg.viz, "save_maps": cfg.save_maps,
        "device": str(extra.get("device")), "seed": cfg.seed, "rgb_backbone": cfg.rgb_backbone,
        "rgb_weights": extra.get("rgb_weights"), "sdf_checkpoint_iteration": extra.get("iteration"),
    }
    save_configuration(result_dir, config, pickle_protocol=2)
    write_text(result_dir / "configuration.json", json.dumps(config, indent=2) + "\n")


def run(cfg: RunConfig) -> tuple[Path, dict[str, ClassResult]]:
    """Run every class; return the result folder and the per-class results."""
    from core.rgb_features import build_rgb_extractor
    from core.sdf_model import load_sdf_checkpoint

    classes = resolve_classes(cfg.datasets_path, cfg.classes)
    device = resolve_device(cfg.device)
    sdf_model, iteration = load_sdf_checkpoint(cfg.ckpt_path, map_location=device)
    extractor = build_rgb_extractor(cfg.rgb_backbone, cfg.rgb_weights, device, seed=cfg.seed)
    result_dir = make_result_dir(cfg.output_dir)
    write_configuration(cfg, classes, result_dir, dict(device=device, rgb_weights=extractor.name,
                                                       iteration=iteration))
    pipe = Pipeline(cfg, sdf_model, extractor, device)
    results: dict[str, ClassResult] = {}
    for cls in classes:
        results[cls] = res = pipe.run_class(cls)
        pipe.write_class_outputs(res, result_dir)
    tables = results_tables({c: r.metrics for c, r in results.items()}, classes)
    report = results_json({c: r.metrics for c, r in results.items()}, classes,
                          alignment={c: (r.alignment.weight, r.alignment.bias) for c, r in results.items()},
                          thresholds={c: r.thresholds for c, r in results.items() if r.thresholds})
    for c, r in results.items():
        report["classes"][c]["per_defect_type"] = {
            m: per_defect_type([s.defect for s in r.samples], r.labels, r.scores[m], r.masks, r.maps[m])
            for m in METHODS}
    report["timing_seconds"] = {c: r.times for c, r in results.items()}
    write_text(result_dir / "results.json", json.dumps(report, indent=2) + "\n")
    write_text(result_dir / "results.txt", tables)
    print(tables)
    return result_dir, results
