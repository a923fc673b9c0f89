"""Orchestration helpers of main.py (core/pipeline.py)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from core.cutting import CutConfig, cut_patches
from core.params import MethodParams
from core.pipeline import RunConfig, balance_classes, few_shot_subset, reference_sample_orders, run
from core.preprocessing import preprocess_dataset
from tools.synthetic.mvtec import generate_dataset


def test_reference_orders_of_parity_fixture():
    """The parity README's fit and align orders of the 8 torus training samples (Appendix A)."""
    state = torch.random.get_rng_state()
    fit, align = reference_sample_orders(8, seed=0)
    assert fit == [6, 7, 2, 1, 4, 5, 0, 3]
    assert align == [4, 6, 1, 2, 5, 0, 7, 3]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


@pytest.mark.parametrize("n", [1, 8, 40])
def test_orders_equal_shuffled_dataloaders(n):
    """Same draws as two real shuffled DataLoaders iterated after the same RNG consumption."""
    from core.pipeline import _replay_reference_sdf_init

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        _replay_reference_sdf_init()
        data = list(range(n))
        orders = [[int(b) for b in DataLoader(data, batch_size=1, shuffle=True, num_workers=0)] for _ in range(2)]
    assert reference_sample_orders(n, seed=3) == tuple(orders)


# ----------------------------------------------------------------------------- method flags (SPEC 13)
def test_few_shot_subset():
    perm = np.random.default_rng(7).permutation(20)
    assert few_shot_subset(20, 5, seed=7) == sorted(perm[:5].tolist())
    assert few_shot_subset(20, 5, seed=8) != few_shot_subset(20, 5, seed=7)
    assert few_shot_subset(20, None) == few_shot_subset(20, 20) == few_shot_subset(20, 99) == list(range(20))


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, parity_dir):
    """A preprocessed synthetic class (6 training, 2 test samples) cut into few patches."""
    root = tmp_path_factory.mktemp("tiny_pipeline")
    generate_dataset(root / "raw", classes=["bagel"], n_train=6, n_val=0, n_test_good=1, n_test_defect=1,
                     defects=["bump"], size=100, progress=False)
    preprocess_dataset(root / "raw", root / "pre", progress=False)
    cut_patches(CutConfig(root / "pre", root / "grids", group_mul=1), progress=False)
    return root, parity_dir / "sdf_checkpoint.pth"


def test_method_flags_reach_the_pipeline(tiny_run_inputs, monkeypatch):
    """main.py's method flags, through the per-class loop: the memory holds the --n_train subset,
    alignment scores --align_samples samples with --align_sigma, and inference, footprints and blur
    see their values; everything is recorded."""
    import core.inference as inference

    root, ckpt = tiny_run_inputs
    seen = {"omp": set(), "shift": set(), "radius": set()}
    real_omp, real_fp, real_blur = inference.omp, inference.footprints, inference.blur_map
    monkeypatch.setattr(inference, "omp", lambda x, a, n: seen["omp"].add((a.shape[1], n)) or real_omp(x, a, n))
    monkeypatch.setattr(inference, "footprints", lambda p, s: seen["shift"].add(s) or real_fp(p, s))
    monkeypatch.setattr(inference, "blur_map", lambda m, r: seen["radius"].add(r) or real_blur(m, r))
    method = MethodParams(k_sdf=4, k_rgb=3, n_nonzero=2, footprint_shift=1, align_samples=2, align_sigma=1.5,
                          blur_radius=3, n_train=3)
    cfg = RunConfig(root / "pre", root / "grids", ckpt, output_dir=root / "out", device="cpu",
                    rgb_backbone="tf_efficientnet_lite0", rgb_weights="random", method=method)
    result_dir, results = run(cfg)
    res = results["bagel"]
    keep = sorted(np.random.default_rng(0).permutation(6)[:3].tolist())
    fit, align_order = reference_sample_orders(3, seed=0)
    assert res.memory_samples == [f"bagel/train/good/{keep[i]:03d}" for i in fit]
    assert res.alignment.n_samples == 2 and res.alignment.sigma == 1.5
    assert seen == {"omp": {(4, 2), (3, 2)}, "shift": {1}, "radius": {3.0}}
    report = json.loads((result_dir / "results.json").read_text())
    assert report["method_params"] == dataclasses.asdict(method)
    assert report["classes"]["bagel"]["memory_samples"] == 3
    assert report["classes"]["bagel"]["train_subset"] == [f"{i:03d}" for i in keep]
    config = json.loads((result_dir / "configuration.json").read_text())
    assert (config["k_number"], config["k_rgb"], config["dict_n_component"], config["footprint_shift"],
            config["align_samples"], config["align_sigma"], config["blur_radius"], config["n_train"]) == \
        (4, 3, 2, 1, 2, 1.5, 3.0, 3)
    assert "     n_train: 3\n" in (result_dir / "Congiguration.txt").read_text()


def test_classes_balanced_over_ranks():
    """Largest first onto the least loaded rank; each rank keeps the run order; ties: earlier class, lower rank."""
    sizes = {"bagel": 10, "cable_gland": 40, "carrot": 25, "cookie": 25, "dowel": 5}
    # 40 -> r0; 25 -> r1; 25 -> r1 (50); 10 -> r0 (50); 5 -> r0 (tie: lower rank) = 55 / 50
    assert balance_classes(sizes, 2) == [["bagel", "cable_gland", "dowel"], ["carrot", "cookie"]]
    assert balance_classes(sizes, 3) == [["cable_gland"], ["bagel", "carrot"], ["cookie", "dowel"]]
    assert balance_classes(sizes, 1) == [list(sizes)]
    assert balance_classes({"a": 3, "b": 3}, 2) == [["a"], ["b"]]
    assert balance_classes({"a": 3}, 3) == [["a"], [], []]                     # more ranks than classes
    mvtec = {c: 200 + 7 * i for i, c in enumerate("abcdefghij")}
    loads = [sum(mvtec[c] for c in shard) for shard in balance_classes(mvtec, 4)]
    assert max(loads) - min(loads) <= max(mvtec.values())                      # greedy bound
