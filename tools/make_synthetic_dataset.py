#!/usr/bin/env python
"""Generate a synthetic data set in the MVTec 3D-AD layout (SPEC 1; generator: core/synthetic.py).

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

from core.synthetic import CLASSES, DEFAULT_DEFECTS, DEFECTS, generate_dataset  # noqa: E402
from utils.io import DataError  # noqa: E402


def _names(values: list[str]) -> list[str]:
    """Accept both ``--defects a b`` and ``--defects a,b``."""
    return [v for value in values for v in value.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="output data set root")
    p.add_argument("--classes", nargs="+", default=["bagel", "cookie"],
                   help=f"class names, from: {', '.join(sorted(CLASSES))}")
    p.add_argument("--n_train", "--n-train", type=int, default=20, help="training samples per class")
    p.add_argument("--n_val", "--n-val", type=int, default=2, help="validation samples per class")
    p.add_argument("--n_test_good", "--n-test-good", type=int, default=4, help="good test samples per class")
    p.add_argument("--n_test_defect", "--n-test-defect", type=int, default=2,
                   help="test samples per defect type and class")
    p.add_argument("--size", type=int, default=400, help="image side H (images are H x H)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--defects", nargs="+", default=list(DEFAULT_DEFECTS),
                   help=f"defect types, from: {', '.join(DEFECTS)}")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace existing class folders")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = generate_dataset(args.out, classes=_names(args.classes), n_train=args.n_train, n_val=args.n_val,
                               n_test_good=args.n_test_good, n_test_defect=args.n_test_defect, size=args.size,
                               seed=args.seed, defects=_names(args.defects), workers=args.workers,
                               overwrite=args.overwrite, progress=not args.quiet)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"synthetic data set written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
