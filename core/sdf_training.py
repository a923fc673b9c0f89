"""Pretraining of the 3D expert (SPEC 4.2-4.3): data, PCP loss, Adam loop, checkpoints.

Data (SPEC 4.3, FIX #17): every patch of ``<grid>/PRETRAIN_DATA/*/*.npz`` (files sorted)
is one item holding ``C`` noise copies (``C = 20`` for the SPEC 3.5 recipe) of ``point_num``
queries and their nearest-surface targets, held as float32 ``(G, C, point_num, 3)`` arrays:

* up to ``in_memory_limit`` bytes (default 4 GiB for queries and targets together): read
  into RAM;
* beyond that, when the files store both arrays uncompressed as float32 (what
  ``cut_patches.py --pretrain`` writes): memory-mapped in place, one map per file, no copy;
* otherwise (compressed or float64 files, e.g. the reference's): converted once into
  ``<grid>/PRETRAIN_DATA/.cache/{queries,targets}.npy`` (float32, written atomically;
  ``manifest.json``, written last, names the source files with their sizes and modification
  times) and memory-mapped; a later run reuses the cache while the manifest matches.

Randomness (SPEC 4.3, KEEP #15; FIX #9: seeded): epoch ``e`` draws its shuffle and its
one noise copy per patch from ``numpy.random.default_rng([seed, e])``, and the model's
initialisation from ``torch.manual_seed(seed)``. Nothing else is random, so a run resumed
from a checkpoint written after epoch ``e`` continues exactly as the uninterrupted run on
CPU (on CUDA, cuDNN may choose non-deterministic convolution kernels: close, not bit-equal).
Only full batches are used (incomplete last batch dropped).

Epochs (KEEP the authors' meaning): ``epoch=E`` runs the epochs ``0 ... E`` (``E + 1``
passes, so ``E = 1000`` is the authors' schedule). After epoch ``e`` with
``e % save_every == 0`` the weights are saved as ``ckpt_{e:06d}.pth`` with
``current_iteration = e``, and after the last epoch once more as ``ckpt_{E+1:06d}.pth`` with
``current_iteration = E + 1``. Our checkpoints add ``optimizer`` (Adam state) and
``epochs_done`` (epochs whose updates the weights contain) for ``resume``; files without
them (the authors') resume at epoch ``current_iteration + 1`` with fresh Adam moments.

Several processes (SPEC 4.3.1, ``torchrun --nproc_per_node N train_3Dmodel.py ...``): data
parallel with DistributedDataParallel; ``--batch_size`` stays the global batch, split evenly
over the ranks (:func:`rank_batches`), and the encoder's BatchNorm layers use the statistics
of the global batch, so N ranks compute the steps of one process up to float rounding. Rank 0
alone writes the run folder, ``train_states.txt`` (the loss averaged over the ranks) and the
checkpoints (same format); ``resume`` loads the same checkpoint on every rank.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core.patch_files import POINT_NUM, PRETRAIN_DIR, PRETRAIN_KEYS
from core.sdf_model import SDFModel, model_from_checkpoint, read_checkpoint, save_sdf_checkpoint
from utils import distributed
from utils.errors import ConfigError, DataError
from utils.global_batchnorm import synchronise_batchnorm
from utils.io import atomic_path, check_output_dir, load_npz, make_run_dir, save_configuration, write_text
from utils.launch import launch
CACHE_DIR = ".cache"
IN_MEMORY_LIMIT = 4 * 2**30
NORMAL_EPS = 1e-12          # pytorch_safe_norm's epsilon (SPEC 4.2 step 4)
LOG_NAME = "train_states.txt"


# ----------------------------------------------------------------------------- data
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class _Member:
    """One array of an ``.npz`` archive, described from its headers only."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    stored: bool               # uncompressed in the zip
    offset: int                # where its data start in the file (meaningful when ``stored``)


