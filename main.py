"""Shape-guided dual-memory anomaly detection on MVTec 3D-AD: memory, alignment, test, metrics.

    python main.py --datasets_path D --grid_path G --ckpt_path CKPT [--viz] [--save_maps]
                   [--raw_datasets_path RAW]

For every class: build the dual memory from the training samples, align RGB to SDF
scores on 25 training samples, score every test sample, and report image AUROC, pixel
AUROC and AU-PRO for RGB, SDF and RGB_SDF (SPEC 6-10), then pixel AUROC and AU-PRO of the
official MVTec 3D-AD protocol at each raw sample's size (SPEC 9.2). Results go to
``<output_dir>/<timestamp>-result/``. The work is done by :mod:`core.pipeline`.
The method's constants are flags (--k_sdf, --k_rgb, --n_nonzero, --footprint_shift,
--align_samples, --align_sigma, --blur_radius, --n_train; defaults: the paper's).

    torchrun --nproc_per_node N main.py ...   (classes sharded over N ranks; rank 0 writes the tables)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.params import FLAGS, MethodParams  # noqa: E402
from core.patch_files import POINT_NUM  # noqa: E402
from core.pipeline import RunConfig, run  # noqa: E402
from core.rgb_features import BACKBONES  # noqa: E402
from utils.cli import add_names, config_from_args, make_parser, parse_config, run_cli  # noqa: E402
from utils.distributed import is_main  # noqa: E402
from utils.errors import ConfigError  # noqa: E402
from utils.precision import PRECISIONS  # noqa: E402


def parse_args(argv=None) -> tuple[RunConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("--datasets_path", type=Path, required=True,
                   help="preprocessed MVTec 3D-AD root (tools/preprocessing.py output)")
    p.add_argument("--grid_path", type=Path, required=True, help="patch files written by cut_patches.py")
    p.add_argument("--ckpt_path", type=Path, required=True, help="SDF model checkpoint (e.g. ckpt_000601.pth)")
    p.add_argument("--raw_datasets_path", type=Path, default=None,
                   help="the data set before preprocessing, for the raw sample sizes when --datasets_path was "
                        "preprocessed elsewhere (without tools/preprocessing.py's manifest); not needed otherwise")
    p.add_argument("--output_dir", type=Path, default=Path("output"), help="results go to a new timestamped folder here")
    add_names(p, "--classes", default=None,
              help="classes to run, e.g. 'bagel cookie' or bagel,cookie (default: every class folder found, MVTec "
                   "order for MVTec 3D-AD)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-sample orders (as the reference)")
    p.add_argument("--viz", "--vis", action="store_true",
                   help="write heatmaps and optimal thresholds (SPEC 10); --vis is an alias (the authors' README)")
    p.add_argument("--save_maps", action="store_true",
                   help="write each test sample's fused map as float32 TIFF at the raw sample's size (padding "
                        "cropped), in the layout of the official MVTec 3D-AD evaluation: "
                        "anomaly_maps/<cls>/test/<defect>/<id>.tiff")
    p.add_argument("--rgb_backbone", choices=sorted(BACKBONES), default="wide_resnet50_2",
                   help="tf_efficientnet_lite0 is an offline stand-in, not the paper's backbone")
    p.add_argument("--rgb_weights", default=None,
                   help="RGB backbone weights file (default: the Hugging Face cache); 'random' for a seeded "
                        "random initialisation (testing only)")
    p.add_argument("--point_num", type=int, default=POINT_NUM, help="points per patch in the patch files")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="arithmetic of the SDF encoder, decoder and RGB backbone: fp32 is the faithful computation; "
                        "bf16 (CPU with AVX512-BF16/AMX, or CUDA) is several times faster and changes scores slightly; "
                        "tf32 is CUDA only. Recorded in the configuration and results files")
    method = p.add_argument_group("method flags (defaults: the paper's values; SPEC 13)")
    for f in dataclasses.fields(MethodParams):
        kind, text = FLAGS[f.name]
        method.add_argument(f"--{f.name}", type=kind, default=f.default, help=text)
    cfg, cli = parse_config(p, RunConfig, argv, cli_only=tuple(FLAGS))
    try:
        cfg.method = config_from_args(MethodParams, cli)
    except ConfigError as exc:
        p.error(str(exc))
    return cfg, argparse.Namespace()


def execute(cfg: RunConfig, _) -> int:
    result_dir, _ = run(cfg)
    if is_main():
        print(f"results written to {result_dir}")
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
