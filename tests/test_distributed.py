"""train_3Dmodel.py and main.py under torchrun (CPU, gloo, world size 2) against one process (issue 14).

Every run is a subprocess with one OpenMP thread per process, so a rank's float kernels are
those of the single-process baseline.

Training, float32 bounds after 3 Adam steps (one epoch of 3 global batches of 4): Adam's first
step moves every weight by about ``lr * sign(gradient)``, so a gradient element that float
rounding can flip (one near zero, or one that only rounding makes non-zero, such as the biases
in front of a BatchNorm) moves by up to ``2 lr`` more or less. Two single-process runs that
differ only in the order of the samples inside each batch (same maths, other rounding) differ
by 2.8e-2 of the update's norm, the world-size-2 run by 3.1e-2; per-rank BatchNorm statistics
(what plain BatchNorm layers would do) differ by 0.85 and change the loss by 3e-2. Bounds:
the epoch loss within 1e-4 relative, all parameters within 0.1 of the update's norm, the
running variances within 1e-4 relative. In float64 the same two computations agree to 1e-12
in the loss and 1e-5 in every tensor (:func:`test_training_steps_equal_in_float64`).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cutting import CutConfig, cut_patches
from core.pipeline import shard_classes
from core.preprocessing import preprocess_dataset
from core.sdf_model import SDFModel, load_sdf_checkpoint, save_sdf_checkpoint
from core.sdf_training import PretrainSet, epoch_batches, parallel_loss, rank_batches
from tests.core.test_sdf_training import read_log, write_pretrain
from tests.launcher import REPO, child_env, launch_local, torchrun
from tools.synthetic.mvtec import generate_dataset
from utils import distributed

BATCH, POINTS, LR = 4, 24, 1e-4
TIMEOUT = 600


def run(cmd: list, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def only_run_folder(parent: Path) -> Path:
    folders = [p for p in parent.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders                      # rank 0 alone made one
    return folders[0]


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """12 pretraining patches of 24 points, 2 noise copies: 3 global batches of 4 per epoch."""
    return write_pretrain(tmp_path_factory.mktemp("dist_grid") / "grid", {"bagel": [6], "cookie": [6]},
                          point_num=POINTS, n_copies=2)


@pytest.fixture(scope="module")
def trained(grid, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_train")
    args = ["--grid_path", grid, "--batch_size", BATCH, "--point_num", POINTS, "--device", "cpu", "--quiet",
            "--save_every", 1, "--seed", 0, "--learning_rate", LR, "--epoch", 1]
    single = run([sys.executable, "train_3Dmodel.py", *args, "--ckpt_path", root / "single"])
    assert single.returncode == 0, single.stderr
    world2 = run(torchrun("train_3Dmodel.py", *args, "--ckpt_path", root / "world2"))
    assert world2.returncode == 0, world2.stderr
    first = only_run_folder(root / "world2") / "ckpt_000000.pth"
    resumed = run(torchrun("train_3Dmodel.py", *args, "--ckpt_path", root / "resumed", "--resume", first))
    assert resumed.returncode == 0, resumed.stderr
    return dict(single=only_run_folder(root / "single"), world2=only_run_folder(root / "world2"),
                resumed=only_run_folder(root / "resumed"), stdout=world2.stdout)


def test_three_steps_at_world_size_2_equal_one_process(trained):
    """ckpt_000000 holds the weights after epoch 0: 3 Adam steps on the same global batches."""
    one = torch.load(trained["single"] / "ckpt_000000.pth", weights_only=True)
    two = torch.load(trained["world2"] / "ckpt_000000.pth", weights_only=True)
    assert list(two["sdf_model"]) == list(one["sdf_model"]) == list(SDFModel().state_dict())   # the authors' keys
    assert two["current_iteration"] == one["current_iteration"] == 0 and two["epochs_done"] == 1

    (e1, loss1), (e2, loss2) = read_log(trained["single"])[0], read_log(trained["world2"])[0]
    assert e1 == e2 == 0 and loss2 == pytest.approx(loss1, rel=1e-4)

    torch.manual_seed(0)
    init = SDFModel().state_dict()                          # the weights both runs started from
    names = [k for k, v in init.items() if v.is_floating_point() and "running" not in k]
    flat = {run: torch.cat([ckpt["sdf_model"][k].double().flatten() for k in names]) for run, ckpt in
            (("one", one), ("two", two))}
    start = torch.cat([init[k].double().flatten() for k in names])
    assert (flat["two"] - flat["one"]).norm() <= 0.1 * (flat["one"] - start).norm()
    for k, v in one["sdf_model"].items():
        if "running_var" in k:
            assert (two["sdf_model"][k] - v).norm() <= 1e-4 * v.norm(), k
        if "num_batches_tracked" in k:
            assert int(two["sdf_model"][k]) == int(v) == 3


def test_rank_0_alone_writes_the_run_folder(trained):
    one, two = trained["single"], trained["world2"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert trained["stdout"].count("checkpoints written to") == 1
    assert [e for e, _ in read_log(two)] == [0, 1]
    text = (two / "Congiguration.txt").read_text()
    for line in ("world_size: 2\n", "rank_batch_size: 2\n", "batch_size: 4\n", "batchnorm: GlobalBatchNorm (gloo)\n"):
        assert line in text
    assert "world_size" not in (one / "Congiguration.txt").read_text()
    model, iteration = load_sdf_checkpoint(two / "ckpt_000002.pth")     # loads anywhere, as one process's
    assert iteration == 2 and isinstance(model, SDFModel)


def test_resume_under_torchrun_continues_exactly(trained):
    """Resumed from the checkpoint after epoch 0, epoch 1 gives the uninterrupted run's bytes."""
    full = torch.load(trained["world2"] / "ckpt_000002.pth", weights_only=True)
    resumed = torch.load(trained["resumed"] / "ckpt_000002.pth", weights_only=True)
    for k, v in full["sdf_model"].items():
        assert torch.equal(resumed["sdf_model"][k], v), k
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(trained["resumed"]) == read_log(trained["world2"])[1:]


