"""Crash-safe commits of several output files at once, recorded in a JSON-lines manifest.

A job writes each of its outputs to a hidden staging file beside its target
(:meth:`Manifest.staging_path`). :meth:`Manifest.commit` then appends a ``commit`` record
(the target paths, relative to the manifest's root, with their sha256), renames every
staged file onto its target and appends a ``done`` record. After an interruption at any
point, :meth:`Manifest.roll_forward` completes a ``commit`` record (renames what is
left, checking each hash), and staging files of jobs without a record are garbage
(:meth:`Manifest.discard_staged`). So a target is never half written, and an in-place run
never mistakes a modified input for an unmodified one.

Records are one JSON object per line with at least ``sample`` (the job's key), ``state``
(``commit`` or ``done``) and ``files``; the caller may add fields (e.g. statistics). A torn
last line (an interrupted append) is dropped on reading; any other unreadable line is an
error naming the manifest and the line.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from utils.errors import DataError
from utils.io import write_text

_rename = os.replace  # the commit's rename step (tests replace it to simulate interruptions)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def staging_path(target: str | os.PathLike, suffix: str) -> Path:
    """Hidden staging file beside ``target`` (matched by no ``*.<ext>`` glob of the target's folder)."""
    target = Path(target)
    return target.with_name(f".{target.name}{suffix}")


def _parse(path: Path) -> tuple[dict[str, dict], list[str], bool]:
    """(last record per job, the good lines, whether the file needs rewriting) of a manifest file."""
    records: dict[str, dict] = {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    good = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {"sample", "state", "files"} <= record.keys():
                raise ValueError("not a manifest record")
        except ValueError as exc:
            if number == len(lines):  # the last line, torn by an interruption: drop it
                break
            raise DataError(f"{path}: corrupt manifest line {number} ({exc}); "
                            f"remove the line or the manifest to continue") from exc
        good.append(line)
        records[record["sample"]] = record
    return records, good, bool(text) and not text.endswith("\n")


def read_records(path: str | os.PathLike) -> dict[str, dict]:
    """The last record of every job in the manifest file ``path`` ({} if there is none), read only."""
    path = Path(path)
    return _parse(path)[0] if path.exists() else {}


def stage_files(writes: Iterable[tuple[Path, Callable[[Path], None]]], suffix: str) -> dict[str, str]:
    """For each ``(target, write)`` call ``write(staging file of target)``; return ``{str(target): sha256}``,
    ready for :meth:`Manifest.commit`. On any failure the staging files written so far are removed
    and the exception propagates."""
    files, written = {}, []
    try:
        for target, write in writes:
            tmp = staging_path(target, suffix)
            written.append(tmp)
            write(tmp)
            files[str(target)] = sha256_file(tmp)
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    return files


class Manifest:
    """Append-only JSON-lines log ``<root>/<name>`` of committed and finished jobs (module docstring)."""

    def __init__(self, root: str | os.PathLike, name: str, staging_suffix: str, repair: bool = True):
        """Read ``<root>/<name>`` if it exists; ``repair`` rewrites it without a torn last line."""
        self.root = Path(root)
        self.path = self.root / name
        self.staging_suffix = staging_suffix
        self.records: dict[str, dict] = {}
        if not self.path.exists():
            return
        self.records, good, torn = _parse(self.path)
        if repair and torn:  # make the next append start on a fresh line
            write_text(self.path, "".join(f"{line}\n" for line in good))

    def exists(self) -> bool:
        return self.path.exists()

    def staging_path(self, target: str | os.PathLike) -> Path:
        return staging_path(target, self.staging_suffix)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records[record["sample"]] = record

    def commit(self, key: str, files: dict[str, str], **fields) -> None:
        """Commit record, renames of the staged ``files`` (absolute target -> sha256), done record."""
        relative = {Path(t).relative_to(self.root).as_posix(): sha for t, sha in files.items()}
        record = dict(sample=key, files=relative, **fields)
        self.append(dict(record, state="commit"))
        for target in files:
            _rename(self.staging_path(target), target)
        self.append(dict(record, state="done"))

    def roll_forward(self, record: dict) -> Optional[str]:
        """Finish a commit that an interruption cut short; return an error message or None."""
        for rel, sha in record["files"].items():
            target = self.root / rel
            staged = self.staging_path(target)
            if staged.exists() and sha256_file(staged) == sha:
                _rename(staged, target)
            elif not (target.exists() and sha256_file(target) == sha):
                return (f"{target}: interrupted commit cannot be completed (neither the file nor its temporary "
                        f"copy has the recorded content); restore this sample from the raw data set")
        self.append(dict(record, state="done"))
        return None

    def resume(self, key: str) -> tuple[str, Optional[str]]:
        """What a rerun does with job ``key``, after completing its interrupted commit if it has one:
        ``("todo", None)`` (no record), ``("done", None)`` (finished, every file present),
        ``("recovered", None)`` (an interrupted commit, completed now), ``("missing", path)``
        (finished, but that file is gone) or ``("failed", message)`` (an interrupted commit that
        cannot be completed)."""
        record = self.records.get(key)
        if record is None:
            return "todo", None
        if record["state"] == "commit":
            error = self.roll_forward(record)
            return ("failed", error) if error else ("recovered", None)
        missing = [rel for rel in record["files"] if not (self.root / rel).exists()]
        return ("missing", str(self.root / missing[0])) if missing else ("done", None)

    def discard_staged(self, targets) -> None:
        """Remove the staging files of ``targets`` (uncommitted work of an interrupted run)."""
        for target in targets:
            if target is not None:
                self.staging_path(target).unlink(missing_ok=True)
