#!/usr/bin/env python
"""The device check: the CUDA tests, the scripts on the GPU against the CPU, the GPU benchmark.

    python tools/device_check.py OUT [--device cuda] [--quick] [--work DIR]

Writes into OUT (at most eight files): device_check.json (every measurement), summary.md,
cuda_tests.log, cuda_measurements.jsonl, pipeline.log, benchmark.log, benchmark.md and
benchmark.json. Stops at the first failing step and names it (exit 1). ``--device cpu`` is the
dry run of the same steps on the CPU (run it before spending GPU time); ``--quick`` shrinks
every size. See tools/bench/device_check.py for the steps and their tolerances.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench.device_check import CheckFailed, DeviceCheckConfig, run_device_check  # noqa: E402
from utils.cli import make_parser, parse_config, run_cli  # noqa: E402


def parse_args(argv=None) -> tuple[DeviceCheckConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("out", type=Path, help="folder for the results (at most eight files)")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere")
    p.add_argument("--work", type=Path, default=None, help="folder for data and intermediate outputs")
    p.add_argument("--bench_size", type=int, default=800, help="side of the benchmark's clouds")
    p.add_argument("--seed", type=int, default=0)
    return parse_config(p, DeviceCheckConfig, argv)


def execute(cfg: DeviceCheckConfig, _) -> int:
    try:
        report = run_device_check(cfg)
    except CheckFailed as exc:
        print(f"device check FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"device check passed in {sum(s['seconds'] for s in report['steps'].values()):.0f} s; see {cfg.out}/summary.md")
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
