"""utils/manifest.py: staged writes and what a rerun does with each job."""
from __future__ import annotations

import pytest

import utils.manifest as engine
from utils.manifest import Manifest, sha256_file, stage_files, staging_path


def test_stage_files_and_cleanup(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    files = stage_files([(a, lambda p: p.write_text("A")), (b, lambda p: p.write_text("B"))], ".tmp")
    assert files == {str(a): sha256_file(staging_path(a, ".tmp")), str(b): sha256_file(staging_path(b, ".tmp"))}
    assert not a.exists() and staging_path(a, ".tmp").read_text() == "A"

    def fail(p):
        raise OSError("disk full")

    with pytest.raises(OSError):
        stage_files([(tmp_path / "c.txt", lambda p: p.write_text("C")), (tmp_path / "d.txt", fail)], ".tmp2")
    assert not list(tmp_path.glob(".*.tmp2"))


def test_resume_states(tmp_path, monkeypatch):
    m = Manifest(tmp_path, "m.jsonl", ".tmp")
    assert m.resume("x") == ("todo", None)
    target = tmp_path / "x.txt"
    m.commit("x", stage_files([(target, lambda p: p.write_text("X"))], ".tmp"))
    assert Manifest(tmp_path, "m.jsonl", ".tmp").resume("x") == ("done", None)
    target.unlink()
    assert Manifest(tmp_path, "m.jsonl", ".tmp").resume("x") == ("missing", str(target))

    def interrupted_commit(name):
        target = tmp_path / f"{name}.txt"
        files = stage_files([(target, lambda p: p.write_text(name))], ".tmp")
        monkeypatch.setattr(engine, "_rename", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            m.commit(name, files)
        monkeypatch.undo()
        return target

    y = interrupted_commit("y")
    assert Manifest(tmp_path, "m.jsonl", ".tmp").resume("y") == ("recovered", None) and y.read_text() == "y"
    z = interrupted_commit("z")
    staging_path(z, ".tmp").write_text("changed")
    state, message = Manifest(tmp_path, "m.jsonl", ".tmp").resume("z")
    assert state == "failed" and "cannot be completed" in message
