"""Outputs are written like any new file: their permissions follow the umask
(0644 and 0755 under 022, private under 077), and nothing is left behind."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

import numpy as np
import pandas as pd
import pytest

from skinlesion import files
from tests.conftest import group


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                          (0o002, 0o664, 0o775)])
def test_outputs_follow_the_umask(tmp_path, mask, file_mode, folder_mode):
    with umask(mask):
        files.write_json(tmp_path / "new/m.json", {"a": 1})
        files.write_csv(tmp_path / "t.csv", pd.DataFrame({"a": [1]}))
        files.write_npy(tmp_path / "a.npy", np.zeros(2))
        files.write_bytes(tmp_path / "b.bin", b"x")
        with files.atomic_dir(tmp_path / "folder") as building:
            (building / "inside.txt").write_text("x")
    for name in ("new/m.json", "t.csv", "a.npy", "b.bin", "folder/inside.txt"):
        assert mode(tmp_path / name) == file_mode, name
    assert mode(tmp_path / "folder") == folder_mode
    assert mode(tmp_path / "new") == folder_mode
    assert not list(tmp_path.rglob("*.tmp"))


def test_prepared_data_follows_the_umask(tmp_path):
    from skinlesion import synthetic
    from skinlesion.data import download, prepare

    synthetic.make_dataset(tmp_path / "source", lesions_per_class=1, max_images_per_lesion=1)
    with umask(0o022):
        download.download(group("download", source="local", path=str(tmp_path / "source"), retries=0, max_unpacked_gb=1),
                          tmp_path / "raw", tmp_path / "cache")
        prepare.prepare(tmp_path / "raw", tmp_path / "prepared", 16)
    for path in [tmp_path / "raw", tmp_path / "prepared", *(tmp_path / "raw").rglob("*"),
                 *(tmp_path / "prepared").rglob("*")]:
        assert mode(path) == (0o755 if path.is_dir() else 0o644), path


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError) as raised:
        files.write_json(tmp_path / "m.json", {})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "m.json")
    with pytest.raises(OSError) as raised, files.atomic_dir(tmp_path / "out"):
        pass
    assert raised.value.filename == str(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
