#!/usr/bin/env python
"""Generate a synthetic data set in the MVTec 3D-AD layout (SPEC 1; generator: tools/synthetic/mvtec.py).

    python tools/make_synthetic_dataset.py OUT [--classes bagel cookie] [--n_train 20] [--n_val 2]
        [--n_test_good 4] [--n_test_defect 2] [--size 400] [--seed 0] [--defects dent bump stain crack]

Writes OUT/<cls>/{train,validation}/good/{rgb,xyz}, OUT/<cls>/test/good/{rgb,xyz,gt} and
OUT/<cls>/test/<defect>/{rgb,xyz,gt} with files NNN.png / NNN.tiff. --n_test_defect counts per
defect type. Rerunning with the same settings keeps the finished classes; a class folder made
otherwise is only replaced with --overwrite.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.synthetic.mvtec import CLASSES, DEFAULT_DEFECTS, DEFECTS, SyntheticConfig, generate  # noqa: E402
from utils.cli import add_names, make_parser, parse_config, run_cli  # noqa: E402


def parse_args(argv=None) -> tuple[SyntheticConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("out", type=Path, help="output data set root")
    add_names(p, "--classes", default=["bagel", "cookie"],
              help=f"class names, from: {', '.join(sorted(CLASSES))}")
    p.add_argument("--n_train", "--n-train", type=int, default=20, help="training samples per class")
    p.add_argument("--n_val", "--n-val", type=int, default=2, help="validation samples per class")
    p.add_argument("--n_test_good", "--n-test-good", type=int, default=4, help="good test samples per class")
    p.add_argument("--n_test_defect", "--n-test-defect", type=int, default=2,
                   help="test samples per defect type and class")
    p.add_argument("--size", type=int, default=400, help="image side H (images are H x H)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    add_names(p, "--defects", default=list(DEFAULT_DEFECTS),
              help=f"defect types, from: {', '.join(DEFECTS)}")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace existing class folders")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parse_config(p, SyntheticConfig, argv, cli_only=("quiet",))


def execute(cfg: SyntheticConfig, cli: argparse.Namespace) -> int:
    print(f"synthetic data set written to {generate(cfg, progress=not cli.quiet)}")
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
