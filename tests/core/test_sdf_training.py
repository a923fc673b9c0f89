"""Pretraining (SPEC 4.2-4.3): data set, epoch sampling, PCP loss, training loop, checkpoints, resume."""
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from core.sdf_model import SDFModel, load_sdf_checkpoint
from core.sdf_training import (PRETRAIN_DIR, PretrainSet, TrainConfig, epoch_batches, pcp_loss, pretrain_files,
                               rank_batch_size, rank_batches, train)
from utils.errors import ConfigError, DataError
from utils.io import save_npz

LOG_LINE = re.compile(r"epoch:(\d{4})\tloss:(\d+\.\d{9})")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads slow these small steps down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- synthetic pretraining data
def surface_patch(rng: np.random.Generator, point_num: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``point_num`` points of an analytic surface and their unit normals, normalised as
    SPEC 3.4 (scaled to a largest extent of 1, centred on its mean)."""
    n = 20 * point_num
    if kind == "sphere":
        nrm = rng.normal(size=(n, 3))
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        pts = rng.uniform(0.5, 2.0) * nrm
    elif kind == "torus":
        big, small = rng.uniform(1.0, 2.0), rng.uniform(0.3, 0.6)
        t, f = rng.uniform(0, 2 * np.pi, (2, n))
        ring = np.stack([np.cos(t), np.sin(t), np.zeros(n)], 1)
        nrm = np.cos(f)[:, None] * ring + np.sin(f)[:, None] * np.array([0.0, 0.0, 1.0])
        pts = big * ring + small * nrm
    else:                                                        # wavy plane z = a sin(kx) cos(ky)
        a, k = rng.uniform(0.05, 0.25), rng.uniform(1.0, 3.0)
        x, y = rng.uniform(-1, 1, (2, n))
        pts = np.stack([x, y, a * np.sin(k * x) * np.cos(k * y)], 1)
        nrm = np.stack([-a * k * np.cos(k * x) * np.cos(k * y), a * k * np.sin(k * x) * np.sin(k * y),
                        np.ones(n)], 1)
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    _, idx = cKDTree(pts).query(pts[rng.integers(n)], k=point_num)
    patch = pts[idx] / np.ptp(pts[idx], axis=0).max()
    return (patch - patch.mean(0)).astype(np.float32), nrm[idx].astype(np.float32)


def pretrain_arrays(rng, n_patches, point_num=500, n_copies=20, kinds=("sphere", "torus", "plane")):
    """One pretraining file's arrays by the SPEC 3.5 recipe, simply: sigma = distance to the
    (point_num/10 + 1)-th neighbour (the 51st of 500), ceil(0.625 C) copies at 0.5 sigma, the rest
    at 1 sigma, targets = nearest patch point."""
    samples, points, origins = [], [], []
    n_a = int(np.ceil(n_copies * 0.625))
    scales = np.r_[np.full(n_a, 0.5), np.ones(n_copies - n_a)]
    for _ in range(n_patches):
        patch, _ = surface_patch(rng, point_num, kinds[rng.integers(len(kinds))])
        tree = cKDTree(patch)
        sigma = tree.query(patch, k=point_num // 10 + 1)[0][:, -1:]
        queries = np.concatenate([patch + s * sigma * rng.normal(size=patch.shape) for s in scales])
        samples.append(queries)
        points.append(patch[tree.query(queries)[1]])
        origins.append(patch)
    return dict(samples_all=np.asarray(samples), points_all=np.asarray(points, np.float32),
                origins_all=np.asarray(origins, np.float32))


def write_pretrain(grid: Path, layout: dict, seed=0, compressed=True, dtype=np.float64, **kw) -> Path:
    """``layout``: {class: [patches per file, ...]} -> ``grid/PRETRAIN_DATA/<cls>/NNN.npz``
    (queries stored as ``dtype``: float64 like the reference, float32 like ``cut_patches.py``)."""
    rng = np.random.default_rng(seed)
    for cls, counts in layout.items():
        for i, count in enumerate(counts):
            arrays = pretrain_arrays(rng, count, **kw)
            arrays["samples_all"] = arrays["samples_all"].astype(dtype)
            save_npz(grid / PRETRAIN_DIR / cls / f"{i:03d}.npz", compressed=compressed, **arrays)
    return grid


def read_log(run: Path) -> list[tuple[int, float]]:
    lines = (run / "train_states.txt").read_text().splitlines()
    matches = [LOG_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    return [(int(m[1]), float(m[2])) for m in matches]


# ----------------------------------------------------------------------------- data
def test_pretrain_set_in_memory_cache_and_mapped_files_agree(tmp_path):
    grid = write_pretrain(tmp_path / "grid", {"b": [3], "a": [2, 4]}, point_num=40, n_copies=5)
    files = pretrain_files(grid)
    assert [f.relative_to(grid / PRETRAIN_DIR).as_posix() for f in files] == ["a/000.npz", "a/001.npz", "b/000.npz"]
    raw = [np.load(f) for f in files]
    expected_q = np.concatenate([r["samples_all"] for r in raw]).astype(np.float32)
    expected_t = np.concatenate([r["points_all"] for r in raw])
    ram = PretrainSet(grid, point_num=40, progress=False)
    assert ram.storage == "in memory" and len(ram) == 9 and ram.n_copies == 5
    (queries, targets), = ram.parts
    assert queries.dtype == np.float32 and queries.shape == (9, 5, 40, 3)
    np.testing.assert_array_equal(queries[3, 2], expected_q[3, 80:120])    # copy m = rows m*40 ... m*40+39
    np.testing.assert_array_equal(queries.reshape(9, 200, 3), expected_q)
    np.testing.assert_array_equal(targets.reshape(9, 200, 3), expected_t)

    index, copy = np.array([4, 0, 8, 2, 5]), np.array([1, 4, 0, 3, 2])
    batch = ram.batch(index, copy)
    assert batch[0].dtype == torch.float32 and batch[0].shape == (5, 40, 3)
    np.testing.assert_array_equal(batch[1][1].numpy(), expected_q[0, 160:200])
    np.testing.assert_array_equal(batch[0][0].numpy(), expected_t[4, 40:80])

    # compressed float64 files (the reference's kind) beyond the RAM limit: a one-time float32 cache
    cached = PretrainSet(grid, point_num=40, in_memory_limit=0, progress=False)
    cache = grid / PRETRAIN_DIR / ".cache"
    assert cached.storage == f"memory-mapped cache {cache}" and isinstance(cached.parts[0][0], np.memmap)
    for a, b in zip(cached.batch(index, copy), batch):
        assert torch.equal(a, b)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["shape"] == [9, 5, 40, 3]
    assert [f[0] for f in manifest["files"]] == ["a/000.npz", "a/001.npz", "b/000.npz"]
    stamp = (cache / "queries.npy").stat().st_mtime_ns
    PretrainSet(grid, point_num=40, in_memory_limit=0, progress=False)          # reused, not rebuilt
    assert (cache / "queries.npy").stat().st_mtime_ns == stamp
    write_pretrain(grid, {"b": [1]}, seed=5, point_num=40, n_copies=5)          # b/000.npz changes
    again = PretrainSet(grid, point_num=40, in_memory_limit=0, progress=False)
    assert len(again) == 7 and (cache / "queries.npy").stat().st_mtime_ns != stamp
    np.testing.assert_array_equal(again.parts[0][0][6].reshape(200, 3),
                                  np.load(files[2])["samples_all"][0].astype(np.float32))
    assert not list(cache.glob("*.part*"))

    # uncompressed float32 files (what cut_patches.py writes): mapped in place, one part per file
    flat = write_pretrain(tmp_path / "flat", {"b": [3], "a": [2, 4]}, point_num=40, n_copies=5,
                          compressed=False, dtype=np.float32)
    mapped = PretrainSet(flat, point_num=40, in_memory_limit=0, progress=False)
    assert mapped.storage == "memory-mapped files" and len(mapped.parts) == 3
    assert all(isinstance(q, np.memmap) for q, _ in mapped.parts) and not (flat / PRETRAIN_DIR / ".cache").exists()
    for a, b in zip(mapped.batch(index, copy), batch):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(np.concatenate([q for q, _ in mapped.parts]), queries)
    np.testing.assert_array_equal(np.concatenate([t for _, t in mapped.parts]), targets)


def test_missing_empty_and_mismatched_data_are_clear_errors(tmp_path):
    grid = tmp_path / "grid"
    with pytest.raises(DataError, match=r"PRETRAIN_DATA: pretraining data folder not found.*cut_patches\.py"
                                         r".*--pretrain"):
        PretrainSet(grid)
    (grid / PRETRAIN_DIR / "bagel").mkdir(parents=True)
    with pytest.raises(DataError, match=r"PRETRAIN_DATA: no pretraining files.*cut_patches\.py.*--pretrain"):
        PretrainSet(grid)
    write_pretrain(grid, {"bagel": [2]}, point_num=30, n_copies=2)
    with pytest.raises(DataError, match=r"000\.npz: the grid's patches hold 30 points but --point_num is 500"):
        PretrainSet(grid, point_num=500)
    save_npz(grid / PRETRAIN_DIR / "bagel" / "001.npz", samples_all=np.zeros((2, 60, 3), np.float32))
    with pytest.raises(DataError, match=r"001\.npz: missing key\(s\) \['points_all', 'origins_all'\]"):
        PretrainSet(grid, point_num=30)


def test_epoch_batches_are_seeded_full_and_shuffled():
    index, copy = epoch_batches(37, 20, 8, seed=3, epoch=5)
    assert index.shape == copy.shape == (4, 8)                       # 37 // 8 full batches, rest dropped
    assert len(np.unique(index)) == 32 and index.max() < 37
    assert copy.min() >= 0 and copy.max() < 20 and len(np.unique(copy)) > 5
    again = epoch_batches(37, 20, 8, seed=3, epoch=5)
    assert np.array_equal(index, again[0]) and np.array_equal(copy, again[1])
    other = epoch_batches(37, 20, 8, seed=3, epoch=6)
    assert not np.array_equal(index, other[0])
    assert not np.array_equal(index, epoch_batches(37, 20, 8, seed=4, epoch=5)[0])


def test_rank_batches_split_every_global_batch():
    index, copy = epoch_batches(37, 20, 8, seed=3, epoch=5)
    shares = [rank_batches(index, copy, r, 4) for r in range(4)]
    assert all(i.shape == c.shape == (4, 2) for i, c in shares)
    assert np.array_equal(np.concatenate([i for i, _ in shares], axis=1), index)     # contiguous, in rank order
    assert np.array_equal(np.concatenate([c for _, c in shares], axis=1), copy)
    one, = [rank_batches(index, copy, 0, 1)]
    assert np.array_equal(one[0], index) and np.array_equal(one[1], copy)            # one process: the whole batch
    assert rank_batch_size(32, 8) == 4
    with pytest.raises(ConfigError, match=r"--batch_size 30 is the global batch and must split evenly over the 4 "
                                          r"ranks .* pass a multiple of 4 \(e.g. 28\)"):
        rank_batch_size(30, 4)


# ----------------------------------------------------------------------------- loss
def authors_loss(model: SDFModel, targets: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """SPEC 4.2 the reference's way: tiled latent through fc1 per point, autograd double backprop."""
    nif = model.NIF
    latent = model.encoder(targets)[:, None, :].expand(-1, queries.shape[1], -1)
    queries = queries.clone().requires_grad_(True)
    f = torch.relu(nif.fc1(latent))
    u = torch.relu(nif.fc3(torch.cat([torch.relu(nif.fc2(queries)), f], dim=-1)))
    for layer in nif.hidden_layers:
        u = torch.relu(layer(u))
    sdf = nif.fc5(u)
    grad, = torch.autograd.grad(sdf, queries, torch.ones_like(sdf), create_graph=True)
    normal = grad / torch.sqrt(torch.sum(grad ** 2, dim=-1) + 1e-12).unsqueeze(-1)
    return torch.linalg.norm(targets - (queries - sdf * normal), ord=2, dim=-1).mean()


def test_pcp_loss_and_gradients_equal_double_backprop(parity_dir):
    model = SDFModel()
    model.load_state_dict(load_sdf_checkpoint(parity_dir / "sdf_checkpoint.pth")[0].state_dict())
    model.train()
    arrays = pretrain_arrays(np.random.default_rng(1), 4, point_num=100, n_copies=2)
    targets = torch.from_numpy(arrays["points_all"][:, :100])
    queries = torch.from_numpy(arrays["samples_all"][:, :100].astype(np.float32))
    results = []
    for fn in (pcp_loss, authors_loss):
        model.zero_grad()
        loss = fn(model, targets, queries)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (ours, g_ours), (ref, g_ref) = results
    assert ref.item() > 0.01
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    overall = max(g.abs().max() for g in g_ref.values())
    for k in g_ref:            # biases before a BatchNorm have zero gradient up to rounding: overall scale
        assert (g_ours[k] - g_ref[k]).abs().max() <= 1e-4 * g_ref[k].abs().max() + 1e-6 * overall, k
    # the second-order terms matter: dropping them (detached gradient) changes the weight gradients
    model.zero_grad()
    nif = model.NIF
    code = nif.latent_code(model.encoder(targets))
    q = queries.clone().requires_grad_(True)
    sdf = nif.forward_with_code(code, q)
    grad, = torch.autograd.grad(sdf.sum(), q, retain_graph=True)
    normal = grad / torch.sqrt(grad.square().sum(-1, keepdim=True) + 1e-12)
    torch.linalg.vector_norm(targets - (queries - sdf * normal), dim=-1).mean().backward()
    reference = g_ref["NIF.fc40.weight_v"]
    assert (nif.fc40.weight_v.grad - reference).abs().max() > 1e-3 * reference.abs().max()


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def small_grid(tmp_path_factory):
    return write_pretrain(tmp_path_factory.mktemp("tiny") / "grid", {"a": [5], "b": [4]}, point_num=32, n_copies=3)


def _config(grid, ckpt, **kw):
    base = dict(grid_path=grid, ckpt_path=ckpt, batch_size=4, epoch=2, save_every=1, point_num=32, device="cpu",
                learning_rate=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_run_folder_checkpoints_log_and_configuration(small_grid, tmp_path):
    run = train(_config(small_grid, tmp_path / "ck", save_every=2), progress=False)
    assert run.parent == tmp_path / "ck" and re.fullmatch(r"\d{4}(-\d\d){5}-knn32", run.name)
    assert sorted(p.name for p in run.glob("*.pth")) == ["ckpt_000000.pth", "ckpt_000002.pth", "ckpt_000003.pth"]
    log = read_log(run)
    assert [e for e, _ in log] == [0, 1, 2] and all(v > 0 for _, v in log)
    for name, iteration, done in (("ckpt_000000.pth", 0, 1), ("ckpt_000002.pth", 2, 3), ("ckpt_000003.pth", 3, 3)):
        ckpt = torch.load(run / name, weights_only=True)
        assert ckpt["current_iteration"] == iteration and ckpt["epochs_done"] == done
        assert set(ckpt) == {"sdf_model", "current_iteration", "optimizer", "epochs_done"}
        assert load_sdf_checkpoint(run / name)[1] == iteration
    final, mid = (torch.load(run / n, weights_only=True)["sdf_model"] for n in ("ckpt_000003.pth", "ckpt_000002.pth"))
    assert all(torch.equal(final[k], mid[k]) for k in final)      # final = weights after the last epoch
    text = (run / "Congiguration.txt").read_text()
    assert "                 learning_rate: 0.001\n" in text and "                    batch_size: 4\n" in text
    config = pickle.loads((run / "Congiguration.pickle").read_bytes())
    assert config["point_num"] == 32 and config["n_patches"] == 9 and config["epoch"] == 2


def test_resume_continues_iterations_and_optimiser_exactly(small_grid, tmp_path):
    full = train(_config(small_grid, tmp_path / "full", save_every=2), progress=False)
    resumed = train(_config(small_grid, tmp_path / "resumed", save_every=2, resume=full / "ckpt_000000.pth"),
                    progress=False)
    assert sorted(p.name for p in resumed.glob("*.pth")) == ["ckpt_000002.pth", "ckpt_000003.pth"]
    assert read_log(resumed) == read_log(full)[1:]
    a, b = (torch.load(r / "ckpt_000003.pth", weights_only=True) for r in (full, resumed))
    assert a["current_iteration"] == b["current_iteration"] == 3
    assert all(torch.equal(a["sdf_model"][k], b["sdf_model"][k]) for k in a["sdf_model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    first = torch.load(full / "ckpt_000000.pth", weights_only=True)
    assert not all(torch.equal(a["sdf_model"][k], first["sdf_model"][k]) for k in a["sdf_model"])

    # an authors'-format file (no optimiser state, no epochs_done) resumes at current_iteration + 1
    model, _ = load_sdf_checkpoint(full / "ckpt_000002.pth")
    authors = tmp_path / "authors.pth"
    torch.save({"sdf_model": model.state_dict(), "current_iteration": 1}, authors)
    run = train(_config(small_grid, tmp_path / "from_authors", resume=authors), progress=False)
    assert [e for e, _ in read_log(run)] == [2]
    with pytest.raises(DataError, match="already holds 3 epochs"):
        train(_config(small_grid, tmp_path / "done", resume=full / "ckpt_000003.pth"), progress=False)


def test_training_halves_the_loss_and_learns_the_surface(tmp_path):
    """320 Adam steps (batch 8 of 48-point wavy-plane patches, lr 1e-3: sized for a CPU test suite)."""
    grid = write_pretrain(tmp_path / "grid", {"plane": [32, 32]}, point_num=48, n_copies=4, kinds=("plane",))
    run = train(_config(grid, tmp_path / "ck", batch_size=8, epoch=39, save_every=100, point_num=48), progress=False)
    log = read_log(run)
    assert len(log) == 40                                        # 64 patches / batch 8 = 8 steps per epoch
    (queries, targets), = PretrainSet(grid, point_num=48, progress=False).parts
    standstill = np.linalg.norm(queries - targets, axis=-1).mean()           # the loss of sdf = 0
    first, last = log[0][1], log[-1][1]

    model, iteration = load_sdf_checkpoint(run / "ckpt_000040.pth")
    assert iteration == 40 and not model.training
    rng = np.random.default_rng(123)
    held = [surface_patch(rng, 48, "plane") for _ in range(8)]  # held-out patches (not in the data set)
    points = torch.from_numpy(np.stack([p for p, _ in held]))
    normals = torch.from_numpy(np.stack([n for _, n in held]))
    with torch.no_grad():
        latent = model.encoder(points)
        on = model.NIF(latent, points).abs().mean().item()
        off = 0.5 * sum(model.NIF(latent, points + d * normals).abs().mean().item() for d in (0.1, -0.1))
    # patches span 1 after normalisation: +-0.1 along the normal is 10 % of the patch size
    print(f"loss {first:.4f} -> {last:.4f} (standstill {standstill:.4f}); mean |sdf| on the surface {on:.4f}, "
          f"at +-10 % along the normal {off:.4f}: ratio {off / on:.2f}")
    assert last < 0.5 * first                                    # the loss halves ...
    assert last < 0.7 * standstill                               # ... and beats leaving the queries in place
    assert off > 2.5 * on, (on, off)                             # |sdf| is much smaller on the surface


def test_mixed_precision_only_behind_the_flag(small_grid, tmp_path):
    runs = {amp: train(_config(small_grid, tmp_path / str(amp), epoch=0, amp=amp), progress=False)
            for amp in (False, True)}
    (_, full), (_, mixed) = read_log(runs[False])[0], read_log(runs[True])[0]
    assert full != mixed and abs(mixed - full) < 0.1 * full        # bfloat16 changes the numbers, a little
    again = train(_config(small_grid, tmp_path / "again", epoch=0), progress=False)
    assert read_log(again)[0][1] == full                          # float32 runs repeat exactly
