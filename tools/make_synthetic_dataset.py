#!/usr/bin/env python
"""Generate a synthetic data set in the MVTec 3D-AD layout (SPEC 1; generator: tools/synthetic/mvtec.py).

    python tools/make_synthetic_dataset.py OUT [--classes bagel cookie] [--n_train 20] [--n_val 2]
        [--n_test_good 4] [--n_test_defect 2] [--size H [W]] [--seed 0] [--defects dent bump stain crack]

Writes OUT/<cls>/{train,validation}/good/{rgb,xyz}, OUT/<cls>/test/good/{rgb,xyz,gt} and
OUT/<cls>/test/<defect>/{rgb,xyz,gt} with files NNN.png / NNN.tiff. --n_test_defect counts per
defect type. --size H W makes H x W images (one value: square); without it each class has its
default size (400 x 400; rope 330 x 370, not square and no multiple of 100). Rerunning with
the same settings keeps the finished classes; a class folder made otherwise is only replaced
with --overwrite. --format eyecandies writes the same synthetic objects as the files of the
Eyecandies release instead (tools/synthetic/eyecandies.py; classes CandyCane ... PeppermintCandy,
one even --size, 512 as the release), for tools/prepare_eyecandies.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.synthetic import eyecandies, mvtec  # noqa: E402
from tools.synthetic.mvtec import (CLASSES, DEFAULT_DEFECTS, DEFAULT_SHAPES, DEFAULT_SIDE, DEFECTS,  # noqa: E402
                                   SyntheticConfig)
from utils.cli import add_names, make_parser, parse_config, run_cli  # noqa: E402


def parse_args(argv=None) -> tuple[SyntheticConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("out", type=Path, help="output data set root")
    p.add_argument("--format", choices=("mvtec", "eyecandies"), default="mvtec",
                   help="the MVTec 3D-AD layout, or the files of the Eyecandies release")
    add_names(p, "--classes", default=None,
              help=f"class names (default: bagel cookie; with --format eyecandies: "
                   f"{' '.join(eyecandies.DEFAULT_CLASSES)}), from: {', '.join(sorted(CLASSES))}; "
                   f"with --format eyecandies from: {', '.join(eyecandies.LOOKS)}")
    p.add_argument("--n_train", "--n-train", type=int, default=20, help="training samples per class")
    p.add_argument("--n_val", "--n-val", type=int, default=2, help="validation samples per class")
    p.add_argument("--n_test_good", "--n-test-good", type=int, default=4, help="good test samples per class")
    p.add_argument("--n_test_defect", "--n-test-defect", type=int, default=2,
                   help="test samples per defect type and class")
    defaults = ", ".join(f"{c} {h} x {w}" for c, (h, w) in DEFAULT_SHAPES.items())
    p.add_argument("--size", type=int, nargs="+", default=None, metavar=("H", "W"),
                   help=f"image size H W, or one side for square images (default: per class, "
                        f"{DEFAULT_SIDE} x {DEFAULT_SIDE}; {defaults}; with --format eyecandies one even side, 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    add_names(p, "--defects", default=list(DEFAULT_DEFECTS),
              help=f"defect types, from: {', '.join(DEFECTS)}")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace existing class folders")
    p.add_argument("--background_removed", action="store_true",
                   help="write what tools/preprocessing.py would output (no Open3D needed); for GPU machines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cfg, cli = parse_config(p, SyntheticConfig, argv, cli_only=("quiet",))
    eye = cfg.format == "eyecandies"
    cfg.classes = cfg.classes or list(eyecandies.DEFAULT_CLASSES if eye else ("bagel", "cookie"))
    if eye:
        if cfg.size is not None and len(cfg.size) != 1:
            p.error(f"--format eyecandies writes square images: give one --size, got {cfg.size}")
        cfg.size = cfg.size[0] if cfg.size else 512
    return cfg, cli


def execute(cfg: SyntheticConfig, cli: argparse.Namespace) -> int:
    generate = eyecandies.generate if cfg.format == "eyecandies" else mvtec.generate
    print(f"synthetic data set written to {generate(cfg, progress=not cli.quiet)}")
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
