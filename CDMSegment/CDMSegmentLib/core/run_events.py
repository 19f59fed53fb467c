"""The lines a segmentation run writes for the program that started it, and their reader: one JSON object
per line on the run's stdout (``cdmsegment segment --progress-lines``).

    {"event": "phase", "phase": "segmenting"}                  what the run is doing now
    {"event": "progress", "done": 12, "total": 155, "eta_s": 40.2}   slices done of N, seconds left (or null)
    {"event": "log", "message": "..."}                          a message for the user's log
    {"event": "summary", ...}                                   the run's result (files, figures), last line
    {"event": "error", "message": "..."}                        the one-line reason a run failed, last line

Both sides import this module, so the writer in the command line and the reader in the Slicer
adapters cannot drift apart.
"""

import json
import time
from typing import IO, Optional

PHASE, PROGRESS, LOG, SUMMARY, ERROR = "phase", "progress", "log", "summary", "error"


class EventWriter:
    """Writes events to ``stream``, one flushed line each, and estimates the time left from the slice rate
    since the first progress report (after the model has loaded, so loading does not skew it)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self._first: Optional[tuple] = None  # (time, done) of the first report with a total

    def emit(self, event: str, **fields) -> None:
        self.stream.write(json.dumps({"event": event, **fields}) + "\n")
        self.stream.flush()

    def phase(self, name: str) -> None:
        self.emit(PHASE, phase=name)

    def log(self, message: str) -> None:
        self.emit(LOG, message=message)

    def progress(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._first is None and total:
            self._first = (now, done)
        eta_s = None
        if self._first is not None and done > self._first[1]:
            rate = (done - self._first[1]) / (now - self._first[0])
            eta_s = round((total - done) / rate, 1)
        self.emit(PROGRESS, done=done, total=total, eta_s=eta_s)


def read_event(line: str) -> Optional[dict]:
    """The event on one line, or None for a line that is not one (a stray print of a library)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
