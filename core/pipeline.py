"""What ``main.py`` runs (SPEC 6-10, Appendix D): per class fit -> align -> test -> metrics -> outputs.

The SDF model and the RGB backbone are built once (the reference rebuilt them per class,
SPEC 11 #36 FIX); the class memory, its alignment samples and the test loop stay on the
compute device. Sample files are read one sample ahead in a background thread, which does file
reading and decoding only; the torch part of loading runs in the main thread (SPEC 12.3).
The networks run in ``cfg.precision`` (:mod:`utils.precision`, SPEC 12.4): fp32, the faithful
computation, by default.

Sample orders. The reference iterates the training set through shuffled DataLoaders
whose permutations come from torch's global RNG after ``manual_seed(seed)`` and the
random initialisation of its SDF network (Appendix A). :func:`reference_sample_orders`
replays exactly those draws (without a DataLoader) so that the memory is concatenated in
the reference's fit order and alignment uses the reference's first 25 samples; with
float arithmetic the order changes the last bits of sums (NumPy's alignment statistics,
summation order in nothing else), and the alignment subset itself when a class has more
than 25 training samples. Test samples are processed in sorted order (SPEC 11 #18 FIX).

Besides the paper's metrics on 224 x 224 maps (SPEC 9), every class is scored with the
official MVTec 3D-AD protocol at native resolution (SPEC 9.2, :mod:`core.native`): the
native frames of the test samples are resolved before any computation, so a wrong
``--raw_datasets_path`` stops the run at once.

Method flags (SPEC 13): ``cfg.method`` (:class:`core.params.MethodParams`) carries the
neighbour counts, OMP atoms, footprint shift, alignment size and factor and blur radius
to the functions that use them; with ``n_train`` a class's memory is built from a seeded
subset of its training samples (:func:`few_shot_subset`), which then plays the role of
the whole training set (its fit and alignment orders are drawn for its size).

What is written, and where, is :mod:`core.outputs`.

Several processes (``torchrun --nproc_per_node N main.py ...``): the classes are independent,
so they are sharded over the ranks (:func:`shard_classes`, balanced by sample counts), each
rank runs its classes on its own device (``cuda:LOCAL_RANK`` or the CPU) and writes their
per-class files; rank 0 creates the result folder, gathers every class's
:class:`core.outputs.ClassSummary` and writes ``alignment.txt``, ``timing.json``,
``results.json`` and ``results.txt`` in the class order of a single process, with the same
bytes. A failing rank exits non-zero and torchrun stops the others, so ``results.txt`` is
only written when every class finished.
"""
from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.alignment import align
from core.dataset import IMAGE_SIZE, Sample, list_samples, load_gt_mask, resolve_classes
from core.inference import Prediction, encode_sample, predict, stage
from core.memory import DualMemory, EncodedSample, MemoryBuilder, SampleInput, read_sample_files, sample_input
from core.native import FROM_NONE, NativeFrame, frame_notice, native_metrics, resolve_frames
from core.outputs import (ClassResult, ClassSummary, make_result_dir, summarize, write_alignment,
                          write_class_outputs, write_configuration, write_results)
from core.params import MethodParams
from core.patch_files import POINT_NUM
from core.preflight import check_run_inputs
from core.rgb_features import build_rgb_extractor
from core.sdf_model import load_sdf_checkpoint
from utils import distributed
from utils.allocator import keep_freed_memory
from utils.errors import DataError
from utils.metrics import evaluate_method
from utils.pool import prefetch
from utils.precision import FP32, Precision, resolve_precision
from utils.reporting import METHODS
from utils.visualization import denormalize_rgb

# Samples read ahead of the computation, by one thread. Reading (~25 ms for an 800 x 800 sample)
# is far shorter than computing it; torch operations started in a reading thread would start a
# second OpenMP pool competing with the computation for the cores (SPEC 12.3).
PREFETCH = 1
CLASS_WAIT = datetime.timedelta(hours=24)  # how long a finished rank waits for the others (torchrun)


@dataclass
class RunConfig:
    """Everything ``main.py`` takes on its command line."""

    datasets_path: Path
    grid_path: Path
    ckpt_path: Path
    raw_datasets_path: Optional[Path] = None  # the data set before preprocessing (raw sizes, SPEC 9.2)
    output_dir: Path = Path("output")
    classes: Optional[list[str]] = None
    device: str = "auto"
    seed: int = 0
    viz: bool = False
    save_maps: bool = False
    rgb_backbone: str = "wide_resnet50_2"
    rgb_weights: Optional[str] = None
    point_num: int = POINT_NUM
    method: MethodParams = field(default_factory=MethodParams)  # the method flags (SPEC 13)
    precision: str = "fp32"  # arithmetic of the networks (utils.precision; SPEC 12.4)
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


