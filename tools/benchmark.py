#!/usr/bin/env python
"""Speed and memory of every stage against the authors' way of computing it.

    python tools/benchmark.py [--out bench_out] [--size 800] [--device auto] [--workers 2] [--subset 2]
                              [--precision fp32 bf16]

Generates a synthetic MVTec 3D-AD-layout data set of realistic size, then runs each stage's
benchmark in pipeline order (preprocessing, patches, training, inference; see
:mod:`tools.bench.suite`), and writes ``benchmark.json`` and ``benchmark.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench.suite import STAGES, BenchConfig, run_benchmark  # noqa: E402
from utils.cli import add_names, make_parser, parse_config, run_cli  # noqa: E402
from utils.precision import PRECISIONS  # noqa: E402


def parse_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    d = BenchConfig()
    p = make_parser(__doc__)
    p.add_argument("--out", type=Path, default=d.out, help="output folder (data, results)")
    add_names(p, "--stages", choices=STAGES, default=list(STAGES), help=f"stages to run, in order, from {', '.join(STAGES)}")
    add_names(p, "--classes", default=d.classes, help="synthetic classes, e.g. 'bagel cookie' or bagel,cookie")
    p.add_argument("--size", type=int, default=d.size, help="side of the generated clouds in pixels")
    p.add_argument("--n_train", type=int, default=d.n_train, help="training samples per class")
    p.add_argument("--n_test_good", type=int, default=d.n_test_good, help="good test samples per class")
    p.add_argument("--n_test_defect", type=int, default=d.n_test_defect, help="test samples per defect type and class")
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes for the multi-worker measurements")
    p.add_argument("--subset", type=int, default=d.subset, help="samples on which the slow authors' way is run")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark itself")
    p.add_argument("--background_removed", action="store_true",
                   help="generate the data already preprocessed (for machines without Open3D; no preprocessing stage)")
    add_names(p, "--precision", choices=PRECISIONS, default=d.precision,
              help="inference: also run main.py's per-class loop in each precision (fp32 always included) "
                   "and report ms per test sample by stage, the ratio to fp32 and the fidelity against fp32")
    return parse_config(p, BenchConfig, argv)


def execute(cfg: BenchConfig, _) -> int:
    run_benchmark(cfg)
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
