"""The run's first process (slicer_adapters/child_guard.py): the run dies with Slicer and leaves no copy of the
patient's volume, folders left by a killed Slicer are removed at the next run, and the child runs the panel's own
CDMSegmentLib even where the launcher puts an installed copy first.

"Slicer" here is a real Python process that starts a real run through ChildRun and is then killed; the run is
the real command line with a tiny model."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.slicer_adapters.child_guard import (RUN_FOLDER_PREFIX, remove_orphaned_run_folders,
                                                      signal_sentence)
from CDMSegmentLib.slicer_adapters.child_process import LIBRARY_PARENT, ChildRun
from conftest import phantom
from test_child_process import LONG, children_of, gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="follows the processes through /proc")
RUN_ARGUMENTS = ["--device", "cpu", "--batch-size", "1", "--steps", "1"]

SLICER_STAND_IN = """
import sys, time
import numpy as np
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.slicer_adapters.child_process import ChildRun

run = ChildRun([Volume(np.load(sys.argv[1]))], ["--model", sys.argv[2]] + sys.argv[3:])
while run.progress[0] < 2:
    assert not run.poll(), run.error
    time.sleep(0.05)
print(run.process.pid, run.folder, flush=True)
time.sleep(600)
"""


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_when_slicer_is_killed_the_run_ends_and_no_patient_copy_is_left(tmp_path, tiny_model_path):
    np.save(tmp_path / "volume.npy", phantom(LONG))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    slicer_process = subprocess.Popen(
        [sys.executable, "-c", SLICER_STAND_IN, str(tmp_path / "volume.npy"), str(tiny_model_path), *RUN_ARGUMENTS],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(temporary),
                                                    PYTHONPATH=str(LIBRARY_PARENT)))
    try:
        guard_pid, folder = slicer_process.stdout.readline().split()
        [worker] = children_of(int(guard_pid))
        assert (Path(folder) / "input0.nrrd").is_file() and Path(folder).parent == temporary
    finally:
        slicer_process.kill()  # as the system kills Slicer: nothing in it runs afterwards
        slicer_process.wait()
    assert gone(worker, within_s=5) and gone(int(guard_pid), within_s=5)
    deadline = time.monotonic() + 5
    while Path(folder).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(temporary.glob(f"{RUN_FOLDER_PREFIX}*")) == []


def test_the_worker_dies_with_the_guard_however_the_guard_ends(tmp_path, tiny_model_path, monkeypatch):
    """PR_SET_PDEATHSIG: the guard killed alone (not its process group) takes the worker with it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = ChildRun([Volume(phantom(LONG))], ["--model", str(tiny_model_path), *RUN_ARGUMENTS])
    try:
        while run.progress[0] < 2:
            assert not run.poll(), run.error
            time.sleep(0.05)
        [worker] = children_of(run.process.pid)
        os.kill(run.process.pid, signal.SIGKILL)
        assert gone(worker, within_s=3)
        with pytest.raises(CDMSegmentError, match=r"^the CDMSegment process was killed \(SIGKILL\)"):
            run.wait()
    finally:
        run.close()
    assert list(tmp_path.iterdir()) == []


def test_folders_of_a_slicer_that_is_gone_are_removed_and_no_other(tmp_path):
    dead, alive = tmp_path / f"{RUN_FOLDER_PREFIX}{dead_pid()}-x1", tmp_path / f"{RUN_FOLDER_PREFIX}{os.getpid()}-x2"
    unnamed, other = tmp_path / f"{RUN_FOLDER_PREFIX}x3", tmp_path / "kept"
    for folder in (dead, alive, unnamed, other):
        (folder / "output").mkdir(parents=True)
        (folder / "input0.nrrd").write_bytes(b"patient")
    assert remove_orphaned_run_folders(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, unnamed, other))


