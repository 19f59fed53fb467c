"""A segmentation run in a child Python process, as Slicer's AI extensions run theirs: the prepared input is
written to a temporary folder, the command line's ``segment`` runs on it in Slicer's ``PythonSlicer`` (this
interpreter outside Slicer), and its JSON progress lines (``core.run_events``) are read without blocking.
The process started is child_guard.py, which runs ``segment`` as its own child: the run ends, and its folder
with the patient's copy goes, when Slicer is gone, and a run ended by a signal says which and what it means.

The interface stays responsive (the model never holds Slicer's GIL), Cancel ends the child and
anything it started at once, and a crash or a CUDA fault in torch cannot take Slicer down. No Qt
here: the panel polls ``poll()`` from a timer, the console's ``wait()`` polls in a loop. The
child's stdout and stderr go to files in the run's folder, read as they grow, so no pipe can fill
up and no reader thread is needed; the folder is removed by ``close()`` whatever happened.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import SimpleITK as sitk
import slicer

from ..core.errors import Cancelled, CDMSegmentError
from ..core.image import Volume
from ..core.run_events import ERROR, LOG, PHASE, PROGRESS, SUMMARY, read_event
from .child_guard import (LIBRARY_PARENT, NOTHING_ADDED, MEMORY_ADVICE, RUN_FOLDER_PREFIX, hidden_console_options,
                          library_first, remove_orphaned_run_folders, signal_sentence)

# The modules the child runs; Testing/test_layering.py adds them to what Slicer installs.
GUARD_ENTRY = "CDMSegmentLib.slicer_adapters.child_guard"
SEGMENT_ENTRY = "CDMSegmentLib.cli.segment_command"
CANCEL_WAIT_S = 1.0
# The PythonSlicer launcher (CTK's AppLauncher) reports a child ended by a signal with this on stderr and exits 1:
# "error: [<python-real>] exit abnormally - Report the problem."
LAUNCHER_CRASH = "exit abnormally - Report the problem."
LAUNCHER_CRASH_SENTENCE = (f"the CDMSegment process ended abnormally, killed by the system (most often when memory "
                           f"runs out) or crashed; {NOTHING_ADDED}; {MEMORY_ADVICE}")


def python_executable() -> str:
    """Slicer's PythonSlicer (on the PATH Slicer sets, as its extensions find it) inside Slicer, which sets up
    Slicer's Python and libraries; this interpreter elsewhere (pytest, plain Python)."""
    if not hasattr(slicer, "app"):
        return sys.executable
    found = shutil.which("PythonSlicer")
    if found is None:
        raise CDMSegmentError("Slicer's PythonSlicer was not found on the PATH; reinstall Slicer")
    return found


def _popen_options() -> dict:
    """Popen options that put the child in its own process group, so that Cancel ends everything it started,
    and hide its console window on Windows."""
    if os.name == "nt":
        options = hidden_console_options()
        options["creationflags"] |= subprocess.CREATE_NEW_PROCESS_GROUP
        return options
    return {"start_new_session": True}


def failure_sentence(returncode: int, stderr_lines: Sequence[str]) -> str:
    """Why a child that wrote no error line failed: a signal or a crash by name, the launcher's report of one
    (it hides the signal), else the last line it wrote on stderr."""
    if stderr_lines and stderr_lines[-1].endswith(LAUNCHER_CRASH):
        return LAUNCHER_CRASH_SENTENCE
    sentence = signal_sentence(returncode)
    if sentence:
        return sentence
    said = f": {stderr_lines[-1]}" if stderr_lines else ""
    return f"the CDMSegment process failed (exit code {returncode}){said}"


