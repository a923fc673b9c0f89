#!/usr/bin/env python
"""Pretrain the 3D expert (PointNet encoder + local NIF SDF decoder) on the pretraining patches.

    python train_3Dmodel.py --grid_path G --ckpt_path checkpoint [--epoch 1000] [--resume CKPT]

Reads ``G/PRETRAIN_DATA/<cls>/NNN.npz`` (written by ``cut_patches.py --pretrain``) and writes
``<ckpt_path>/<YYYY-mm-dd-HH-MM-SS>-knn<point_num>/`` holding ``ckpt_NNNNNN.pth``,
``train_states.txt`` and ``Congiguration.txt/.pickle`` (SPEC 4.3). ``--epoch E`` runs the
epochs 0 ... E (E + 1 passes, the authors' meaning).

    torchrun --nproc_per_node N train_3Dmodel.py ...   (data-parallel; --batch_size stays the global batch)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.patch_files import POINT_NUM  # noqa: E402
from core.sdf_training import TrainConfig, train  # noqa: E402
from utils.cli import make_parser, parse_config, run_cli  # noqa: E402
from utils.distributed import is_main  # noqa: E402


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = make_parser(__doc__)
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
    p.add_argument("--point_num", type=int, default=POINT_NUM, help="points per patch (must match the grid)")
    p.add_argument("--amp", action="store_true", help="bfloat16 mixed precision (changes the numbers slightly)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (same maths; CUDA recommended)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parse_config(p, TrainConfig, argv, cli_only=("quiet",))


def execute(cfg: TrainConfig, cli: argparse.Namespace) -> int:
    run_dir = train(cfg, progress=not cli.quiet)
    if is_main():
        print(f"checkpoints written to {run_dir}")
    return 0


def main(argv=None) -> int:
    return run_cli(execute, *parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
