"""Run the four pipeline scripts as a user would: as subprocesses with the documented flags.

Used by ``tools/demo.py`` (the offline demo on the synthetic data set) and by the
end-to-end tests. Every command is echoed, its output streamed, and a failing step stops
the run with the step's name and exit code. With ``dataset="eyecandies"`` the synthetic
objects are written as the Eyecandies release and ``tools/prepare_eyecandies.py`` converts
them before the four scripts run.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]


class StepFailed(RuntimeError):
    """A pipeline script exited non-zero."""


DATASETS = ("mvtec", "eyecandies")
# rope: not square, no multiple of 100 (330 x 370 by default), as some MVTec 3D-AD samples
DEFAULT_CLASSES = {"mvtec": ["bagel", "cookie", "rope"], "eyecandies": ["CandyCane", "ChocolateCookie"]}


@dataclass
class DemoConfig:
    """Sizes and schedule of a synthetic end-to-end run."""

    classes: Optional[list[str]] = None       # None: DEFAULT_CLASSES of the data set
    dataset: str = "mvtec"                    # or "eyecandies": the release's files, converted first
    n_train: int = 10
    n_val: int = 1
    n_test_good: int = 4
    n_test_defect: int = 2          # per defect type (dent, bump, stain, crack)
    defects: list[str] = field(default_factory=list)   # empty: the generator's default set
    size: Optional[list[int]] = None   # [side] or [H, W]; None: each class's default size
    pretrain_clouds: int = 3        # the authors use 20; a short CPU schedule uses fewer
    epochs: int = 1                 # authors' semantics: --epoch E runs E + 1 passes
    batch_size: int = 16
    learning_rate: float = 1e-3
    sample_num: int = 20
    rgb_backbone: str = "tf_efficientnet_lite0"
    rgb_weights: Optional[str] = None   # None: the backbone's default weights; "random" for machines without them
    device: str = "cpu"                 # cut_patches.py, train_3Dmodel.py and main.py
    background_removed: bool = False    # generate preprocessed data, skip tools/preprocessing.py (no Open3D)
    workers: int = 2
    seed: int = 0
    viz: bool = True
    save_maps: bool = True
    extra_train_args: list[str] = field(default_factory=list)
    extra_main_args: list[str] = field(default_factory=list)   # e.g. method flags


@dataclass
class DemoResult:
    out: Path
    result_dir: Path
    results_txt: str
    results: dict
    seconds: dict = field(default_factory=dict)


def run_step(name: str, args: list[str], log: Optional[Path] = None, quiet: bool = False) -> float:
    """Run ``python <args>`` from the repository root; raise :class:`StepFailed` on a non-zero exit."""
    cmd = [sys.executable, *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    elapsed = time.perf_counter() - start
    if log is not None and quiet:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        tail = ("\n" + "\n".join(proc.stdout.splitlines()[-30:])) if quiet and proc.stdout else ""
        raise StepFailed(f"step '{name}' failed with exit code {proc.returncode}{tail}")
    print(f"[{name}: {elapsed:.1f} s]", flush=True)
    return elapsed


def newest(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise StepFailed(f"no {pattern} under {root}")
    return found[-1]


def run_pipeline(out: Path, cfg: DemoConfig, quiet: bool = False) -> DemoResult:
    """Generate the synthetic data set and run the four scripts on it; return the parsed results."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown data set {cfg.dataset!r}; expected one of {DATASETS}")
    out = Path(out).resolve()
    raw, pre, grids, ckpts, results = out / "raw", out / "preprocessed", out / "grids", out / "checkpoint", out / "output"
    log = out / "pipeline.log"
    seed = ["--seed", str(cfg.seed)]
    classes = list(cfg.classes or DEFAULT_CLASSES[cfg.dataset])
    eyecandies = cfg.dataset == "eyecandies"
    t = {}
    device = ["--device", cfg.device]
    t["generate"] = run_step("generate", [
        "tools/make_synthetic_dataset.py",
        out / "eyecandies_release" if eyecandies else (pre if cfg.background_removed else raw), "--format", cfg.dataset,
        "--classes", *classes, "--n_train", cfg.n_train, "--n_val", cfg.n_val,
        "--n_test_good", cfg.n_test_good, "--n_test_defect", cfg.n_test_defect,
        *(["--size", *cfg.size] if cfg.size else []), *seed,
        *(["--defects", *cfg.defects] if cfg.defects else []), *(["--background_removed"] * cfg.background_removed)],
        log, quiet)
    if eyecandies:
        t["prepare_eyecandies"] = run_step("prepare_eyecandies", [
            "tools/prepare_eyecandies.py", out / "eyecandies_release", raw, "--workers", cfg.workers], log, quiet)
    if not cfg.background_removed:
        t["preprocess"] = run_step("preprocess", [
            "tools/preprocessing.py", raw, "--output_dir", pre, "--workers", cfg.workers, *seed], log, quiet)
    t["cut_patches"] = run_step("cut_patches", [
        "cut_patches.py", "--datasets_path", pre, "--save_grid_path", grids, "--workers", cfg.workers, *device,
        *seed], log, quiet)
    t["cut_patches --pretrain"] = run_step("cut_patches --pretrain", [
        "cut_patches.py", "--datasets_path", pre, "--save_grid_path", grids, "--pretrain",
        "--sample_num", cfg.sample_num, "--pretrain_clouds", cfg.pretrain_clouds, "--workers", cfg.workers, *device,
        *seed], log, quiet)
    t["train_3Dmodel"] = run_step("train_3Dmodel", [
        "train_3Dmodel.py", "--grid_path", grids, "--ckpt_path", ckpts, "--epoch", cfg.epochs,
        "--batch_size", cfg.batch_size, "--learning_rate", cfg.learning_rate, "--save_every", 1000, *device,
        *cfg.extra_train_args, *seed], log, quiet)
    ckpt = newest("*/ckpt_*.pth", ckpts)
    main_args = ["main.py", "--datasets_path", pre, "--grid_path", grids, "--ckpt_path", ckpt,
                 "--output_dir", results, "--rgb_backbone", cfg.rgb_backbone, *device, *seed]
    main_args += ["--rgb_weights", cfg.rgb_weights] * (cfg.rgb_weights is not None)
    main_args += ["--viz"] * cfg.viz + ["--save_maps"] * cfg.save_maps + list(cfg.extra_main_args)
    t["main"] = run_step("main", main_args, log, quiet)
    result_dir = newest("*-result*", results)
    return DemoResult(out=out, result_dir=result_dir, results_txt=(result_dir / "results.txt").read_text(),
                      results=json.loads((result_dir / "results.json").read_text()), seconds=t)
