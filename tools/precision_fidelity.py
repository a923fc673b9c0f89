#!/usr/bin/env python
"""Fidelity and speed of reduced precision: main.py's computation in fp32 and in --precision, compared.

    python tools/precision_fidelity.py --datasets_path D --grid_path G --ckpt_path CKPT [--precision bf16]

Runs every class (memory, alignment, test, metrics) once in fp32 and once in each requested
precision with the same models, then prints, per precision: the test time per sample by stage and
its ratio to fp32, and the largest differences against fp32 of a results.txt table cell, of an
image score (relative) and of a blurred map (8-bit levels). Writes nothing unless --json is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.rgb_features import BACKBONES  # noqa: E402
from tools.bench.precision import FidelityConfig, compare_precisions  # noqa: E402
from utils.cli import make_parser, parse_config, run_cli, split_names  # noqa: E402
from utils.io import write_text  # noqa: E402
from utils.precision import PRECISIONS  # noqa: E402


def parse_args(argv=None) -> tuple[FidelityConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("--datasets_path", type=Path, required=True, help="preprocessed data set (as for main.py)")
    p.add_argument("--grid_path", type=Path, required=True, help="patch files written by cut_patches.py")
    p.add_argument("--ckpt_path", type=Path, required=True, help="SDF model checkpoint")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["bf16"],
                   help="precisions compared with fp32 (fp32 always runs first)")
    p.add_argument("--classes", nargs="+", default=None, help="classes (default: every class folder found)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rgb_backbone", choices=sorted(BACKBONES), default="wide_resnet50_2")
    p.add_argument("--rgb_weights", default=None, help="RGB backbone weights file (as for main.py)")
    p.add_argument("--point_num", type=int, default=500, help="points per patch in the patch files")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    cfg, cli = parse_config(p, FidelityConfig, argv, cli_only=("json",))
    cfg.classes = split_names(cfg.classes)
    return cfg, cli


def report_text(report: dict) -> str:
    lines = [f"{', '.join(report['classes'])} on {report['device']}, {report['test_samples']} test samples"]
    for mode, r in report["modes"].items():
        times = ", ".join(f"{s} {1e3 * t:.0f} ms ({r['speed_vs_fp32'].get(s, 0):.2f}x)"
                          for s, t in r["test_seconds_per_sample"].items())
        ran = r["precision"] + ("" if r["precision"] == mode else f" (requested {mode})")
        lines.append(f"{ran}: {1e3 * sum(r['test_seconds_per_sample'].values()):.0f} ms per test sample, "
                     f"{r['total_speed_vs_fp32']:.2f}x the fp32 speed; {times}")
        if mode != "fp32":
            f = r["fidelity_vs_fp32"]
            lines.append(f"  vs fp32: table cells max |d| {f['table_cell_abs']:.3f} of {f['cells']}, image scores "
                         f"max rel {f['image_score_rel']:.2e}, blurred maps max {f['map_levels']:.2f} levels "
                         f"(99th percentile {f['map_levels_p99']:.2f})")
            lines += [f"    {m}: image scores {w['image_score_rel']:.2e}, maps {w['map_levels']:.2f} levels "
                      f"(p99 {w['map_levels_p99']:.2f})" for m, w in f["per_method"].items()]
    return "\n".join(lines)


def execute(cfg: FidelityConfig, cli) -> int:
    report = compare_precisions(cfg)
    print(report_text(report))
    if cli.json:
        write_text(cli.json, json.dumps(report, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
