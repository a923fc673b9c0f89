"""Training-stage benchmark: seconds per pretraining iteration, ours vs the authors' way.

Ours (``core.sdf_training``): float32 data held once, a batch gathered by two index arrays,
the latent's half of fc3 computed once per patch, the SDF gradient written out
(``LocalNIF.forward_with_gradient``) and one backward pass.
The authors' way (:mod:`tools.authors_way.training`): per-patch float64 arrays in Python
lists, a ``DataLoader`` drawing a random copy per item with Python ``random`` (run in the main
process here; the reference's one worker process only overlaps this with compute), a float64 ->
float32 conversion and device copy per batch, the latent tiled to every point and pushed
through fc1 and the full fc3 per point, ``autograd.grad(create_graph=True)`` and backward.
Both start from the same weights; on one shared batch their losses and parameter
gradients are compared. Uses ``ctx.pretrain_grids`` (``cut_patches.py --pretrain`` output)
when set, otherwise writes a small synthetic PRETRAIN_DATA set into ``ctx.work``.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from core.patch_files import POINT_NUM, PRETRAIN_DIR
from core.sdf_model import SDFModel, save_sdf_checkpoint
from core.sdf_training import PretrainSet, epoch_batches, pcp_loss, pretrain_files
from tools.authors_way.training import AuthorsPretrainData, authors_loss
from tools.bench import BenchContext, row
from utils.device import Timer
from utils.io import save_npz


def synthetic_pretrain(grid: Path, n_files: int, patches: int, seed: int) -> Path:
    """PRETRAIN_DATA of sphere-cap patches by the SPEC 3.5 recipe (51st-neighbour sigma, 13 + 7 copies)."""
    rng = np.random.default_rng(seed)
    scales = np.r_[np.full(13, 0.5), np.ones(7)]
    for f in range(n_files):
        samples, points, origins = [], [], []
        for _ in range(patches):
            d = rng.normal(size=(POINT_NUM, 3)) * [0.3, 0.3, 1.0] + [0.0, 0.0, 3.0]
            patch = rng.uniform(0.8, 1.5) * d / np.linalg.norm(d, axis=1, keepdims=True)
            patch = patch / np.ptp(patch, axis=0).max()
            patch -= patch.mean(0)
            tree = cKDTree(patch)
            sigma = tree.query(patch, k=51)[0][:, -1:]
            queries = np.concatenate([patch + s * sigma * rng.normal(size=patch.shape) for s in scales])
            samples.append(queries)
            points.append(patch[tree.query(queries)[1]])
            origins.append(patch)
        save_npz(grid / PRETRAIN_DIR / "synthetic" / f"{f:03d}.npz", samples_all=np.asarray(samples),
                 points_all=np.asarray(points, np.float32), origins_all=np.asarray(origins, np.float32))
    return grid


def _compare(model: SDFModel, targets: torch.Tensor, queries: torch.Tensor) -> str:
    """Loss and parameter gradients of both ways on one batch, from the same weights."""
    out = []
    for fn in (pcp_loss, authors_loss):
        m = copy.deepcopy(model)
        loss = fn(m, targets.clone(), queries.clone())
        loss.backward()
        out.append((loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    (ours, g_ours), (theirs, g_theirs) = out
    rel_loss = abs(ours - theirs) / abs(theirs)
    rel_grad = ((g_ours - g_theirs).norm() / g_theirs.norm()).item()
    return f"loss {ours:.7f} vs {theirs:.7f} (rel {rel_loss:.1e}); grads rel L2 {rel_grad:.1e}"


def _measure(data: PretrainSet, authors: AuthorsPretrainData, device: torch.device, batch: int, steps: int,
             seed: int) -> tuple[float, float, str, SDFModel]:
    torch.manual_seed(seed)
    initial = SDFModel().to(device).train()

    model = copy.deepcopy(initial)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    index, copies = epoch_batches(len(data), data.n_copies, batch, seed, 0)
    order = [(index[i % len(index)], copies[i % len(index)]) for i in range(steps + 1)]

    def ours_step(ic):
        targets, queries = (t.to(device, non_blocking=True) for t in data.batch(*ic))
        loss = pcp_loss(model, targets, queries)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    random.seed(seed)
    torch.manual_seed(seed)
    ref = copy.deepcopy(initial)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-4, betas=(0.9, 0.999))

    def full_batches():
        while True:                      # epochs of a shuffled loader; batches of another size skipped
            for points, samples in torch.utils.data.DataLoader(authors, batch_size=batch, shuffle=True):
                if points.shape[0] == batch:
                    yield points, samples

    loader = full_batches()

    def authors_step(_):
        points, samples = next(loader)
        points = points.reshape(batch, POINT_NUM, 3).to(torch.float32).to(device)
        samples = samples.reshape(batch, POINT_NUM, 3).to(torch.float32).to(device)
        loss = authors_loss(ref, points, samples)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    # one untimed warm-up step each, then alternate the two so that load changes hit both alike
    ours_step(order[0])
    authors_step(None)
    ours = theirs = 0.0
    for ic in order[1:]:
        with Timer(device) as t:
            ours_step(ic)
        ours += t.seconds
        with Timer(device) as t:
            authors_step(None)
        theirs += t.seconds
    ours, theirs = ours / steps, theirs / steps
    targets, queries = (t.to(device) for t in data.batch(*order[0]))
    return ours, theirs, _compare(initial, targets, queries), model


def _time_mode(data: PretrainSet, device: torch.device, batch: int, steps: int, seed: int, amp: bool,
               compiled: bool) -> tuple[float, float]:
    """Seconds per training iteration of ours in one mode (after warm-up steps, which include the
    compilation) and the loss of the first timed step."""
    torch.manual_seed(seed)
    model = SDFModel().to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.compile(pcp_loss) if compiled else pcp_loss
    index, copies = epoch_batches(len(data), data.n_copies, batch, seed, 0)
    order = [(index[i % len(index)], copies[i % len(index)]) for i in range(steps + 2)]
    losses, seconds = [], 0.0
    for i, ic in enumerate(order):
        with Timer(device) as t:
            targets, queries = (x.to(device, non_blocking=True) for x in data.batch(*ic))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model, targets, queries)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if i >= 2:                       # two warm-up steps: compilation, kernel choice, allocator
            seconds += t.seconds
            losses.append(loss.item())
    return seconds / steps, losses[0]


def training_modes(data: PretrainSet, device: torch.device, batch: int, steps: int, seed: int) -> list[dict]:
    """Rows for ``train_3Dmodel.py`` plain, ``--amp`` and ``--compile`` on ``device`` (same data and start)."""
    rows, plain = [], None
    for name, amp, compiled in (("plain", False, False), ("--amp", True, False), ("--compile", False, True)):
        seconds, loss = _time_mode(data, device, batch, steps, seed, amp, compiled)
        plain = loss if plain is None else plain
        rows.append(row("training", f"train iteration, batch {batch} ({device.type}, {name})", seconds,
                        unit="s/iteration", agree=f"loss {loss:.6f} (rel to plain {abs(loss - plain) / plain:.1e})",
                        note=f"mean of {steps} steps after 2 warm-up steps"))
    return rows


def benchmark(ctx: BenchContext) -> list[dict]:
    work = Path(ctx.work) / "training"
    grid = ctx.pretrain_grids
    if grid is None or not (Path(grid) / PRETRAIN_DIR).is_dir():
        grid = work / "synthetic_grid"
        if not (grid / PRETRAIN_DIR).is_dir():
            synthetic_pretrain(grid, n_files=2, patches=24 if ctx.quick else 48, seed=ctx.seed)
    files = pretrain_files(grid)
    with Timer() as t_ours:
        data = PretrainSet(grid, POINT_NUM, progress=False)
    with Timer() as t_authors:
        authors = AuthorsPretrainData(files)
    n = len(data)
    first_copies = data.batch(np.arange(n), np.zeros(n, np.int64))[1].numpy()
    same = np.array_equal(first_copies, np.float32([s[:POINT_NUM] for s in authors.samples]))
    rows = [row("training", f"load pretraining data ({n} patches)", t_ours.seconds, t_authors.seconds, unit="s",
                agree="same arrays" if same else "ARRAYS DIFFER", note=data.storage),
            row("training", "pretraining data held in RAM", sum(a.nbytes for a in data.parts[0]) / 2**20
                if data.storage == "in memory" else 0.0,
                sum(a.nbytes for a in authors.samples + authors.points) / 2**20, unit="MiB",
                note="float32 in RAM up to 4 GiB, else memory-mapped; reference: float64 lists")]
    devices = [torch.device("cpu")] + ([ctx.device] if ctx.device.type == "cuda" else [])
    model = None
    for device in devices:
        batch = 8 if ctx.quick else 32
        steps = 1 if ctx.quick else (3 if device.type == "cpu" else 20)
        if n < batch:
            raise ValueError(f"{grid}: {n} pretraining patches, fewer than one batch of {batch}")
        ours, theirs, agree, model = _measure(data, authors, device, batch, steps, ctx.seed)
        rows.append(row("training", f"train iteration, batch {batch} ({device.type})", ours, theirs,
                        unit="s/iteration", agree=agree, note=f"mean of {steps} steps after a warm-up step"))
        if device.type == "cuda":
            rows += training_modes(data, device, batch, steps, ctx.seed)
    if ctx.ckpt is None:
        ctx.ckpt = work / "ckpt_bench.pth"
        save_sdf_checkpoint(ctx.ckpt, model, 0)
    return rows
