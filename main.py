"""Shape-guided dual-memory anomaly detection on MVTec 3D-AD: memory, alignment, test, metrics.

    python main.py --datasets_path D --grid_path G --ckpt_path CKPT [--viz] [--save_maps]

For every class: build the dual memory from the training samples, align RGB to SDF
scores on 25 training samples, score every test sample, and report image AUROC, pixel
AUROC and AU-PRO for RGB, SDF and RGB_SDF (SPEC 6-10). Results go to
``<output_dir>/<timestamp>-result/``. The work is done by :mod:`core.pipeline`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.alignment import AlignmentError
from core.patches import POINT_NUM
from core.pipeline import RunConfig, run
from core.rgb_features import BACKBONES, WeightsUnavailableError
from core.sdf_model import CheckpointError
from utils.device import DeviceUnavailableError
from utils.io import DataError


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets_path", type=Path, required=True,
                   help="preprocessed MVTec 3D-AD root (tools/preprocessing.py output)")
    p.add_argument("--grid_path", type=Path, required=True, help="patch files written by cut_patches.py")
    p.add_argument("--ckpt_path", type=Path, required=True, help="SDF model checkpoint (e.g. ckpt_000601.pth)")
    p.add_argument("--output_dir", type=Path, default=Path("output"), help="results go to a new timestamped folder here")
    p.add_argument("--classes", nargs="+", default=None,
                   help="classes to run (default: every class folder found, MVTec order for MVTec 3D-AD)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-sample orders (as the reference)")
    p.add_argument("--viz", action="store_true", help="write heatmaps and optimal thresholds (SPEC 10)")
    p.add_argument("--save_maps", action="store_true",
                   help="write each test sample's fused map as float32 TIFF at the input resolution, in the "
                        "layout of the official MVTec 3D-AD evaluation: anomaly_maps/<cls>/test/<defect>/<id>.tiff")
    p.add_argument("--rgb_backbone", choices=sorted(BACKBONES), default="wide_resnet50_2",
                   help="tf_efficientnet_lite0 is an offline stand-in, not the paper's backbone")
    p.add_argument("--rgb_weights", default=None,
                   help="RGB backbone weights file (default: the Hugging Face cache); 'random' for a seeded "
                        "random initialisation (testing only)")
    p.add_argument("--point_num", type=int, default=POINT_NUM, help="points per patch in the patch files")
    a = p.parse_args(argv)
    return RunConfig(datasets_path=a.datasets_path, grid_path=a.grid_path, ckpt_path=a.ckpt_path,
                     output_dir=a.output_dir, classes=a.classes, device=a.device, seed=a.seed, viz=a.viz,
                     save_maps=a.save_maps, rgb_backbone=a.rgb_backbone, rgb_weights=a.rgb_weights,
                     point_num=a.point_num)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        result_dir, _ = run(cfg)
    except (DataError, CheckpointError, WeightsUnavailableError, AlignmentError, DeviceUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results written to {result_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
