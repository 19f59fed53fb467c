"""The background job the panel polls: result, error, exact progress, ETA, Cancel."""

import time

import pytest

from CDMSegmentLib.slicer_adapters.worker_thread import BackgroundJob
from CDMSegmentLib.core.errors import Cancelled


def test_result_and_progress():
    def work(progress, cancel):
        for done in range(5):
            progress(done, 4)
            time.sleep(0.01)
        return "made"

    job = BackgroundJob(work)
    assert job.wait(5)
    assert job.result == "made" and job.error is None and job.progress == (4, 4)


def test_eta_from_the_rate_since_the_first_report():
    def work(progress, cancel):
        progress(0, 10)
        time.sleep(0.4)
        progress(5, 10)
        cancel.wait(5)

    job = BackgroundJob(work)
    time.sleep(0.1)
    assert job.eta_seconds() is None
    time.sleep(0.4)  # 0.1 s after the second report: 0.4 s for the last 5 slices, 0.1 s of it gone
    assert job.eta_seconds() == pytest.approx(0.3, abs=0.08)
    job.cancel()
    assert job.wait(5)


def test_cancel_ends_with_cancelled_kept_as_the_error():
    def work(progress, cancel):
        while not cancel.is_set():
            time.sleep(0.01)
        raise Cancelled()

    job = BackgroundJob(work)
    assert not job.finished
    job.cancel()
    assert job.wait(5) and isinstance(job.error, Cancelled) and job.result is None


def test_a_gui_polls_it_like_a_child_run():
    def work(progress, cancel):
        progress(1, 2)
        cancel.wait(5)
        raise Cancelled()

    job = BackgroundJob(work)
    assert not job.poll() and not job.cancelled and job.messages == []
    job.cancel()
    assert job.wait(5) and job.poll() and job.cancelled and job.progress == (1, 2)