def test_the_next_run_removes_what_a_killed_slicer_left(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / f"{RUN_FOLDER_PREFIX}{dead_pid()}-left"
    (left / "output").mkdir(parents=True)
    (left / "input0.nrrd").write_bytes(b"patient")
    run = ChildRun([Volume(phantom((4, 20, 24)))], ["--model", str(tiny_model_path), *RUN_ARGUMENTS])
    try:
        assert not left.exists() and run.folder.name.startswith(f"{RUN_FOLDER_PREFIX}{os.getpid()}-")
        assert run.wait()["slices_run"] == 4
    finally:
        run.close()
    assert list(tmp_path.iterdir()) == []


def test_the_child_runs_the_panels_own_library_before_an_installed_copy(tmp_path, tiny_model_path, monkeypatch):
    """PythonSlicer (CTK's launcher) puts its own PYTHONPATH entries, an installed copy of the extension among
    them, before the PYTHONPATH it is given. Here a launcher does the same with a copy that refuses to run."""
    installed = tmp_path / "installed"
    (installed / "CDMSegmentLib").mkdir(parents=True)
    (installed / "CDMSegmentLib" / "__init__.py").write_text('raise ImportError("the installed copy was imported")\n')
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        PYTHONPATH={installed}:$PYTHONPATH exec {sys.executable} "$@"
        """))
    launcher.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(LIBRARY_PARENT))
    broken = subprocess.run([str(launcher), "-c", "import CDMSegmentLib"], capture_output=True, text=True)
    assert "the installed copy was imported" in broken.stderr  # what PYTHONPATH alone gave the child
    run = ChildRun([Volume(phantom((4, 20, 24)))], ["--model", str(tiny_model_path), *RUN_ARGUMENTS],
                   python=str(launcher))
    try:
        assert run.wait()["slices_run"] == 4
    finally:
        run.close()


def test_on_windows_the_child_and_the_worker_start_without_a_console_window():
    """What slicer.util.launchConsoleProcess does on Windows (STARTUPINFO with STARTF_USESHOWWINDOW and SW_HIDE),
    plus CREATE_NO_WINDOW; read from the source, since subprocess.STARTUPINFO exists only on Windows. Both
    processes use it: the one the adapter starts and the worker the guard starts."""
    import ast
    import inspect

    from CDMSegmentLib.slicer_adapters import child_guard, child_process

    if os.name != "nt":
        assert child_guard.hidden_console_options() == {}
    windows = ast.unparse(ast.parse(inspect.getsource(child_guard.hidden_console_options)))
    for part in ("info.dwFlags |= subprocess.STARTF_USESHOWWINDOW", "info.wShowWindow = subprocess.SW_HIDE",
                 "'startupinfo': info", "'creationflags': subprocess.CREATE_NO_WINDOW"):
        assert part in windows, part
    assert "**hidden_console_options()" in inspect.getsource(child_guard.guard)
    adapter = inspect.getsource(child_process._popen_options)
    assert "hidden_console_options()" in adapter and "CREATE_NEW_PROCESS_GROUP" in adapter


# What PythonSlicer (CTK's AppLauncher) does with the program it launches: it runs it as its child and, when that
# child ends by a signal, prints this line (Base/ctkAppLauncher.cpp, applicationFinished) and exits 1.
LAUNCHER = f"""#!{sys.executable}
import subprocess, sys
ended = subprocess.run([{sys.executable!r}] + sys.argv[1:])
if ended.returncode < 0:
    sys.stderr.write("error: [{sys.executable}-real] exit abnormally - Report the problem.\\n")
    sys.exit(1)
sys.exit(ended.returncode)
"""


@pytest.mark.parametrize("killed, expected", [
    ("worker", r"^the CDMSegment process was killed \(SIGKILL\), most often by the system when memory runs out"),
    ("guard", r"^the CDMSegment process ended abnormally, killed by the system \(most often when memory runs out\) "
              r"or crashed; nothing was added to the scene; try fewer slices per batch"),
])
def test_through_the_launcher_a_killed_run_is_still_explained(tmp_path, tiny_model_path, monkeypatch, killed,
                                                              expected):
    """Inside Slicer the adapter's child is the launcher, which turns any signal into exit code 1: the worker's
    end is reported by the guard, by name; the guard's own (rarer) is recognised from the launcher's line."""
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = ChildRun([Volume(phantom(LONG))], ["--model", str(tiny_model_path), *RUN_ARGUMENTS], python=str(launcher))
    try:
        while run.progress[0] < 2:
            assert not run.poll(), run.error
            time.sleep(0.05)
        [guard] = children_of(run.process.pid)
        [worker] = children_of(guard)
        os.kill(worker if killed == "worker" else guard, signal.SIGKILL)
        with pytest.raises(CDMSegmentError, match=expected):
            run.wait()
        assert run.process.returncode == 1  # all the launcher itself says
        assert gone(worker, within_s=3)
    finally:
        run.close()
    assert list(tmp_path.glob(f"{RUN_FOLDER_PREFIX}*")) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals and a shell script as the child")
def test_a_signal_is_named_even_where_the_worker_wrote_its_own_line_before_the_started_process_died(tmp_path,
                                                                                                    monkeypatch):
    """SIGTERM to the run's process group reaches the worker too. Where the worker's handler wins the race it writes
    its own line ("terminated; no partial output was kept") before the started process dies of the signal; the run
    still ends with the signal's sentence, which says what happened and what to do, whichever came first."""
    child = tmp_path / "python"
    child.write_text("#!/bin/sh\n"
                     "echo '{\"event\": \"error\", \"message\": \"terminated; no partial output was kept\"}'\n"
                     "kill -TERM $$\n")
    child.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = ChildRun([Volume(phantom((4, 20, 24)))], ["--model", "unused"], python=str(child))
    try:
        with pytest.raises(CDMSegmentError) as raised:
            run.wait()
        assert run.process.returncode == -signal.SIGTERM
    finally:
        run.close()
    assert str(raised.value) == signal_sentence(-signal.SIGTERM)
    assert str(raised.value).startswith("the CDMSegment process was ended (SIGTERM)")
    assert list(tmp_path.glob(f"{RUN_FOLDER_PREFIX}*")) == []
