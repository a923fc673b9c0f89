#!/usr/bin/env python
"""Convert the Eyecandies release into the MVTec 3D-AD layout that the four pipeline scripts read.

    python tools/prepare_eyecandies.py RAW OUT [--light 4] [--workers N] [--classes CandyCane ...]

RAW is the release (RAW/<Class>/{train,val,test_public}/data/<id>_<item>.<ext>); it is only
read. OUT receives <Class>/train/good, <Class>/validation/good (from val) and
<Class>/test/{good,bumps,dents,colors,normals,combined} with rgb/NNN.png (image_<light>),
xyz/NNN.tiff (the depth back-projected in the camera frame, metres) and, for test, gt/NNN.png.
test_private (no ground truth) is skipped. Reruns skip finished samples (manifest
OUT/.eyecandies_manifest.jsonl). Then run tools/preprocessing.py OUT --output_dir ... as for
MVTec 3D-AD. Exits 2 on bad input (the message names the file).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.eyecandies.convert import ConvertConfig, convert  # noqa: E402
from tools.eyecandies.release import DEFAULT_LIGHT, LIGHTS  # noqa: E402
from utils.cli import EXIT_INTERRUPTED, add_names, interruptible, make_parser, parse_config, run_cli  # noqa: E402


def parse_args(argv=None) -> tuple[ConvertConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("raw", type=Path, help="the Eyecandies release (folder of the class folders); only read")
    p.add_argument("out", type=Path, help="output root in the MVTec 3D-AD layout")
    p.add_argument("--light", type=int, default=DEFAULT_LIGHT, choices=range(len(LIGHTS)),
                   help="RGB image to use: " + ", ".join(f"{i} {name}" for i, name in enumerate(LIGHTS)))
    add_names(p, "--classes", default=None, help="classes to convert (default: every class found)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (same bytes as 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parse_config(p, ConvertConfig, argv, cli_only=("quiet",))


def execute(cfg: ConvertConfig, cli: argparse.Namespace) -> int:
    summary = interruptible(lambda: convert(cfg, progress=not cli.quiet))
    if summary is None:
        return EXIT_INTERRUPTED
    print(summary.report())
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
