"""Files the harness writes are complete or absent, and readable by whoever the umask lets read them."""
import os
import stat

import pytest

from kd.io import save_json, save_torch


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_json({"a": 1}, tmp_path / "results.json")
        save_torch({"w": 1}, tmp_path / "student.pt")
    finally:
        os.umask(previous)
    for name in ("results.json", "student.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert not list(tmp_path.glob(".*.tmp"))