def few_shot_subset(n_total: int, n: Optional[int], seed: int = 0) -> list[int]:
    """Indices (ascending) of the training samples a class keeps with ``--n_train n`` (SPEC 13).

    The first ``n`` entries of ``numpy.random.default_rng(seed).permutation(n_total)``, sorted;
    every index when ``n`` is None or at least ``n_total`` (the paper's setting).
    """
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).permutation(n_total)[:n].tolist())


# ----------------------------------------------------------------------------- the per-class loop
class Pipeline:
    """Runs classes with one SDF model and one RGB extractor on one device."""

    def __init__(self, cfg: RunConfig, sdf_model, rgb_extractor, device: torch.device,
                 precision: Precision = FP32):
        self.cfg = cfg
        self.sdf_model = sdf_model.to(device).eval()
        self.rgb = rgb_extractor.to(device).eval()
        self.device = device
        self.precision = precision

    def read(self, sample: Sample):
        return read_sample_files(sample, self.cfg.grid_path, self.cfg.point_num)

    def inputs(self, samples: list[Sample], desc: str) -> Iterator[SampleInput]:
        """The samples' inputs in order, files read one ahead in a thread, with a progress bar."""
        bar = tqdm(prefetch(self.read, samples, PREFETCH), total=len(samples), desc=desc, unit="sample")
        for files in bar:
            yield sample_input(files, self.rgb.mean, self.rgb.std)

    def encode(self, inp, times: Optional[dict] = None) -> EncodedSample:
        return encode_sample(inp, self.sdf_model, self.rgb, self.device, times, self.cfg.method.footprint_shift,
                             self.precision)

    def fit(self, cls: str, train: list[Sample], fit_order: list[int], keep: set[int],
            times: Optional[dict] = None) -> tuple[DualMemory, dict[int, EncodedSample]]:
        """Build the class memory in ``fit_order`` (SPEC 6); return it and the encodings of ``keep``."""
        builder, kept = MemoryBuilder(), {}
        ordered = [train[i] for i in fit_order]
        for i, inp in zip(fit_order, self.inputs(ordered, f"{cls}: memory")):
            enc = self.encode(inp, times)
            builder.add(enc)
            if i in keep:
                kept[i] = enc
        return builder.build(), kept

    def run_class(self, cls: str, test: list[Sample], frames: list[NativeFrame]) -> ClassResult:
        """fit -> align -> test loop -> metrics for one class (Appendix D); ``test`` are its test
        samples, ``frames`` their native frames (SPEC 9.2)."""
        cfg, params = self.cfg, self.cfg.method
        times: dict = {"memory": {}, "alignment": {}, "test": {}, "metrics": {}}   # seconds per phase and stage
        every = list_samples(cfg.datasets_path, cls, "train")
        train = [every[i] for i in few_shot_subset(len(every), params.n_train, cfg.seed)]
        fit_order, align_order = reference_sample_orders(len(train), cfg.seed)
        align_ids = align_order[:params.align_samples]
        options = params.predict_options()
        with torch.no_grad():
            memory, kept = self.fit(cls, train, fit_order, set(align_ids), times["memory"])
            alignment = align(memory, self.sdf_model, [kept.pop(i) for i in align_ids], times["alignment"],
                              progress=lambda it: tqdm(it, total=len(align_ids), desc=f"{cls}: alignment",
                                                       unit="sample"),
                              sigma=params.align_sigma, precision=self.precision, **options)
            del kept
            preds, full = [], []
            for inp in self.inputs(test, f"{cls}: test"):
                pred = predict(memory, self.sdf_model, self.encode(inp, times["test"]), "testing",
                               alignment.weight, alignment.bias, times["test"], precision=self.precision, **options)
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
            predictions=full if cfg.keep_predictions else None, frames=frames,
            memory_samples=list(memory.sample_names),
            train_subset=[s.stem for s in train] if len(train) < len(every) else None)
        for method in METHODS:
            with stage(times["metrics"], "paper", torch.device("cpu")):
                result.metrics[method] = evaluate_method(result.labels, result.scores[method], result.masks,
                                                         result.maps[method])
        with stage(times["metrics"], "native", torch.device("cpu")):
            result.native = native_metrics(test, frames, result.maps)
        return result

    def _record(self, inp, pred: Prediction) -> dict:
        """What the test loop keeps of one sample (SPEC 8.4)."""
        out = dict(sdf_score=pred.sdf_score, rgb_score=pred.rgb_score, score=pred.score,
                   sdf_map=pred.sdf_map_blur, rgb_map=pred.rgb_map_blur, fused_map=pred.fused_map_blur)
        if self.cfg.viz:
            out["rgb_image"] = denormalize_rgb(inp.rgb.cpu().numpy(), self.rgb.mean, self.rgb.std)
        return out


