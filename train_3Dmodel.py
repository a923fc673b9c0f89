#!/usr/bin/env python
"""Pretrain the 3D expert (PointNet encoder + local NIF SDF decoder) on the pretraining patches.

    python train_3Dmodel.py --grid_path G --ckpt_path checkpoint [--epoch 1000] [--resume CKPT]

Reads ``G/PRETRAIN_DATA/<cls>/NNN.npz`` (written by ``cut_patches.py --pretrain``) and writes
``<ckpt_path>/<YYYY-mm-dd-HH-MM-SS>-knn<point_num>/`` holding ``ckpt_NNNNNN.pth``,
``train_states.txt`` and ``Congiguration.txt/.pickle`` (SPEC 4.3). ``--epoch E`` runs the
epochs 0 ... E (E + 1 passes, the authors' meaning).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grid_path", type=Path, required=True,
                   help="patch folder written by cut_patches.py (holds PRETRAIN_DATA/)")
    p.add_argument("--ckpt_path", type=Path, default=Path("checkpoint"), help="folder for the run folders")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epoch", type=int, default=1000, help="last epoch index: runs epochs 0 ... EPOCH")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--save_every", type=int, default=100, help="checkpoint after every epoch divisible by this")
    p.add_argument("--resume", type=Path, default=None,
                   help="checkpoint to continue from (its weights, optimiser state and epoch count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, shuffling and noise copies")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--point_num", type=int, default=500, help="points per patch (must match the grid)")
    p.add_argument("--amp", action="store_true", help="bfloat16 mixed precision (changes the numbers slightly)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (same maths; CUDA recommended)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from core.sdf_model import CheckpointError
    from core.sdf_training import TrainConfig, train
    from utils.device import DeviceUnavailableError
    from utils.io import DataError

    options = {k: v for k, v in vars(args).items() if k != "quiet"}
    try:
        run_dir = train(TrainConfig(**options), progress=not args.quiet)
    except (DataError, CheckpointError, DeviceUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoints written to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