def training_steps(grid: str) -> tuple[list[float], dict]:
    """3 Adam steps in float64 through parallel_loss and rank_batches (one process or a torchrun rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    try:
        with distributed.session(device):
            data = PretrainSet(grid, POINTS, progress=False)
            torch.manual_seed(0)
            model = SDFModel().double().train()
            optimizer = torch.optim.Adam(model.parameters(), lr=LR)
            loss_fn = parallel_loss(model, device)
            index, copy = rank_batches(*epoch_batches(len(data), data.n_copies, BATCH, 0, 0), distributed.rank(),
                                       distributed.world_size())
            losses = []
            for b in range(len(index)):
                targets, queries = (t.double() for t in data.batch(index[b], copy[b]))
                loss = loss_fn(targets, queries)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(distributed.mean_over_ranks(loss.detach()).item())
            return losses, {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def test_training_steps_equal_in_float64(grid):
    """Without float32 rounding the world-size-2 steps are one process's steps (global BatchNorm, DDP mean)."""
    losses, state = training_steps(str(grid))
    ranks = launch_local(training_steps, str(grid))
    assert ranks[0][0] == ranks[1][0] and len(losses) == 3
    np.testing.assert_allclose(ranks[0][0], losses, rtol=1e-12)
    for k, v in state.items():
        assert torch.equal(ranks[0][1][k], ranks[1][1][k]), k
        if v.is_floating_point():
            assert (ranks[0][1][k] - v).norm() <= 1e-5 * v.norm(), k


# ----------------------------------------------------------------------------- main.py
@pytest.fixture(scope="module")
def main_data(tmp_path_factory):
    """Two tiny classes (2 training, 2 test samples each), patches with group_mul 1, an untrained SDF model."""
    root = tmp_path_factory.mktemp("dist_main")
    generate_dataset(root / "raw", classes=("bagel", "cookie"), n_train=2, n_val=0, n_test_good=1,
                     n_test_defect=1, defects=("bump",), size=100, seed=0, progress=False)
    preprocess_dataset(root / "raw", root / "pre", workers=1, seed=0, progress=False)
    cut_patches(CutConfig(root / "pre", root / "grids", group_mul=1, device="cpu"), progress=False)
    torch.manual_seed(0)
    save_sdf_checkpoint(root / "sdf.pth", SDFModel(), 0)
    return root


def main_args(root: Path, grids: Path, out: Path) -> list:
    return ["main.py", "--datasets_path", root / "pre", "--grid_path", grids, "--ckpt_path", root / "sdf.pth",
            "--rgb_weights", "random", "--device", "cpu", "--viz", "--save_maps", "--output_dir", out]


