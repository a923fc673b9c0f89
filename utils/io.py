"""File I/O shared by every stage: readers with clear errors, atomic writers.

Every reader raises :class:`DataError` naming the file and what is wrong with it.
Every writer is atomic: it writes a temporary file next to the destination and
renames it over the destination only once the file is complete, so an
interrupted run never leaves a half-written file that looks finished.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile
import yaml
from PIL import Image, UnidentifiedImageError

from utils.errors import DataError


# ----------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.part(\.[^.]+)?")   # what atomic_path's mkstemp names look like


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` on success.

    The temporary name keeps the destination's suffix (writers such as tifffile or
    Pillow pick the format from it). On any exception the temporary file is removed
    and the destination is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp creates 0600: give the file the usual umask-derived mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries (``.<stem>.<8 random>.part<suffix>``) that a killed :func:`atomic_path`
    left in ``folder``; return how many. Only for folders no other process is writing to."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """Raise :class:`DataError` unless ``path`` is, or can be created as, a folder this process may write to.

    Creates nothing: checks ``path`` if it exists, else its nearest existing ancestor.
    ``option`` names the flag in the message (e.g. ``--output_dir``).
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise DataError(f"{path}: {option} {what}, not a folder; pass a folder path to {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its parent {existing} is not writable)"
        raise DataError(f"{path}: {option} is not writable by this user{where}; pass a folder you can write "
                        f"to, or fix its permissions")


def write_xyz(path: str | os.PathLike, xyz: np.ndarray) -> None:
    """Atomically write an organised point cloud (H, W, 3) float32 as TIFF."""
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"{path}: expected an (H, W, 3) array, got shape {xyz.shape}")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, xyz, photometric="rgb")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Atomically write a uint8 image, (H, W) gray or (H, W, 3) RGB, or a uint16 (H, W) gray image
    (a 16-bit PNG), as PNG."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 and not (image.dtype == np.uint16 and image.ndim == 2):
        raise ValueError(f"{path}: expected a uint8 image or a uint16 (H, W) image, got {image.dtype} {image.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def save_npz(path: str | os.PathLike, compressed: bool = True, **arrays: np.ndarray) -> None:
    """Atomically write arrays to an ``.npz`` archive (``np.savez[_compressed]`` format)."""
    saver = np.savez_compressed if compressed else np.savez
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object stops numpy from appending ".npz"
            saver(fh, **arrays)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


CONFIG_NAME = "Congiguration"  # (sic) the authors' file name for a run's settings (SPEC 9.1)


def configuration_text(config: dict) -> str:
    """``Congiguration.txt``: one ``%30s: %s`` line per setting, sorted by name (SPEC 9.1)."""
    return "".join("%30s: %s\n" % (key, config[key]) for key in sorted(config))


def save_configuration(folder: str | os.PathLike, config: dict, pickle_protocol: int | None = None) -> None:
    """Atomically write the authors' ``Congiguration.txt`` and ``Congiguration.pickle`` (the dict)."""
    write_text(Path(folder) / f"{CONFIG_NAME}.txt", configuration_text(config))
    with atomic_path(Path(folder) / f"{CONFIG_NAME}.pickle") as tmp:
        tmp.write_bytes(pickle.dumps(config, protocol=pickle_protocol))


def write_tiff_map(path: str | os.PathLike, m: np.ndarray) -> None:
    """Atomically write a float32 2-D map as TIFF."""
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(m, dtype=np.float32))


def make_run_dir(parent: str | os.PathLike, suffix: str) -> Path:
    """A new, empty ``<parent>/<YYYY-mm-dd-HH-MM-SS><suffix>`` folder.

    Two runs started in the same second get ``...<suffix>-2``, ``-3``, ...: the folder is
    created atomically (``mkdir``), so concurrent runs never share one.
    """
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    Path(parent).mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = Path(parent, f"{stamp}{suffix}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomically copy ``src`` to ``dst`` (contents and permission bits)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    shutil.copymode(src, dst)


# ----------------------------------------------------------------------------- readers
def torch_file_format(path: str | os.PathLike) -> str | None:
    """``"zip"`` (torch.save's format), ``"pickle"`` (the legacy format) or None (neither: e.g. a text file)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:   # pickle protocol 2-5
        return "pickle"
    return None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def read_xyz(path: str | os.PathLike) -> np.ndarray:
    """Read an organised point cloud TIFF as float32 (H, W, 3).

    Raises :class:`DataError` for a missing, unreadable or corrupt file, or one whose
    array is not (H, W, 3) floating point.
    """
    path = Path(path)
    _require_file(path)
    try:
        arr = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt data
        raise DataError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise DataError(f"{path}: expected an organised point cloud of shape (H, W, 3), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path}: expected floating-point xyz coordinates, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_tiff_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of the first page of a TIFF, read from its header only."""
    path = Path(path)
    _require_file(path)
    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(int(n) for n in tif.pages[0].shape)
    except Exception as exc:  # tifffile raises many types for corrupt data
        raise DataError(f"{path}: cannot read TIFF header ({type(exc).__name__}: {exc})") from exc


def read_image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image, read from its header only."""
    path = Path(path)
    _require_file(path)
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _read_image(path: Path, mode: str) -> np.ndarray:
    _require_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            if mode == "L" and img.mode not in ("L", "1", "P", "I", "I;16", "RGB", "RGBA", "LA"):
                raise DataError(f"{path}: unsupported image mode {img.mode!r} for a mask")
            arr = np.asarray(img.convert(mode))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return np.ascontiguousarray(arr)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3). Raises :class:`DataError` if unreadable."""
    return _read_image(Path(path), "RGB")


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Read an image (e.g. a ground-truth mask) as uint8 grayscale (H, W)."""
    return _read_image(Path(path), "L")


def read_png16(path: str | os.PathLike) -> np.ndarray:
    """Read a 16-bit grayscale PNG as uint16 (H, W); :class:`DataError` for anything else."""
    path = Path(path)
    _require_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if mode not in ("I;16", "I;16B", "I") or arr.ndim != 2:
        raise DataError(f"{path}: expected a 16-bit grayscale PNG, got mode {mode!r} with shape {arr.shape}")
    if arr.dtype != np.uint16:
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(f"{path}: values outside 0 ... 65535")
        arr = arr.astype(np.uint16)
    return np.ascontiguousarray(arr)


def read_yaml(path: str | os.PathLike) -> object:
    """Parse a YAML file (safe loader); :class:`DataError` naming the file for unreadable YAML."""
    path = Path(path)
    _require_file(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid YAML ({type(exc).__name__}: {exc})") from exc


def write_yaml(path: str | os.PathLike, data: object) -> None:
    """Atomically write ``data`` as YAML (block style)."""
    write_text(path, yaml.safe_dump(data, default_flow_style=False, sort_keys=False))


def disjoint_roots(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Raise :class:`DataError` when the output folder ``target`` is ``source``, lies inside it or contains it."""
    a, b = Path(source).resolve(), Path(target).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DataError(f"{target}: the output folder must be neither {source} nor inside it nor contain it")


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load an ``.npz`` archive fully into memory, checking that ``keys`` are present."""
    path = Path(path)
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read npz archive ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in keys if k not in out]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; found {sorted(out)}")
    return out
