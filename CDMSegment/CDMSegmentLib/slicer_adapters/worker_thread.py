"""A job on a worker thread that a GUI polls: exact progress, an ETA, Cancel, the result or the error.

The panel downloads a model this way (the model itself runs in a child process, child_process.py,
which a GUI polls through the same ``poll`` / ``progress`` / ``eta_seconds`` / ``cancel``). The
worker never touches the scene or Qt; the GUI reads ``progress`` / ``eta_seconds`` from a timer on
the main thread and publishes the result there. Reading a tuple that the worker replaces whole is
safe under the GIL, so no lock is needed.
"""

import threading
import time
from typing import Any, Callable, List, Optional, Tuple

Work = Callable[[Callable[[int, int], None], threading.Event], Any]
# The worker's Python code needs the GIL, and Slicer's main thread keeps it while it idles in the Qt event
# loop (its Python manager does not turn on PythonQt's thread support): each poll waits this long for the
# worker, which hands the GIL over and leaves the event loop a gap that keeps the GUI responsive.
YIELD_S = 0.03


class BackgroundJob:
    """Runs ``work(progress, cancel_event)`` once, at construction, on a daemon thread."""

    def __init__(self, work: Work):
        self.cancel_event = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.messages: List[str] = []  # lines for the user's log, as a child run has (a download writes none)
        self._progress: Tuple[int, int] = (0, 0)
        self._first: Optional[Tuple[float, int]] = None  # (time, done) of the first report with a total
        self._last_seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name="CDMSegment job")
        self._thread.start()

    def _run(self, work: Work) -> None:
        try:
            self.result = work(self._report, self.cancel_event)
        except BaseException as e:  # handed to the GUI thread, which shows it
            self.error = e

    def _report(self, done: int, total: int) -> None:
        if self._first is None and total:
            self._first = (time.perf_counter(), done)
        self._last_seconds = time.perf_counter()
        self._progress = (done, total)

    @property
    def progress(self) -> Tuple[int, int]:
        """(slices done, slices in total); total is 0 until the run knows it."""
        return self._progress

    def eta_seconds(self) -> Optional[float]:
        """Seconds left at the rate between the first report (after model loading) and the last, counting
        down between reports; None until two reports differ."""
        done, total = self._progress
        if self._first is None or done <= self._first[1]:
            return None
        rate = (done - self._first[1]) / (self._last_seconds - self._first[0])
        return max(0.0, (total - done) / rate - (time.perf_counter() - self._last_seconds))

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """Ask the work to stop at its next check; it raises Cancelled, kept in ``error``."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def poll(self) -> bool:
        """For a GUI timer: wait up to YIELD_S for the worker (its share of the GIL); True once it has ended."""
        return self.wait(YIELD_S)

    def wait(self, timeout_s: Optional[float] = None) -> bool:
        self._thread.join(timeout_s)
        return self.finished
