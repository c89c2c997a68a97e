import os
import stat

import pytest

from vmc_fast.io.files import atomic_path, write_text_atomic


def test_atomic_write_gives_normal_permissions_and_no_leftovers(tmp_path):
    path = write_text_atomic(tmp_path / "a.json", "{}\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask and path.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            open(tmp, "w").write("half-writ")
            raise RuntimeError("encoder crashed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
