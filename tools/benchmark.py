#!/usr/bin/env python
"""Speed and memory of every stage against the authors' way of computing it (issue 8).

    python tools/benchmark.py [--out bench_out] [--size 800] [--device auto] [--workers 2] [--subset 2]

Generates a synthetic MVTec 3D-AD-layout data set of realistic size, then runs each stage's
benchmark (``utils/bench/<stage>.py``) in pipeline order: preprocessing, patches, training,
inference. Each stage times this project's implementation and a faithful re-implementation
of the authors' way on the same data in the same run, checks that their outputs agree, and
reports the ratio. Writes ``benchmark.json`` and ``benchmark.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("preprocessing", "patches", "training", "inference")
# Paths in BenchContext that a stage fills in, and those a stage needs from an earlier one.
PRODUCES = {"preprocessing": ("preprocessed",), "patches": ("grids", "pretrain_grids"), "training": ("ckpt",)}
NEEDS = {"training": ("pretrain_grids",), "inference": ("grids", "ckpt")}
PRODUCER = {name: stage for stage, names in PRODUCES.items() for name in names}
STATE_FILE = "stages_done.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (data, results)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    p.add_argument("--classes", nargs="+", default=["bagel", "cookie"], help="synthetic classes")
    p.add_argument("--size", type=int, default=800, help="side of the generated clouds in pixels")
    p.add_argument("--n_train", type=int, default=6, help="training samples per class")
    p.add_argument("--n_test_good", type=int, default=2, help="good test samples per class")
    p.add_argument("--n_test_defect", type=int, default=1, help="test samples per defect type and class")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the multi-worker measurements")
    p.add_argument("--subset", type=int, default=2, help="samples on which the slow authors' way is run")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark itself")
    return p.parse_args(argv)


def machine_info(device) -> dict:
    import torch

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
             f"{info.get('torch_threads')} threads), device {info.get('device')}"
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
                n_test_defect=args.n_test_defect, seed=args.seed, quick=args.quick)


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
    from utils.io import write_text

    path = ctx.work / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("data") != _same_data(args):
        state = dict(data=_same_data(args), paths={})
    for name in PRODUCES.get(stage, ()):
        value = getattr(ctx, name)
        state["paths"][name] = str(value) if value is not None else None
    write_text(path, json.dumps(state, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from core.synthetic import generate_dataset
    from utils.bench import BenchContext, Timer, peak_rss_mib
    from utils.device import DeviceUnavailableError, resolve_device
    from utils.io import write_text

    try:
        device = resolve_device(args.device)
    except DeviceUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        args.size, args.n_train, args.n_test_good, args.n_test_defect = 400, 3, 1, 1
    out = args.out.resolve()
    raw = out / "data" / f"raw_{args.size}"
    ctx = BenchContext(raw=raw, work=out / "work", classes=args.classes, device=device, workers=args.workers,
                       subset=args.subset, seed=args.seed, quick=args.quick)
    ctx.work.mkdir(parents=True, exist_ok=True)
    load_state(ctx, args)
    available = {name for name in PRODUCER if getattr(ctx, name) is not None}
    missing = []
    for stage in args.stages:     # in run order: a stage may use what an earlier one in the list produces
        missing += [f"{stage} needs {name} ({PRODUCER[name]} stage)" for name in NEEDS.get(stage, ())
                    if name not in available]
        available.update(PRODUCES.get(stage, ()))
    if missing:
        print(f"error: {'; '.join(missing)}: add those stages to --stages, or run them once with the same --out, "
              "--size, --classes and sample counts", file=sys.stderr)
        return 2
    if not (raw / ".complete").exists():
        with Timer() as t:
            generate_dataset(raw, classes=args.classes, n_train=args.n_train, n_val=0,
                             n_test_good=args.n_test_good, n_test_defect=args.n_test_defect,
                             size=args.size, seed=args.seed)
        write_text(raw / ".complete", f"generated in {t.seconds:.1f} s\n")
    info = machine_info(device)
    rows, memory = [], {}
    for stage in args.stages:
        module = importlib.import_module(f"utils.bench.{stage}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        print(f"== {stage}", flush=True)
        start = time.perf_counter()
        stage_rows = module.benchmark(ctx)
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
    result = dict(machine=info, args={k: str(v) for k, v in vars(args).items()}, rows=rows, memory=memory)
    write_text(out / "benchmark.json", json.dumps(result, indent=2) + "\n")
    table = markdown_table(rows, info)
    write_text(out / "benchmark.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
