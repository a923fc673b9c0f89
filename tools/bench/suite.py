"""The benchmark run: data set, stages in pipeline order, reuse of finished stages, the report.

``run_benchmark`` generates a synthetic MVTec 3D-AD-layout data set of realistic size, then
runs each stage's benchmark (``tools/bench/<stage>.py``) in pipeline order: preprocessing,
patches, training, inference. Each stage times this project's implementation and the
authors' way (:mod:`tools.authors_way`) on the same data in the same run, checks that their
outputs agree, and reports the ratio. Writes ``benchmark.json`` and ``benchmark.md`` into
the output folder. A stage that needs an earlier stage's output reuses what a finished run
with the same output folder and data settings recorded in ``work/stages_done.json``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tools.bench import BenchContext, inference, patches, peak_rss_mib, preprocessing, training
from tools.synthetic.mvtec import generate_dataset
from utils.device import Timer, resolve_device
from utils.errors import ConfigError
from utils.io import write_text
from utils.precision import cpu_bf16_units, resolve_precision

STAGES = ("preprocessing", "patches", "training", "inference")
STAGE_BENCHMARKS = {"preprocessing": preprocessing.benchmark, "patches": patches.benchmark,
                    "training": training.benchmark, "inference": inference.benchmark}
# Paths in BenchContext that a stage fills in, and those a stage needs from an earlier one.
PRODUCES = {"preprocessing": ("preprocessed",), "patches": ("grids", "pretrain_grids"), "training": ("ckpt",)}
NEEDS = {"training": ("pretrain_grids",), "inference": ("grids", "ckpt")}
PRODUCER = {name: stage for stage, names in PRODUCES.items() for name in names}
STATE_FILE = "stages_done.json"




@dataclass
class BenchConfig:
    """Options of ``tools/benchmark.py``."""

    out: Path = Path("bench_out")
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    classes: list[str] = field(default_factory=lambda: ["bagel", "cookie"])
    size: int = 800
    n_train: int = 6
    n_test_good: int = 2
    n_test_defect: int = 1
    workers: int = 2
    subset: int = 2
    device: str = "auto"
    seed: int = 0
    quick: bool = False
    background_removed: bool = False   # generate the data already preprocessed (machines without Open3D)
    precision: list[str] = field(default_factory=lambda: ["fp32"])


def machine_info(device) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), device=str(device))
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    info["cpu_bf16_units"] = cpu_bf16_units()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def markdown_table(rows: list[dict], info: dict) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"Machine: {info.get('cpu')} ({info.get('cpu_count')} cores, torch {info.get('torch')}, "
             f"{info.get('torch_threads')} threads, bfloat16 units: {', '.join(info.get('cpu_bf16_units') or []) or 'none'}"
             f"), device {info.get('device')}"
             + (f" ({info['gpu']})" if "gpu" in info else ""),
             "",
             "| stage | measure | unit | ours | authors' way | speed-up | outputs agree | note |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        speed = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        lines.append(f"| {r['stage']} | {r['measure']} | {r['unit']} | {fmt(r['ours'])} | {fmt(r.get('authors'))} "
                     f"| {speed} | {r.get('agree') or '-'} | {r.get('note') or ''} |")
    return "\n".join(lines) + "\n"


def _same_data(args) -> dict:
    return dict(size=args.size, classes=list(args.classes), n_train=args.n_train, n_test_good=args.n_test_good,
                n_test_defect=args.n_test_defect, seed=args.seed, quick=args.quick,
                background_removed=args.background_removed)


def load_state(ctx, args) -> None:
    """Reuse the outputs of stages finished by an earlier run with the same ``--out`` and data settings,
    so that e.g. ``--stages inference`` can be rerun alone. Only stages recorded as finished count."""
    path = ctx.work / STATE_FILE
    if not path.is_file():
        return
    state = json.loads(path.read_text())
    if state.get("data") != _same_data(args):
        return
    for name, value in state.get("paths", {}).items():
        if value and getattr(ctx, name) is None and Path(value).exists():
            setattr(ctx, name, Path(value))


def save_state(ctx, args, stage: str) -> None:
    """Record the paths ``stage`` produced, after it finished (atomic write)."""
    path = ctx.work / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("data") != _same_data(args):
        state = dict(data=_same_data(args), paths={})
    for name in PRODUCES.get(stage, ()):
        value = getattr(ctx, name)
        state["paths"][name] = str(value) if value is not None else None
    write_text(path, json.dumps(state, indent=2) + "\n")


def run_benchmark(args: BenchConfig) -> dict:
    """Run the benchmark of ``args`` (see the module docstring); return what ``benchmark.json`` holds.

    Raises :class:`utils.errors.ConfigError` before generating any data when a stage lacks the
    output of an earlier one, and :class:`utils.device.DeviceUnavailableError` for an unusable device.
    """
    device = resolve_device(args.device)
    for mode in args.precision:        # tf32 on a CPU: refused before any data is generated
        resolve_precision(mode, device)
    if args.quick:
        args.size, args.n_train, args.n_test_good, args.n_test_defect = 400, 3, 1, 1
    out = args.out.resolve()
    if args.background_removed and "preprocessing" in args.stages:
        raise ConfigError("--background_removed generates preprocessed data: drop the preprocessing stage "
                          "from --stages")
    raw = out / "data" / (f"preprocessed_{args.size}" if args.background_removed else f"raw_{args.size}")
    ctx = BenchContext(raw=raw, work=out / "work", classes=args.classes, device=device, workers=args.workers,
                       subset=args.subset, seed=args.seed, quick=args.quick, precisions=list(args.precision),
                       preprocessed=raw if args.background_removed else None)
    ctx.work.mkdir(parents=True, exist_ok=True)
    load_state(ctx, args)
    available = {name for name in PRODUCER if getattr(ctx, name) is not None}
    missing = []
    for stage in args.stages:     # in run order: a stage may use what an earlier one in the list produces
        missing += [f"{stage} needs {name} ({PRODUCER[name]} stage)" for name in NEEDS.get(stage, ())
                    if name not in available]
        available.update(PRODUCES.get(stage, ()))
    if missing:
        raise ConfigError(f"{'; '.join(missing)}: add those stages to --stages, or run them once with the same "
                          "--out, --size, --classes and sample counts")
    if not (raw / ".complete").exists():
        with Timer() as t:
            generate_dataset(raw, classes=args.classes, n_train=args.n_train, n_val=0,
                             n_test_good=args.n_test_good, n_test_defect=args.n_test_defect,
                             size=args.size, seed=args.seed, background_removed=args.background_removed)
        write_text(raw / ".complete", f"generated in {t.seconds:.1f} s\n")
    info = machine_info(device)
    rows, memory = [], {}
    for stage in args.stages:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        print(f"== {stage}", flush=True)
        start = time.perf_counter()
        stage_rows = STAGE_BENCHMARKS[stage](ctx)
        rows.extend(stage_rows)
        save_state(ctx, args, stage)
        memory[stage] = dict(peak_rss_mib=round(peak_rss_mib(), 1), wall_s=round(time.perf_counter() - start, 1))
        if device.type == "cuda":
            memory[stage]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        for r in stage_rows:
            print(f"   {r['measure']}: ours {r['ours']:.4g} {r['unit']}"
                  + (f", authors' way {r['authors']:.4g} ({r['speedup']:.1f}x)" if r.get("authors") else "")
                  + (f"; {r['agree']}" if r.get("agree") else ""), flush=True)
    for stage, m in memory.items():
        rows.append(dict(stage=stage, measure="peak memory after stage", unit="MiB",
                         ours=m["peak_rss_mib"], authors=None, speedup=None,
                         agree=None, note=(f"peak GPU {m['peak_gpu_mib']} MiB" if "peak_gpu_mib" in m else "RSS")))
    result = dict(machine=info, args={k: str(v) for k, v in asdict(args).items()}, rows=rows, memory=memory)
    write_text(out / "benchmark.json", json.dumps(result, indent=2) + "\n")
    table = markdown_table(rows, info)
    write_text(out / "benchmark.md", table)
    print(table)
    return result


