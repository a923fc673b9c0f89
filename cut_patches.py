#!/usr/bin/env python
"""Cut preprocessed clouds into 500-point FPS + kNN patches (SPEC section 3).

    python cut_patches.py --datasets_path D --save_grid_path G [--pretrain]

Default mode writes <G>/<cls>/{train,test}/<type>/npz/NNN.npz (points_gt, points_idx);
--pretrain writes <G>/PRETRAIN_DATA/<cls>/NNN.npz (samples_all, points_all, origins_all)
for 20 seeded random training clouds per class. Run tools/preprocessing.py first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.cutting import PRETRAIN_CLOUDS, CutConfig, cut_patches  # noqa: E402
from core.grouping import SAMPLE_NUM  # noqa: E402
from core.patch_files import POINT_NUM  # noqa: E402
from utils.cli import add_names, make_parser, parse_config, run_cli  # noqa: E402


def parse_args(argv=None) -> tuple[CutConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("--datasets_path", type=Path, required=True, help="preprocessed MVTec 3D-AD root")
    p.add_argument("--save_grid_path", type=Path, required=True, help="output folder for the patch files")
    p.add_argument("--pretrain", action="store_true", help="write pretraining data instead (group_mul fixed to 5)")
    p.add_argument("--group_mul", type=int, default=None,
                   help="patches = round(points * group_mul / point_num); default 10 (5 with --pretrain)")
    p.add_argument("--point_num", type=int, default=POINT_NUM, help="points per patch")
    p.add_argument("--sample_num", type=int, default=SAMPLE_NUM, help="noisy query copies per pretraining patch")
    p.add_argument("--pretrain_clouds", type=int, default=PRETRAIN_CLOUDS,
                   help="training clouds per class chosen for --pretrain (the authors use 20)")
    add_names(p, "--classes", default=None, help="classes to cut, e.g. 'bagel cookie' or bagel,cookie (default: every "
                                                 "class found)")
    p.add_argument("--seed", type=int, default=0, help="seed of the FPS starts, cloud choice and noise")
    p.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    p.add_argument("--validation", action="store_true", help="also cut the validation split (never used later)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (FPS and kNN)")
    p.add_argument("--allow_unpreprocessed", action="store_true",
                   help="cut clouds that still hold their background plane (refused otherwise)")
    return parse_config(p, CutConfig, argv)


def execute(cfg: CutConfig, _) -> int:
    report = cut_patches(cfg)
    recut = f" ({report.recut} recut: their source TIFF changed since they were cut)" if report.recut else ""
    print(f"wrote {report.written} patch file(s){recut}, kept {report.skipped} existing file(s) under "
          f"{cfg.save_grid_path}")
    if report.unrecorded:
        print(f"note: {report.unrecorded} existing file(s) carry no source record (cut elsewhere or by an older "
              f"version) and were kept as they are; pass --overwrite to recut them")
    if report.unpreprocessed:
        print(f"warning: {len(report.unpreprocessed)} cloud(s) look unpreprocessed and were cut anyway "
              f"(--allow_unpreprocessed)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