@pytest.fixture(scope="module")
def main_runs(main_data):
    single = run([sys.executable, *main_args(main_data, main_data / "grids", main_data / "out1")])
    assert single.returncode == 0, single.stderr
    world2 = run(torchrun(*main_args(main_data, main_data / "grids", main_data / "out2")))
    assert world2.returncode == 0, world2.stderr
    return only_run_folder(main_data / "out1"), only_run_folder(main_data / "out2"), world2.stdout


def test_main_at_world_size_2_writes_the_single_process_bytes(main_data, main_runs):
    one, two, stdout = main_runs
    for name in ("results.txt", "results.json", "alignment.txt"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file()) == files
    per_class = [f for f in files if f.parts[0] in ("bagel", "cookie", "anomaly_maps")]
    assert len(per_class) == 2 * (1 + 2 + 2)                # testing_state, 2 heatmaps, 2 maps per class
    for f in per_class:                                     # written by the rank that computed the class
        assert (two / f).read_bytes() == (one / f).read_bytes(), f
    shards = shard_classes(main_data / "pre", ["bagel", "cookie"], 2)
    assert shards == [["bagel"], ["cookie"]]
    timing = json.loads((two / "timing.json").read_text())["classes"]
    assert {c: t["rank"] for c, t in timing.items()} == {"bagel": 0, "cookie": 1}
    assert "timing" not in (one / "results.json").read_text()
    assert stdout.count("results written to") == 1 and stdout.count("Image ROCAUC Results") == 1
    config = json.loads((two / "configuration.json").read_text())
    assert config["world_size"] == 2 and config["rank_classes"] == shards


def run_timed(cmd: list) -> tuple[int, list[tuple[float, str]], float]:
    """Run ``cmd``; (exit status, its output lines with their arrival times, the time it ended)."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    rc = proc.wait(timeout=TIMEOUT)
    return rc, lines, time.monotonic()


@pytest.mark.parametrize("fault", ["missing", "malformed"])
def test_a_failing_rank_stops_every_rank(main_data, tmp_path, fault):
    """Rank 1's class has a bad patch file: every rank stops within seconds, with rank 1's message, no results.

    ``missing``: a training patch file is gone, found by the input checks before any work
    (core/preflight.py). ``malformed``: a test patch file holds 7-point patches, found only when
    rank 1 reads it, while rank 0 is computing its own class or waiting for rank 1.
    """
    victim = shard_classes(main_data / "pre", ["bagel", "cookie"], 2)[1][0]
    grids = tmp_path / "grids"
    shutil.copytree(main_data / "grids", grids)
    if fault == "missing":
        bad = grids / victim / "train" / "good" / "npz" / "001.npz"
        bad.unlink()
        expected = f"MissingGridError: 1 patch file(s) not found: {bad}; run `python cut_patches.py"
    else:
        bad = sorted((grids / victim / "test").glob("*/npz/*.npz"))[-1]
        np.savez(bad, points_gt=np.zeros((2, 7, 3), np.float32), points_idx=np.zeros((2, 7), np.int64))
        expected = f"DataError: {bad}: patches hold 7 points, expected "
    rc, lines, end = run_timed(torchrun(*main_args(main_data, grids, tmp_path / "out")))
    assert rc != 0
    errors = [(t, line) for t, line in lines if "error: rank 1 of 2: " in line]
    assert errors, "\n".join(line for _, line in lines[-40:])
    when, message = errors[0]
    assert expected.split(": ", 1)[1] in message
    assert end - when < 10, end - when                      # torchrun stopped rank 0 and ended at once
    summary = "\n".join(line for _, line in lines[lines.index(errors[0]) + 1:])
    # rank 0 is stopped by torchrun (SIGTERM), or its collective with rank 1 broke first: a one-line error, exit 2
    rank0 = re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: (-15|2) ", summary)
    assert rank0, summary
    if rank0.group(1) == "2":
        assert any("error: rank 0 of 2: stopped in " in line for _, line in lines)
    assert not [line for _, line in lines if f'File "{REPO}' in line]     # no traceback of a rank, only torchrun's
    assert f"traceback : rank 1 of 2: {expected}" in summary                 # torchrun's root cause
    assert not list((tmp_path / "out").glob("**/results.*"))
