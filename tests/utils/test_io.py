import os

import numpy as np
import pytest
import torch

from utils.errors import DataError
from utils.io import (atomic_path, check_output_dir, configuration_text, copy_file, disjoint_roots, load_npz,
                      read_gray, read_image_shape, read_png16, read_rgb, read_xyz, read_yaml, remove_stale_temporaries,
                      save_npz, torch_file_format, write_png, write_text, write_xyz, write_yaml)


def test_xyz_roundtrip(tmp_path):
    xyz = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    write_xyz(tmp_path / "a.tiff", xyz)
    np.testing.assert_array_equal(read_xyz(tmp_path / "a.tiff"), xyz)
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_png_roundtrip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.png"), rgb)
    gray = rgb[..., 0].copy()
    write_png(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(read_gray(tmp_path / "g.png"), gray)


def test_atomic_path_keeps_destination_on_failure(tmp_path):
    dst = tmp_path / "keep.txt"
    dst.write_text("original")
    with pytest.raises(RuntimeError):
        with atomic_path(dst) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert dst.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_write_text_and_copy(tmp_path):
    write_text(tmp_path / "a" / "b.txt", "hello")
    copy_file(tmp_path / "a" / "b.txt", tmp_path / "c" / "d.txt")
    assert (tmp_path / "c" / "d.txt").read_text() == "hello"


def test_npz_roundtrip_and_missing_key(tmp_path):
    save_npz(tmp_path / "x.npz", a=np.arange(3), b=np.ones((2, 2), np.float32))
    data = load_npz(tmp_path / "x.npz", ("a", "b"))
    np.testing.assert_array_equal(data["a"], np.arange(3))
    with pytest.raises(DataError, match=r"x\.npz: missing key\(s\) \['c'\]"):
        load_npz(tmp_path / "x.npz", ("a", "c"))


@pytest.mark.parametrize("reader,name", [(read_xyz, "a.tiff"), (read_rgb, "a.png"), (read_gray, "a.png"),
                                         (load_npz, "a.npz")])
def test_missing_file_names_path(tmp_path, reader, name):
    with pytest.raises(DataError, match=f"{name}: file not found"):
        reader(tmp_path / name)


@pytest.mark.parametrize("reader,name", [(read_xyz, "bad.tiff"), (read_rgb, "bad.png"), (load_npz, "bad.npz")])
def test_corrupt_file_names_path(tmp_path, reader, name):
    (tmp_path / name).write_bytes(b"this is not an image or archive" * 10)
    with pytest.raises(DataError, match=f"bad\\.(tiff|png|npz): cannot read"):
        reader(tmp_path / name)


def test_truncated_tiff(tmp_path):
    write_xyz(tmp_path / "t.tiff", np.ones((64, 64, 3), np.float32))
    data = (tmp_path / "t.tiff").read_bytes()
    (tmp_path / "t.tiff").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.tiff: cannot read TIFF"):
        read_xyz(tmp_path / "t.tiff")


def test_xyz_wrong_shape_and_dtype(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "s.tiff", np.ones((8, 8), np.float32))
    with pytest.raises(DataError, match=r"s\.tiff: expected an organised point cloud of shape \(H, W, 3\), got \(8, 8\)"):
        read_xyz(tmp_path / "s.tiff")
    tifffile.imwrite(tmp_path / "d.tiff", np.ones((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"d\.tiff: expected floating-point .* got dtype uint8"):
        read_xyz(tmp_path / "d.tiff")


def test_written_files_get_umask_mode(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.txt").stat().st_mode & 0o777 == 0o644


def test_configuration_text_format():
    text = configuration_text({"k_number": 10, "BS": 1, "classes": ["a", "b"]})
    assert text == "%30s: %s\n%30s: %s\n%30s: %s\n" % ("BS", 1, "classes", ["a", "b"], "k_number", 10)


def test_png16_yaml_and_disjoint_roots(tmp_path):
    depth = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    write_png(tmp_path / "d.png", depth)
    got = read_png16(tmp_path / "d.png")
    assert got.dtype == np.uint16 and np.array_equal(got, depth)
    write_png(tmp_path / "g.png", np.zeros((3, 4), np.uint8))
    with pytest.raises(DataError, match=r"g\.png: expected a 16-bit grayscale PNG"):
        read_png16(tmp_path / "g.png")
    write_yaml(tmp_path / "a.yaml", {"normalization": {"min": 0.15, "max": 1e-05}})
    assert read_yaml(tmp_path / "a.yaml") == {"normalization": {"min": 0.15, "max": 1e-05}}
    (tmp_path / "b.yaml").write_text("a: [1, 2\n")
    with pytest.raises(DataError, match=r"b\.yaml: not valid YAML"):
        read_yaml(tmp_path / "b.yaml")
    disjoint_roots(tmp_path / "raw", tmp_path / "out")
    for bad in (tmp_path / "raw", tmp_path / "raw" / "out", tmp_path):
        with pytest.raises(DataError, match="neither"):
            disjoint_roots(tmp_path / "raw", bad)


def test_check_output_dir_names_the_folder_and_creates_nothing(tmp_path, monkeypatch):
    check_output_dir(tmp_path / "new" / "deeper", "--output_dir")          # creatable: fine
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path / 'file'}: --output_dir is a file, not a folder"):
        check_output_dir(tmp_path / "file", "--output_dir")
    with pytest.raises(DataError, match=f"{tmp_path / 'file' / 'sub'}: --out cannot be created: "
                                        f"{tmp_path / 'file'} is a file"):
        check_output_dir(tmp_path / "file" / "sub", "--out")
    # root writes anywhere: emulate a user without write permission through os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path / "ro"))
    (tmp_path / "ro").mkdir()
    with pytest.raises(DataError, match="--output_dir is not writable by this user"):
        check_output_dir(tmp_path / "ro", "--output_dir")
    with pytest.raises(DataError, match=f"its parent {tmp_path / 'ro'} is not writable"):
        check_output_dir(tmp_path / "ro" / "a" / "b", "--output_dir")


def test_stale_temporaries_of_atomic_writes_are_removed(tmp_path):
    class Killed(BaseException):
        pass

    def killed_write():
        with atomic_path(tmp_path / "000.npz") as tmp:
            tmp.write_bytes(b"half")
            raise Killed

    with pytest.raises(Killed):
        killed_write()      # an exception cleans up; a SIGKILL would not: leave one like it by hand
    assert not list(tmp_path.iterdir())
    left = tmp_path / ".000.ab_9xyz1.part.npz"
    left.write_bytes(b"half")
    others = [tmp_path / n for n in (".000.npz", "000.part.npz", ".000.abc.part.npz", "notes.txt", ".000.npz.cut-tmp")]
    for o in others:
        o.write_bytes(b"keep")
    assert remove_stale_temporaries(tmp_path) == 1 and not left.exists() and all(o.exists() for o in others)
    assert remove_stale_temporaries(tmp_path / "missing") == 0


def test_file_format_sniffing_and_image_shape(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "new.pth")
    torch.save({"a": torch.zeros(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "text.pth").write_text("epoch:0000\tloss:0.1\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert [torch_file_format(tmp_path / f"{n}.pth") for n in ("new", "old", "text", "empty")] == \
        ["zip", "pickle", None, None]
    write_png(tmp_path / "a.png", np.zeros((5, 9, 3), np.uint8))
    assert read_image_shape(tmp_path / "a.png") == (5, 9)
    with pytest.raises(DataError, match="cannot read image"):
        read_image_shape(tmp_path / "text.pth")
