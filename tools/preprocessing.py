#!/usr/bin/env python
"""Preprocess an MVTec 3D-AD data set: background-plane removal and largest-cluster cleaning (SPEC 2).

    python tools/preprocessing.py DATASET_PATH [--output_dir OUT] [--workers N] [--seed S]

Without --output_dir the data set is modified in place (the authors' documented pipeline);
with it, DATASET_PATH is left untouched and OUT receives the same layout. Reruns skip
finished samples (manifest .preprocessing_manifest.jsonl in the processed root) and an
interrupted run resumes where it stopped. Exits non-zero if any sample failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset_path", type=Path, help="root of the MVTec 3D-AD data set (<class>/<split>/...)")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="write the preprocessed copy here instead of modifying DATASET_PATH in place")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of Open3D's RANSAC (re-seeded for every sample: same bytes in any order or worker count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from core.preprocessing import preprocess_dataset
    from utils.io import DataError

    try:
        summary = preprocess_dataset(args.dataset_path, output_dir=args.output_dir, workers=args.workers,
                                     seed=args.seed, progress=not args.quiet)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished samples are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.report(), file=sys.stdout if summary.ok else sys.stderr)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