class ChildRun:
    """``cdmsegment segment --progress-lines`` on copies of the input volumes, in a child process.

    volumes: the prepared inputs (one per modality, geometry in LPS); arguments: the command line's
    options after the inputs (model, method, settings...); cache_dir: the model cache the child uses (default:
    the per-user one, ``core.registry.default_cache_dir``). Progress is read by ``poll()``;
    ``summary`` holds the run's result, ``error`` its one-line failure. Call ``close()`` when done.
    """

    def __init__(self, volumes: Sequence[Volume], arguments: List[str], python: Optional[str] = None,
                 cache_dir: Optional[Path] = None):
        remove_orphaned_run_folders(Path(tempfile.gettempdir()))
        self.folder = Path(tempfile.mkdtemp(prefix=f"{RUN_FOLDER_PREFIX}{os.getpid()}-"))
        self.ijk_to_lps = volumes[0].ijk_to_lps()  # the grid of the run's outputs
        self.progress = (0, 0)
        self.phase = "starting"
        self.messages: List[str] = []  # log lines not yet taken by the caller
        self.reports: List[tuple] = []  # (done, total) reports not yet taken by the caller
        self.summary: Optional[dict] = None
        self.error: Optional[str] = None
        self.cancelled = False
        self._eta = None  # (seconds left when reported, time of the report)
        self._partial = b""
        self._finished = False
        try:
            inputs = []
            for n, volume in enumerate(volumes):
                inputs.append(self.folder / f"input{n}.nrrd")
                sitk.WriteImage(volume.to_sitk(), str(inputs[-1]), False)  # uncompressed: written and read fast
            command = library_first(python or python_executable(), GUARD_ENTRY, [
                os.getpid(), self.folder, "--", SEGMENT_ENTRY, "segment", *inputs, "-o", self.folder / "output",
                "--progress-lines", *arguments], LIBRARY_PARENT)
            # The caller's model cache is the child's too (core.registry.default_cache_dir reads it).
            env = dict(os.environ, CDMSEGMENT_CACHE=str(cache_dir)) if cache_dir is not None else None
            self._stdout_path, self._stderr_path = self.folder / "stdout.jsonl", self.folder / "stderr.txt"
            with open(self._stdout_path, "wb") as stdout, open(self._stderr_path, "wb") as stderr:
                self.process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                                cwd=self.folder, env=env, **_popen_options())
            self._reader = open(self._stdout_path, "rb")
        except BaseException:
            self.close()
            raise

    def eta_seconds(self) -> Optional[float]:
        """Seconds left, counting down between the child's reports; None until it can estimate."""
        if self._eta is None:
            return None
        seconds, at = self._eta
        return max(0.0, seconds - (time.monotonic() - at))

    def poll(self) -> bool:
        """Read what the child wrote since the last call (never blocks); True once it has ended and every
        line is read. Then ``summary`` is set, or ``error`` (``cancelled`` tells a Cancel apart)."""
        if self._finished:
            return True
        returncode = self.process.poll()  # before reading, so that no line written before the end is missed
        self._read_lines()
        if returncode is None:
            return False
        self._finished = True
        if self.cancelled:
            self.error = str(Cancelled())
        elif returncode != 0 and (self.error is None or signal_sentence(returncode)):
            # A signal that ended the started process reached the worker too (one process group): where the worker's
            # handler won the race it wrote its own line first ("terminated; ..."), which says less than the
            # signal's sentence and nothing of what to do; the sentence is what the run ends with either way.
            lines = [l.strip() for l in self._stderr_path.read_text(errors="replace").splitlines() if l.strip()]
            self.error = failure_sentence(returncode, lines)
        elif self.error is None and self.summary is None:
            self.error = "the CDMSegment process ended without a result; nothing was added to the scene"
        return True

    def _read_lines(self) -> None:
        data = self._partial + self._reader.read()
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            event = read_event(line.decode("utf-8", "replace"))
            if event is None:
                continue
            kind = event["event"]
            if kind == PROGRESS:
                self.progress = (int(event["done"]), int(event["total"]))
                self.reports.append(self.progress)
                self._eta = None if event.get("eta_s") is None else (float(event["eta_s"]), time.monotonic())
            elif kind == PHASE:  # also a message: the panel shows the phase until the slices are counted
                self.phase = event["phase"]
                self.messages.append(f"{self.phase}...")
            elif kind == LOG:
                self.messages.append(event["message"])
            elif kind == SUMMARY:
                self.summary = event
            elif kind == ERROR:
                self.error = event["message"]

    def cancel(self) -> None:
        """End the child and everything it started now, and wait (up to a second) until it has ended. Nothing
        of the run is used afterwards, even when it had just finished."""
        self.cancelled = True
        if self.process.poll() is not None:
            return
        if os.name == "nt":  # /T: the whole tree the child started
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass
        deadline = time.monotonic() + CANCEL_WAIT_S
        try:
            self.process.wait(CANCEL_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
        # the guard's worker got the same SIGKILL, but a large process can take a moment to exit on a busy
        # machine: wait (within the same second) until nothing of the group is left
        while os.name != "nt" and time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.01)

    def wait(self, cancel=None, progress=None, log=None, poll_s: float = 0.05) -> dict:
        """Block until the child ends, ending it when ``cancel`` (threading.Event or callable) says so;
        progress(done, total) is called for every report and log(message) for every message, as they
        arrive. -> the summary, or raises Cancelled / CDMSegmentError with the child's one-line error."""
        while True:
            finished = self.poll()
            while self.reports:
                report = self.reports.pop(0)
                if progress is not None:
                    progress(*report)
            while self.messages:
                message = self.messages.pop(0)
                if log is not None:
                    log(message)
            if finished:
                break
            if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
                self.cancel()
            time.sleep(poll_s)
        if self.cancelled:
            raise Cancelled()
        if self.error is not None:
            raise CDMSegmentError(self.error)
        return self.summary

    def output_paths(self) -> List[Path]:
        """The files the finished run wrote: heatmap(s) first, the segmentation last."""
        return [Path(p) for p in self.summary["heatmap_paths"]] + [Path(self.summary["segmentation_path"])]

    def close(self) -> None:
        """End the child if it still runs and remove the run's folder and every file in it."""
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.cancel()
        if getattr(self, "_reader", None) is not None:
            self._reader.close()
        shutil.rmtree(self.folder, ignore_errors=True)
