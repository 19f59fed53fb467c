"""core/files.py: the mode every written file gets instead of its temporary file's 0600."""

import os

import pytest

from CDMSegmentLib.core.files import new_file_mode


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_mode_is_what_open_gives_under_the_umask_and_leaves_the_umask_as_it_was(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        computed = new_file_mode()
        assert os.umask(umask) == umask  # reading it did not change it
        (tmp_path / "opened").write_bytes(b"")
    finally:
        os.umask(previous)
    assert computed == mode == os.stat(tmp_path / "opened").st_mode & 0o777
