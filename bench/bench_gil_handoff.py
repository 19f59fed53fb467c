"""How much of the worker's speed the panel's polling keeps when the main thread holds the GIL while idle.

Slicer's main thread keeps the GIL in the Qt event loop. This imitates that with a C call that does
not release it (ctypes.PyDLL), between polls of a BackgroundJob doing short torch ops with Python
in between, as the CDM loop does. Prints the worker's iterations in one second, and their ratio to
a main thread that does not hold the GIL, for the panel's poll (POLL_MS, then wait YIELD_S) and for
a poll that does not wait.

    python bench/bench_gil_handoff.py
"""

import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegment import POLL_MS  # noqa: E402
from CDMSegmentLib.slicer_adapters.worker_thread import YIELD_S, BackgroundJob  # noqa: E402

LIBC = ctypes.PyDLL(None)  # PyDLL: calls keep the GIL, like an event loop that never releases it


def work(progress, cancel) -> int:
    """Iterations of 50 small matrix ops in one second of wall time."""
    x = torch.randn(64, 64)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        for _ in range(50):
            x = torch.tanh(x @ x.T / 64)
        n += 1
        progress(n, 0)
    return n


def run(idle_ms: float, wait_s: float, hold_gil: bool) -> int:
    job = BackgroundJob(work)
    while not job.finished:
        if hold_gil:
            LIBC.usleep(int(idle_ms * 1000))
        else:
            time.sleep(idle_ms / 1000)
        if wait_s:
            job.wait(wait_s)
    return job.result


def main() -> None:
    torch.set_num_threads(1)
    idle_ms = POLL_MS - YIELD_S * 1000
    free = run(POLL_MS, 0.0, hold_gil=False)
    print(f"main thread not holding the GIL: {free} iterations per second (1.00)")
    for label, idle, wait in ((f"panel poll: idle {idle_ms:.0f} ms holding the GIL, then wait {YIELD_S * 1000:.0f} ms",
                               idle_ms, YIELD_S),
                              (f"poll without waiting: idle {POLL_MS} ms holding the GIL", POLL_MS, 0.0)):
        n = run(idle, wait, hold_gil=True)
        print(f"{label}: {n} iterations per second ({n / free:.2f})")


if __name__ == "__main__":
    main()
