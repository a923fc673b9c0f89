#!/usr/bin/env python
"""Preprocess an MVTec 3D-AD data set: background-plane removal and largest-cluster cleaning (SPEC 2).

    python tools/preprocessing.py DATASET_PATH [--output_dir OUT] [--workers N] [--seed S]

Without --output_dir the data set is modified in place (the authors' documented pipeline);
with it, DATASET_PATH is left untouched and OUT receives the same layout. Reruns skip
finished samples (manifest .preprocessing_manifest.jsonl in the processed root) and an
interrupted run resumes where it stopped. Exits 1 if any sample failed, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.preprocessing import PreprocessConfig, preprocess  # noqa: E402
from utils.cli import EXIT_INTERRUPTED, interruptible, make_parser, parse_config, run_cli  # noqa: E402


def parse_args(argv=None) -> tuple[PreprocessConfig, argparse.Namespace]:
    p = make_parser(__doc__)
    p.add_argument("dataset_path", type=Path, help="root of the MVTec 3D-AD data set (<class>/<split>/...)")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="write the preprocessed copy here instead of modifying DATASET_PATH in place")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of Open3D's RANSAC (re-seeded for every sample: same bytes in any order or worker count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cfg, cli = parse_config(p, PreprocessConfig, argv, cli_only=("quiet",))
    if cfg.workers < 1:
        p.error(f"--workers must be at least 1, got {cfg.workers}")
    return cfg, cli


def execute(cfg: PreprocessConfig, cli: argparse.Namespace) -> int:
    summary = interruptible(lambda: preprocess(cfg, progress=not cli.quiet))
    if summary is None:
        return EXIT_INTERRUPTED
    print(summary.report(), file=sys.stdout if summary.ok else sys.stderr)
    return 0 if summary.ok else 1


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