def _npz_members(path: Path) -> dict[str, _Member]:
    """Shapes, dtypes and data offsets of the arrays of an ``.npz`` archive, without reading the data."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version not in _HEADER_READERS:
                        raise ValueError(f"unsupported .npy format version {version} of {info.filename}")
                    shape, fortran, dtype = _HEADER_READERS[version](fh)
                    header = fh.tell()
                raw.seek(info.header_offset + 26)                 # local header: name and extra lengths
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
                offset = info.header_offset + 30 + name_len + extra_len + header
                out[info.filename.removesuffix(".npy")] = _Member(tuple(shape), np.dtype(dtype), bool(fortran),
                                                                  info.compress_type == zipfile.ZIP_STORED, offset)
    except (OSError, ValueError, struct.error, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read npz archive ({type(exc).__name__}: {exc})") from exc
    return out


def pretrain_files(grid_path: str | os.PathLike) -> list[Path]:
    """The pretraining files ``<grid>/PRETRAIN_DATA/<cls>/*.npz``, sorted (SPEC 4.3).

    Raises :class:`DataError` naming the folder when it is missing or holds no file.
    """
    folder = Path(grid_path) / PRETRAIN_DIR
    hint = (f"create it with `python cut_patches.py --datasets_path <preprocessed data set> "
            f"--save_grid_path {Path(grid_path)} --pretrain`")
    if not folder.is_dir():
        raise DataError(f"{folder}: pretraining data folder not found; {hint}")
    files = sorted(p for p in folder.glob("*/*.npz") if p.is_file())
    if not files:
        raise DataError(f"{folder}: no pretraining files (<class>/NNN.npz) found; {hint}")
    return files


