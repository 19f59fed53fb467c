"""What every file this package writes through a temporary file shares: the mode of a new file.

``tempfile.mkstemp`` makes its file 0600; a result or a downloaded model renamed from it would stay unreadable
to the other users of a shared folder, so the writers (cli/writers.py, core/download.py) give it this mode.
"""

import os


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
