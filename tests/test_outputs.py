"""What edgelmm writes: the permissions the user's umask gives, no folders made on a typo, no
overwrite without --overwrite, nothing half-written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgelmm.cli import main
from tests.tiny_models import save_tiny


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def modes(path: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of `path` and everything under it."""
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in items}


def test_outputs_keep_the_users_umask(tmp_path, umask_002, capsys):
    source = save_tiny("llava", tmp_path / "float")
    assert main(["quantize", str(source), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q")]) == 0
    assert main(["convert", str(tmp_path / "q"), "--out", str(tmp_path / "awq")]) == 0
    assert main(["export", "gguf", str(source), str(tmp_path / "m.gguf")]) == 0
    for folder in ("q", "awq"):
        assert modes(tmp_path / folder) == {("dir", 0o775), ("file", 0o664)}, folder
    assert modes(tmp_path / "m.gguf") == {("file", 0o664)}


def test_outputs_refuse_missing_folders_and_existing_files(tmp_path, capsys):
    source = save_tiny("llava", tmp_path / "float")
    for argv in (["quantize", str(source), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "no" / "q")],
                 ["export", "gguf", str(source), str(tmp_path / "no" / "m.gguf")]):
        assert main(argv) == 1
        assert f"the folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    assert main(["export", "gguf", str(source), str(out)]) == 1
    assert "already exists — choose another output file or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert main(["export", "gguf", str(source), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob(".*.tmp"))
