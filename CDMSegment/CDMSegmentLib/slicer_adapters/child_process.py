"""A segmentation run in a child Python process, as Slicer's AI extensions run theirs: the prepared input is
written to a temporary folder, the command line's ``segment`` runs on it in Slicer's ``PythonSlicer`` (this
interpreter outside Slicer), and its JSON progress lines (``core.run_events``) are read without blocking.

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

# The module the child runs; Testing/test_layering.py adds it to what Slicer installs.
SEGMENT_ENTRY = "CDMSegmentLib.cli.segment_command"
LIBRARY_PARENT = Path(__file__).resolve().parents[2]  # the folder holding CDMSegmentLib
CANCEL_WAIT_S = 1.0


def python_executable() -> str:
    """Slicer's PythonSlicer (on the PATH Slicer sets, as its extensions find it) inside Slicer, which sets up
    Slicer's Python and libraries; this interpreter elsewhere (pytest, plain Python)."""
    if not hasattr(slicer, "app"):
        return sys.executable
    found = shutil.which("PythonSlicer")
    if found is None:
        raise CDMSegmentError("Slicer's PythonSlicer was not found on the PATH; reinstall Slicer")
    return found


def _new_process_group() -> dict:
    """Popen options that put the child in its own process group, so that Cancel ends everything it started."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _signal_sentence(returncode: int) -> str:
    """What a child ended by a signal (negative return code on POSIX) means for the user, in one sentence."""
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == getattr(signal, "SIGKILL", None):
        return ("the CDMSegment process was killed (SIGKILL), most often by the system when memory runs out; "
                "nothing was added to the scene; try a smaller batch size or close other programs")
    return f"the CDMSegment process was ended by {name}; nothing was added to the scene"


class ChildRun:
    """``cdmsegment segment --progress-lines`` on copies of the input volumes, in a child process.

    volumes: the prepared inputs (one per modality, geometry in LPS); arguments: the command line's
    options after the inputs (model, method, settings...). Progress is read by ``poll()``;
    ``summary`` holds the run's result, ``error`` its one-line failure. Call ``close()`` when done.
    """

    def __init__(self, volumes: Sequence[Volume], arguments: List[str], python: Optional[str] = None):
        self.folder = Path(tempfile.mkdtemp(prefix="CDMSegment-"))
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
            command = [python or python_executable(), "-m", SEGMENT_ENTRY, "segment", *map(str, inputs),
                       "-o", str(self.folder / "output"), "--progress-lines", *arguments]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(LIBRARY_PARENT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            self._stdout_path, self._stderr_path = self.folder / "stdout.jsonl", self.folder / "stderr.txt"
            with open(self._stdout_path, "wb") as stdout, open(self._stderr_path, "wb") as stderr:
                self.process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                                cwd=self.folder, env=env, **_new_process_group())
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
        elif self.error is None and returncode != 0:
            self.error = _signal_sentence(returncode) if returncode < 0 else self._last_stderr_line(returncode)
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

    def _last_stderr_line(self, returncode: int) -> str:
        lines = [l.strip() for l in self._stderr_path.read_text(errors="replace").splitlines() if l.strip()]
        said = f": {lines[-1]}" if lines else ""
        return f"the CDMSegment process failed (exit code {returncode}){said}"

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
        try:
            self.process.wait(CANCEL_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()

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