# ----------------------------------------------------------------------------- classes over ranks
def balance_classes(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Classes per rank: largest first to the least loaded rank (ties: earlier class, lower rank).

    ``sizes`` maps each class, in run order, to its work (sample count); every rank's list
    keeps the run order. Deterministic, so every rank could compute it; rank 0 does.
    """
    order = list(sizes)
    loads = [0] * world_size
    shards: list[list[str]] = [[] for _ in range(world_size)]
    for cls in sorted(order, key=lambda c: (-sizes[c], order.index(c))):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        shards[r].append(cls)
        loads[r] += sizes[cls]
    return [sorted(shard, key=order.index) for shard in shards]


def shard_classes(datasets_path: Path, classes: list[str], world_size: int) -> list[list[str]]:
    """:func:`balance_classes` by each class's number of training plus test samples (all classes on one rank)."""
    if world_size == 1:
        return [list(classes)]
    sizes = {c: len(list_samples(datasets_path, c, "train")) + len(list_samples(datasets_path, c, "test"))
             for c in classes}
    return balance_classes(sizes, world_size)


def run(cfg: RunConfig) -> tuple[Path, dict[str, ClassResult]]:
    """Run every class (under torchrun: this rank's classes, module docstring).

    Returns the result folder and the per-class results computed by this process.
    """
    main_rank = distributed.is_main()
    classes = resolve_classes(cfg.datasets_path, cfg.classes) if main_rank else None
    device = distributed.rank_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)      # tf32 on a CPU: refused before any work
    keep_freed_memory()     # no page faults for every chunk's activations (utils/allocator.py, SPEC 12.3)
    with distributed.session(device, backend="gloo", timeout=CLASS_WAIT):
        return _run_shard(cfg, device, classes, precision)


def _run_shard(cfg: RunConfig, device: torch.device, classes: Optional[list[str]], precision: Precision
               ) -> tuple[Path, dict[str, ClassResult]]:
    rank, world_size, main_rank = distributed.rank(), distributed.world_size(), distributed.is_main()
    classes, shards = distributed.broadcast(
        (classes, shard_classes(cfg.datasets_path, classes, world_size)) if main_rank else None)
    check_run_inputs(cfg.datasets_path, cfg.grid_path, shards[rank], cfg.output_dir)   # before any model or work
    if cfg.raw_datasets_path is not None and not Path(cfg.raw_datasets_path).is_dir():
        raise DataError(f"{cfg.raw_datasets_path}: --raw_datasets_path is not a folder; name the data set "
                        f"before preprocessing (or leave the flag out)")
    tests = {cls: list_samples(cfg.datasets_path, cls, "test") for cls in shards[rank]}
    frames = {cls: resolve_frames(tests[cls], cfg.raw_datasets_path) for cls in shards[rank]}
    no_raw_sizes = distributed.gather(any(f.source == FROM_NONE for fs in frames.values() for f in fs))
    if main_rank and any(no_raw_sizes):
        print(frame_notice(cfg.datasets_path), file=sys.stderr)
    sdf_model, iteration = load_sdf_checkpoint(cfg.ckpt_path, map_location=device)
    extractor = build_rgb_extractor(cfg.rgb_backbone, cfg.rgb_weights, device, seed=cfg.seed)
    result_dir = None
    if main_rank:
        result_dir = make_result_dir(cfg.output_dir)
        write_configuration(result_dir, cfg, classes, device, extractor.name, iteration, shards, precision)
        if cfg.method.changed():
            print("method flags other than the paper's: "
                  + ", ".join(f"--{k} {v}" for k, v in cfg.method.changed().items()))
    result_dir = distributed.broadcast(result_dir)
    pipe = Pipeline(cfg, sdf_model, extractor, device, precision)
    results: dict[str, ClassResult] = {}
    summaries: list[ClassSummary] = []
    for cls in shards[rank]:
        results[cls] = res = pipe.run_class(cls, tests[cls], frames[cls])
        write_class_outputs(result_dir, res, cfg.viz, cfg.save_maps)
        summaries.append(summarize(res, rank))
        if world_size == 1:
            write_alignment(result_dir, summaries)
    gathered = distributed.gather(summaries)
    if main_rank:
        by_class = {s.cls: s for part in gathered for s in part}
        done = [by_class[c] for c in classes]
        if world_size > 1:
            write_alignment(result_dir, done)
        tables = write_results(result_dir, done, classes, cfg.method.as_dict(), precision)
        if precision.faithful:   # a reduced-precision results.txt carries this line itself
            print(f"Precision: {precision.describe()}\n")
        print(tables)
    return result_dir, results
