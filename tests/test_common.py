"""geb.common: an atomic write leaves the old file or the new one, never a torn one or a temporary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from geb.common import atomic_write, atomic_write_json, atomic_write_text, clean_stale, temp_path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    atomic_write_json(path, {"v": 1})

    def half_then_fail(p):
        p.write_text('{"v": 2, "trunc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_writes_create_the_folder_and_keep_non_ascii_readable(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "b.json", {"语言": "中文"})
    assert path.read_text(encoding="utf-8") == '{\n "语言": "中文"\n}\n'
    assert atomic_write_text(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"


def test_a_dead_writers_temporary_is_one_clean_stale_removes(tmp_path):
    # the temp name is the checkpoint module's pattern, with this process's pid swapped for a dead one's
    final = tmp_path / "out.bin"
    ours = temp_path(final)
    assert ours.name == f".out.bin.tmp-{os.getpid()}"
    dead = tmp_path / ".out.bin.tmp-999999999"
    dead.write_bytes(b"partial")
    removed = clean_stale(final)
    assert [Path(p).name for p in removed] == [dead.name] and not dead.exists()