class PretrainSet:
    """All pretraining patches as float32 ``parts``: (queries, targets) pairs of shape (G, C, point_num, 3).

    ``queries[i, c]`` are the ``point_num`` noisy queries of noise copy ``c`` of patch ``i``
    (rows ``c*point_num ...`` of the file's ``samples_all``), ``targets[i, c]`` their
    nearest-surface points (``points_all``). One part in RAM or in the cache, or one part per
    file when the files are memory-mapped in place (see the module docstring); ``storage``
    says which.
    """

    def __init__(self, grid_path: str | os.PathLike, point_num: int = 500,
                 in_memory_limit: int = IN_MEMORY_LIMIT, progress: bool = True):
        self.files = pretrain_files(grid_path)
        self.point_num = point_num
        members = [self._check(path, point_num) for path in self.files]
        counts = [m["samples_all"].shape[0] for m in members]
        copies = {m["samples_all"].shape[1] // point_num for m in members}
        if len(copies) > 1:
            raise DataError(f"{self.files[0].parent.parent}: files differ in noise copies per patch: {sorted(copies)}")
        self.n_copies = copies.pop()
        self.file_starts = np.cumsum([0] + counts[:-1])
        self.size = int(sum(counts))
        if self.size == 0:
            raise DataError(f"{self.files[0].parent.parent}: the pretraining files hold no patches")
        shape = (self.size, self.n_copies, point_num, 3)
        nbytes = 2 * int(np.prod(shape)) * 4
        if nbytes <= in_memory_limit:
            self.storage = "in memory"
            self.parts = [(np.empty(shape, np.float32), np.empty(shape, np.float32))]
            self._fill(*self.parts[0], progress)
        elif all(self._mappable(m) for m in members):
            self.storage = "memory-mapped files"
            self.parts = [tuple(self._map(path, m[key]) for key in ("samples_all", "points_all"))
                          for path, m in zip(self.files, members)]
        else:
            cache = Path(grid_path) / PRETRAIN_DIR / CACHE_DIR
            self.storage = f"memory-mapped cache {cache}"
            self.parts = [self._cache(cache, shape, nbytes, progress)]
        self.starts = self.file_starts if len(self.parts) > 1 else np.zeros(1, np.int64)   # first patch per part

    @staticmethod
    def _check(path: Path, point_num: int) -> dict[str, _Member]:
        """Validate one file from its headers (keys, shapes, dtypes, patch size)."""
        members = _npz_members(path)
        missing = [k for k in PRETRAIN_KEYS if k not in members]
        if missing:
            raise DataError(f"{path}: missing key(s) {missing}; found {sorted(members)}")
        origins, samples, points = (members[k].shape for k in ("origins_all", "samples_all", "points_all"))
        if len(origins) != 3 or origins[2] != 3:
            raise DataError(f"{path}: origins_all should be (G, K, 3), got {origins}")
        if origins[1] != point_num:
            raise DataError(f"{path}: the grid's patches hold {origins[1]} points but --point_num is "
                            f"{point_num}; pass --point_num {origins[1]} or recut the pretraining data")
        if (len(samples) != 3 or samples != points or samples[0] != origins[0] or samples[2] != 3
                or samples[1] == 0 or samples[1] % point_num):
            raise DataError(f"{path}: samples_all {samples} and points_all {points} should both be "
                            f"(G, C*{point_num}, 3) with G = {origins[0]} patches")
        dtypes = [members[k].dtype for k in ("samples_all", "points_all")]
        if not all(np.issubdtype(d, np.floating) for d in dtypes):
            raise DataError(f"{path}: samples_all/points_all must be floating point, got {dtypes}")
        return members

    @staticmethod
    def _mappable(members: dict[str, _Member]) -> bool:
        return all(m.stored and not m.fortran and m.dtype == np.float32
                   for m in (members["samples_all"], members["points_all"]))

    def _map(self, path: Path, member: _Member) -> np.ndarray:
        g = member.shape[0]
        if g == 0:
            return np.empty((0, self.n_copies, self.point_num, 3), np.float32)
        return np.memmap(path, np.float32, mode="r", offset=member.offset,
                         shape=(g, self.n_copies, self.point_num, 3))

    def _fill(self, queries: np.ndarray, targets: np.ndarray, progress: bool) -> None:
        for path, start in zip(tqdm(self.files, desc="Loading pretraining data", disable=not progress),
                               self.file_starts):
            data = load_npz(path, PRETRAIN_KEYS[:2])
            count = data["samples_all"].shape[0]
            queries[start:start + count] = data["samples_all"].reshape(queries[start:start + count].shape)
            targets[start:start + count] = data["points_all"].reshape(targets[start:start + count].shape)

    def _cache(self, cache: Path, shape: tuple[int, ...], nbytes: int, progress: bool
               ) -> tuple[np.ndarray, np.ndarray]:
        """The one-time float32 conversion into ``cache`` (reused while its manifest matches)."""
        manifest_path = cache / "manifest.json"
        paths = (cache / "queries.npy", cache / "targets.npy")
        manifest = dict(shape=list(shape), dtype="float32",
                        files=[[p.relative_to(cache.parent).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                               for p in self.files])
        try:
            current = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        except (OSError, ValueError):
            current = None
        if current != manifest or not all(p.is_file() for p in paths):
            try:
                cache.mkdir(parents=True, exist_ok=True)
                manifest_path.unlink(missing_ok=True)
                free = shutil.disk_usage(cache).free
                if free < nbytes:
                    raise DataError(f"{cache}: {nbytes / 2**30:.1f} GiB needed for the float32 cache of the "
                                    f"pretraining data, {free / 2**30:.1f} GiB free")
                with ExitStack() as stack:
                    tmps = [stack.enter_context(atomic_path(p)) for p in paths]
                    arrays = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=shape) for t in tmps]
                    self._fill(*arrays, progress)
                    for a in arrays:
                        a.flush()
                    del arrays
                write_text(manifest_path, json.dumps(manifest) + "\n")
            except OSError as exc:
                raise DataError(f"{cache}: cannot write the memory-mapped cache of the pretraining data "
                                f"({type(exc).__name__}: {exc})") from exc
        queries, targets = (np.load(p, mmap_mode="r") for p in paths)
        if queries.shape != shape or targets.shape != shape:
            raise DataError(f"{cache}: cache arrays {queries.shape}/{targets.shape} do not match {shape}; "
                            f"delete the folder")
        return queries, targets

    def __len__(self) -> int:
        return self.size

    def batch(self, index: np.ndarray, copy: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets and queries (B, point_num, 3) float32 of patches ``index``, noise copies ``copy``."""
        targets = np.empty((len(index), self.point_num, 3), np.float32)
        queries = np.empty_like(targets)
        part = np.searchsorted(self.starts, index, side="right") - 1
        for p in np.unique(part):                    # one gather per part (file) present in the batch
            sel = part == p
            local = index[sel] - self.starts[p]
            queries[sel] = self.parts[p][0][local, copy[sel]]
            targets[sel] = self.parts[p][1][local, copy[sel]]
        return torch.from_numpy(targets), torch.from_numpy(queries)


def epoch_batches(n_items: int, n_copies: int, batch_size: int, seed: int, epoch: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Patch indices and noise copies (n_batches, batch_size) of one epoch (SPEC 4.3).

    Shuffled order, one random copy per patch, only full batches; drawn from
    ``default_rng([seed, epoch])`` so every epoch is reproducible on its own.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_items)
    copies = rng.integers(0, n_copies, size=n_items)
    n_batches = n_items // batch_size
    used = n_batches * batch_size
    return order[:used].reshape(n_batches, batch_size), copies[order[:used]].reshape(n_batches, batch_size)


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """The per-rank share of the global ``--batch_size``; :class:`ConfigError` when it does not split evenly."""
    if batch_size % world_size:
        raise ConfigError(f"--batch_size {batch_size} is the global batch and must split evenly over the "
                          f"{world_size} ranks of this torchrun run; pass a multiple of {world_size} "
                          f"(e.g. {max(world_size, batch_size // world_size * world_size)})")
    return batch_size // world_size


def rank_batches(index: np.ndarray, copy: np.ndarray, rank: int, world_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s share of every global batch of :func:`epoch_batches` (SPEC 4.3.1).

    The distributed sampler: each global batch of ``b`` patches is split into ``world_size``
    equal contiguous parts, columns ``rank * b / N ... (rank + 1) * b / N - 1``. The shuffle
    and the noise copies are the global draws, so they do not depend on the world size.
    """
    share = rank_batch_size(index.shape[1], world_size)
    cols = slice(rank * share, (rank + 1) * share)
    return index[:, cols], copy[:, cols]


# ----------------------------------------------------------------------------- loss
def pcp_loss(model: SDFModel, targets: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The Neural-Pull / PCP loss of SPEC 4.2 on targets and queries (B, P, 3).

    The encoder sees the targets (KEEP #14); queries are pulled along the normalised SDF
    gradient, ``q - sdf * grad / sqrt(|grad|^2 + 1e-12)``, and the loss is the mean
    Euclidean distance of the pulled queries to their targets. The gradient comes from
    :meth:`LocalNIF.forward_with_gradient` (exact, differentiable in the parameters).
    """
    nif = model.NIF
    sdf, grad = nif.forward_with_gradient(nif.latent_code(model.encoder(targets)), queries)
    normal = grad / torch.sqrt(grad.square().sum(dim=-1, keepdim=True) + NORMAL_EPS)
    pulled = queries - sdf * normal
    return torch.linalg.vector_norm(targets - pulled, dim=-1).mean()


class PCPLoss(nn.Module):
    """:func:`pcp_loss` of ``model`` as a module: what DistributedDataParallel wraps (it averages
    the gradients of what runs through its ``forward``)."""

    def __init__(self, model: SDFModel):
        super().__init__()
        self.model = model

    def forward(self, targets: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return pcp_loss(self.model, targets, queries)


def parallel_loss(model: SDFModel, device: torch.device) -> nn.Module:
    """:class:`PCPLoss` of ``model``; in a distributed run data-parallel (SPEC 4.3.1).

    Under torchrun the encoder's BatchNorm layers are switched in place (same parameters and
    buffers) to statistics of the global batch (``SyncBatchNorm`` on CUDA, the gloo
    :class:`utils.global_batchnorm.GlobalBatchNorm` on CPU) and the loss is wrapped in
    DistributedDataParallel, which averages the ranks' gradients. One process: the plain loss.
    """
    if not launch().distributed:
        return PCPLoss(model)
    synchronise_batchnorm(model, device)
    return DistributedDataParallel(PCPLoss(model), device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Options of ``train_3Dmodel.py`` (SPEC 4.3)."""

    grid_path: Path
    ckpt_path: Path = Path("checkpoint")
    batch_size: int = 32
    epoch: int = 1000
    learning_rate: float = 1e-4
    save_every: int = 100
    resume: Optional[Path] = None
    seed: int = 0
    device: str = "auto"
    point_num: int = POINT_NUM
    amp: bool = False
    compile: bool = False


def _restore(cfg: TrainConfig, model: SDFModel, optimizer: torch.optim.Optimizer, verbose: bool = True) -> int:
    """Load ``cfg.resume`` into model and optimiser; return the first epoch still to run."""
    ckpt = read_checkpoint(cfg.resume, "cpu")
    model.load_state_dict(model_from_checkpoint(ckpt, cfg.resume).state_dict())
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate
    else:
        if verbose:
            tqdm.write(f"{cfg.resume}: no optimiser state (authors' format); Adam restarts from zero moments")
    if "epochs_done" in ckpt:
        return int(ckpt["epochs_done"])
    return int(ckpt.get("current_iteration", -1)) + 1


def train(cfg: TrainConfig, progress: bool = True, data: Optional[PretrainSet] = None) -> Path:
    """Pretrain the SDF model (SPEC 4.2-4.3); returns the run folder holding the checkpoints.

    ``data`` may be passed to reuse an already loaded :class:`PretrainSet`. Under torchrun
    (more than one rank) the run is data-parallel: see :func:`_train_ranks`.
    """
    for name in ("batch_size", "save_every"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.epoch < 0 or not cfg.learning_rate > 0:
        raise DataError(f"--epoch must be >= 0 and --learning_rate > 0, got {cfg.epoch} and {cfg.learning_rate}")
    check_output_dir(cfg.ckpt_path, "--ckpt_path")
    info = launch()
    rank_batch_size(cfg.batch_size, info.world_size)
    device = distributed.rank_device(cfg.device)
    with distributed.session(device):
        return _train_ranks(cfg, device, progress and info.rank == 0, data)


def _train_ranks(cfg: TrainConfig, device: torch.device, progress: bool, data: Optional[PretrainSet]) -> Path:
    """The training loop on this rank (SPEC 4.3).

    One process: the whole batch. N ranks (torchrun): every rank draws the same epoch
    batches and trains on its share (:func:`rank_batches`); DistributedDataParallel
    averages the gradients of the per-rank mean losses, which with equal shares is the
    gradient of the global batch's mean loss; the encoder's BatchNorm layers use the
    statistics of the global batch (:func:`utils.global_batchnorm.synchronise_batchnorm`).
    Rank 0 alone creates the run folder and writes the configuration, ``train_states.txt``
    (the loss averaged over the ranks) and the checkpoints (the plain model's state_dict:
    the authors' keys).
    """
    info = launch()
    if data is None:
        limit = IN_MEMORY_LIMIT // (info.local_world_size if info.distributed else 1)  # one copy per rank
        with distributed.local_rank_first():           # one rank per node builds a cache, the others reuse it
            data = PretrainSet(cfg.grid_path, cfg.point_num, in_memory_limit=limit, progress=progress)
    elif data.point_num != cfg.point_num:
        raise DataError(f"pretraining data hold {data.point_num}-point patches, --point_num is {cfg.point_num}")
    if len(data) < cfg.batch_size:
        raise DataError(f"{Path(cfg.grid_path) / PRETRAIN_DIR}: {len(data)} patches, fewer than one batch of "
                        f"{cfg.batch_size}")

    torch.manual_seed(cfg.seed)
    model = SDFModel().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    start = _restore(cfg, model, optimizer, info.rank == 0) if cfg.resume is not None else 0
    if start > cfg.epoch:
        raise DataError(f"{cfg.resume}: already holds {start} epochs; --epoch {cfg.epoch} ends at epoch "
                        f"{cfg.epoch}, nothing to train")

    main_rank = info.rank == 0
    run_dir = distributed.broadcast(_start_run_folder(cfg, device, data, start) if main_rank else None)
    loss_module = parallel_loss(model, device)
    loss_fn: Callable = torch.compile(loss_module) if cfg.compile else loss_module
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.amp))

    def checkpoint(iteration: int, epochs_done: int) -> None:
        if main_rank:
            save_sdf_checkpoint(run_dir / f"ckpt_{iteration:06d}.pth", model, iteration,
                                optimizer=optimizer.state_dict(), epochs_done=epochs_done)

    with (open(run_dir / LOG_NAME, "a", buffering=1) if main_rank else nullcontext()) as log:
        for epoch in tqdm(range(start, cfg.epoch + 1), desc="Pre-training", disable=not progress):
            index, copy = rank_batches(*epoch_batches(len(data), data.n_copies, cfg.batch_size, cfg.seed, epoch),
                                       info.rank, info.world_size)
            losses = []
            for b in tqdm(range(len(index)), desc=f"Epoch {epoch}", leave=False, disable=not progress):
                targets, queries = (t.to(device, non_blocking=True) for t in data.batch(index[b], copy[b]))
                with amp:
                    loss = loss_fn(targets, queries)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            mean = distributed.mean_over_ranks(torch.stack(losses).double().mean()).item()
            if not np.isfinite(mean):
                raise FloatingPointError(f"{run_dir}: the loss of epoch {epoch} is {mean}; training stopped "
                                         f"(the checkpoints there hold the last good weights)")
            if main_rank:
                log.write("epoch:%04d\tloss:%.9f\n" % (epoch, mean))
            if progress:
                tqdm.write(f"epoch {epoch:4d}  loss {mean:.6f}")
            if epoch % cfg.save_every == 0:
                checkpoint(epoch, epoch + 1)
    checkpoint(cfg.epoch + 1, cfg.epoch + 1)
    return run_dir


def _start_run_folder(cfg: TrainConfig, device: torch.device, data: PretrainSet, start: int) -> Path:
    """A new run folder holding ``Congiguration.txt``/``.pickle`` (rank 0 only)."""
    run_dir = make_run_dir(cfg.ckpt_path, f"-knn{cfg.point_num}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update(ckpt_dir=str(run_dir), device=str(device), n_patches=len(data), n_copies=data.n_copies,
                    first_epoch=start, data_storage=data.storage)
    info = launch()
    if info.distributed:
        settings.update(world_size=info.world_size, rank_batch_size=cfg.batch_size // info.world_size,
                        batchnorm="SyncBatchNorm" if device.type == "cuda" else "GlobalBatchNorm (gloo)")
    save_configuration(run_dir, settings)
    return run_dir
