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

What is written, and where, is :mod:`core.outputs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.alignment import N_ALIGN, align
from core.dataset import IMAGE_SIZE, Sample, list_samples, load_gt_mask, resolve_classes
from core.inference import Prediction, encode_sample, predict
from core.memory import DualMemory, EncodedSample, MemoryBuilder, load_sample_input
from core.outputs import ClassResult, make_result_dir, write_class_outputs, write_configuration, write_results
from core.patch_files import POINT_NUM
from core.preflight import check_run_inputs
from core.rgb_features import build_rgb_extractor
from core.sdf_model import load_sdf_checkpoint
from utils.device import resolve_device
from utils.metrics import evaluate_method
from utils.pool import prefetch
from utils.reporting import METHODS
from utils.visualization import denormalize_rgb

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


# ----------------------------------------------------------------------------- the per-class loop
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
        bar = tqdm(prefetch(self.load, ordered, PREFETCH), total=len(ordered), desc=f"{cls}: memory", unit="sample")
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
            bar = tqdm(prefetch(self.load, test, PREFETCH), total=len(test), desc=f"{cls}: test", unit="sample")
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
            out["rgb_image"] = denormalize_rgb(inp.rgb.cpu().numpy(), self.rgb.mean, self.rgb.std)
        return out


def run(cfg: RunConfig) -> tuple[Path, dict[str, ClassResult]]:
    """Run every class; return the result folder and the per-class results."""
    classes = resolve_classes(cfg.datasets_path, cfg.classes)
    check_run_inputs(cfg.datasets_path, cfg.grid_path, classes, cfg.output_dir)   # before any model or work
    device = resolve_device(cfg.device)
    sdf_model, iteration = load_sdf_checkpoint(cfg.ckpt_path, map_location=device)
    extractor = build_rgb_extractor(cfg.rgb_backbone, cfg.rgb_weights, device, seed=cfg.seed)
    result_dir = make_result_dir(cfg.output_dir)
    write_configuration(result_dir, cfg, classes, device, extractor.name, iteration)
    pipe = Pipeline(cfg, sdf_model, extractor, device)
    results: dict[str, ClassResult] = {}
    for cls in classes:
        results[cls] = res = pipe.run_class(cls)
        write_class_outputs(result_dir, res, list(results.values()), cfg.viz, cfg.save_maps)
    tables = write_results(result_dir, results, classes)
    print(tables)
    return result_dir, results
