"""Staged writes: permissions of a normal write, and the old output kept on any failure."""

import os
import stat

import pytest

from kronfact.atomic import staged_dir, staged_file


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_umask_permissions_not_tempfiles(tmp_path):
    mask = os.umask(0o022)
    try:
        with staged_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
        with staged_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(mask)
    assert _mode(tmp_path / "f.json") == 0o644 and _mode(tmp_path / "d") == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]


def test_a_failed_write_keeps_the_old_output_and_leaves_no_temp(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("old")
    (tmp_path / "f").write_text("old")
    for stage, target in ((staged_dir, tmp_path / "d"), (staged_file, tmp_path / "f")):
        with pytest.raises(OSError, match="disk full"), stage(target):
            raise OSError("disk full")
    assert (tmp_path / "d" / "old").read_text() == "old" and (tmp_path / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("old")
    real = os.replace

    def fail_second(src, dst):
        if ".tmp-" in str(src) and not str(src).endswith(".old"):  # the new folder's rename
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="rename failed"), staged_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("new")
    monkeypatch.setattr(os, "replace", real)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
