"""Atomic writes: a reader (or a resumed run) never sees a half-written file, and what lands has
the permissions the user's umask gives any new file (temporary files are created 0600 and
folders 0700, which would leave outputs unreadable in containers and on shared machines)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_new(path: str | Path) -> None:
    """Give `path` (and, for a folder, everything in it) the mode a newly created one would get."""
    mask = umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def output_parent(path: str | Path) -> Path:
    """The folder an output goes into, which must exist (outputs never create folders on a typo)."""
    parent = Path(path).parent
    if not parent.is_dir():
        from edgelmm.errors import EdgelmmError

        raise EdgelmmError(f"cannot write {path}: the folder {parent} does not exist", f"create it first (mkdir -p {parent})")
    return parent


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        as_new(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line by rewriting the file atomically, so a kill mid-write loses nothing."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


def read_jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a UTF-8 JSONL file with their line numbers; each error names file:line."""
    from edgelmm.errors import EdgelmmError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise EdgelmmError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdgelmmError(f"{path}:{number}: invalid JSON ({exc.msg})", "write one JSON object per line") from None
        if not isinstance(record, dict):
            raise EdgelmmError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; move it into place only if the block succeeds.
    An existing `path` is refused unless `overwrite`; its parent folder must exist."""
    from edgelmm.errors import EdgelmmError

    path = Path(path)
    if path.exists() and not overwrite:
        raise EdgelmmError(f"{path} already exists", "choose another output directory or pass --overwrite")
    tmp = Path(tempfile.mkdtemp(dir=output_parent(path), prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        as_new(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
