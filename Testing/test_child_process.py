"""The model in its own process (slicer_adapters/child_process.py) against the real command line, and the scene
changing under a run: progress, Cancel, a killed child, failures, and what the scene holds afterwards.

Each run is a real child Python running ``cdmsegment segment --progress-lines`` with a tiny model on a small
volume. The run's temporary folders are made under this test's own folder, so "no file left" is checked
exactly.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
import torch

from CDMSegment import CDMSegmentLogic
from CDMSegmentLib.core.errors import Cancelled, CDMSegmentError
from CDMSegmentLib.core.runner import default_batch_size
from CDMSegmentLib.core.settings import CDMSettings
from CDMSegmentLib.slicer_adapters import mrml
from CDMSegmentLib.slicer_adapters.child_guard import signal_sentence
from CDMSegmentLib.slicer_adapters.child_process import (CANCEL_WAIT_S, LIBRARY_PARENT, SEGMENT_ENTRY,
                                                         failure_sentence)
from CDMSegmentLib.slicer_adapters.result_files import node_ids
from conftest import add_volume, phantom
from test_mrml import GEOMETRIES

SHAPE = (10, 20, 24)
LONG = (60, 20, 24)  # one slice per batch: a run that is still going when it is cancelled or killed


@pytest.fixture
def run_folders(tmp_path, monkeypatch):
    """The folder the runs' temporary folders go in (tempfile's default, for this test only)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def slices_with_content(array: np.ndarray) -> int:
    return int((array.reshape(array.shape[0], -1) != 0).any(axis=1).sum())


def running(logic, node, model):
    """A run of the long volume, returned once the child reports its first slices (it is segmenting)."""
    run = logic.startRun(node, model=model, device="cpu", batchSize=1, settings=CDMSettings(steps=1))
    while run.progress[0] < 2:
        assert not run.poll(), run.error
        time.sleep(0.05)
    return run


def processes():
    """(id, state, parent id, process group) of every process (Linux's /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        yield int(stat.parent.name), state, int(parent), int(group)


def children_of(pid: int) -> list:
    """The ids of the processes whose parent is ``pid``."""
    return [child for child, state, parent, group in processes() if parent == pid]


def running_in_group(pgid: int) -> list:
    """The processes of group ``pgid`` that still run (an ended one waiting to be reaped by init does not)."""
    return [member for member, state, parent, group in processes() if group == pgid and state != "Z"]


def gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether process ``pid`` has ended (and been reaped, or is a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_progress_counts_every_slice_exactly_and_in_order(scene, tiny_model, run_folders):
    node = add_volume(scene, phantom(SHAPE), GEOMETRIES["axial"])
    reports = []
    CDMSegmentLogic().process(node, model=tiny_model, device="cpu", batchSize=3, settings=CDMSettings(steps=1),
                              progress=lambda done, total: reports.append((done, total)))
    total = slices_with_content(phantom(SHAPE))
    assert reports == [(done, total) for done in [0, 3, 6, 9, 10]]
    assert list(run_folders.iterdir()) == []


def test_by_default_the_child_chooses_the_batch_size_for_its_device_and_an_explicit_one_is_passed_on(
        scene, tiny_model, run_folders):
    """The panel's "auto" (0) and the console's default leave --batch-size off the child's command line, so the
    child batches as the command line does (default_batch_size: 4 slices on a CPU for this model)."""
    node = add_volume(scene, phantom(SHAPE), GEOMETRIES["axial"])
    total = slices_with_content(phantom(SHAPE))
    assert default_batch_size(tiny_model, torch.device("cpu")) == 4
    for batch_size, passed, steps in [(0, None, [0, 4, 8, 10]), (None, None, [0, 4, 8, 10]),
                                      (3, "3", [0, 3, 6, 9, 10])]:
        reports = []
        run = CDMSegmentLogic().startRun(node, model=tiny_model, device="cpu", batchSize=batch_size,
                                         settings=CDMSettings(steps=1))
        try:
            run.wait(progress=lambda done, total: reports.append((done, total)))
        finally:
            run.close()
        command = list(run.process.args)
        assert (command[command.index("--batch-size") + 1] if "--batch-size" in command else None) == passed
        assert reports == [(done, total) for done in steps], batch_size
    assert list(run_folders.iterdir()) == []


def test_the_command_reports_phases_progress_and_a_summary_in_json_lines(tmp_path, tiny_model_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(phantom(SHAPE)), str(tmp_path / "case.nrrd"))
    env = dict(os.environ, PYTHONPATH=str(LIBRARY_PARENT))
    result = subprocess.run([sys.executable, "-m", SEGMENT_ENTRY, "segment", str(tmp_path / "case.nrrd"), "-o",
                             str(tmp_path / "out"), "--model", str(tiny_model_path), "--device", "cpu", "--steps",
                             "1", "--batch-size", "4", "--progress-lines"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        "reading the input", "loading the model", "segmenting", "writing the results"]
    assert [(e["done"], e["total"]) for e in events if e["event"] == "progress"] == [(0, 10), (4, 10), (8, 10),
                                                                                      (10, 10)]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["slices_run"] == 10 and summary["class_names"] == ["tumour"]
    assert sorted(os.listdir(tmp_path / "out")) == ["case.seg.nrrd", "case_heatmap.nrrd"]


def test_cancel_ends_the_child_within_a_second_and_leaves_no_file_and_the_scene_as_it_was(scene, tiny_model,
                                                                                          run_folders):
    node = add_volume(scene, phantom(LONG), GEOMETRIES["axial"])
    before = node_ids(scene)
    run = running(CDMSegmentLogic(), node, tiny_model)
    run.cancel()  # waits at most CANCEL_WAIT_S for the child to end
    assert run.process.poll() is not None, f"the child still runs {CANCEL_WAIT_S} s after Cancel"
    assert running_in_group(run.process.pid) == []  # nothing it started is left either
    assert run.poll() and run.cancelled and run.summary is None
    run.close()
    assert list(run_folders.iterdir()) == [] and node_ids(scene) == before


def test_process_cancelled_from_its_progress_adds_nothing(scene, tiny_model, run_folders):
    node = add_volume(scene, phantom(LONG), GEOMETRIES["axial"])
    before = node_ids(scene)
    cancel = threading.Event()
    with pytest.raises(Cancelled, match="^cancelled by the user; nothing was written$"):
        CDMSegmentLogic().process(node, model=tiny_model, device="cpu", batchSize=1, settings=CDMSettings(steps=1),
                                  cancel=cancel, progress=lambda done, total: done >= 2 and cancel.set())
    assert node_ids(scene) == before and list(run_folders.iterdir()) == []


@pytest.mark.parametrize("sent, expected", [
    (signal.SIGKILL, "the CDMSegment process was killed (SIGKILL), most often by the system when memory runs out; "
                     "nothing was added to the scene; try fewer slices per batch (Advanced > Batch size), close "
                     "other programs, or choose the CPU as the device"),
    (signal.SIGSEGV, "the CDMSegment process crashed (SIGSEGV, a memory access fault inside torch or a graphics "
                     "driver); nothing was added to the scene; try the CPU as the device, or update PyTorch in the "
                     "PyTorch module; if it happens again, please report it with the application log"),
])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through Linux's /proc")
def test_a_run_ended_by_a_signal_says_which_and_what_to_do_and_changes_nothing(scene, tiny_model, run_folders,
                                                                               sent, expected):
    """The signal hits the worker (the segment command), as the out-of-memory killer picks the process holding
    the memory: the process the adapter started (inside Slicer, the PythonSlicer launcher, which hides the
    signal) is not the one that died, and the guard reports the worker's end by name."""
    node = add_volume(scene, phantom(LONG), GEOMETRIES["axial"])
    before = node_ids(scene)
    run = running(CDMSegmentLogic(), node, tiny_model)
    [worker] = children_of(run.process.pid)
    os.kill(worker, sent)
    with pytest.raises(CDMSegmentError) as raised:
        run.wait()
    run.close()
    assert str(raised.value) == expected
    assert node_ids(scene) == before and list(run_folders.iterdir()) == []


def test_the_started_process_ended_by_a_signal_is_named_too(scene, tiny_model, run_folders):
    node = add_volume(scene, phantom(LONG), GEOMETRIES["axial"])
    run = running(CDMSegmentLogic(), node, tiny_model)
    os.killpg(run.process.pid, signal.SIGTERM)
    with pytest.raises(CDMSegmentError, match=r"^the CDMSegment process was ended \(SIGTERM\) by another program or "
                                              r"by the system shutting down; nothing was added to the scene; press "
                                              r"Apply to run again$"):
        run.wait()
    run.close()
    assert list(run_folders.iterdir()) == []


def test_the_launchers_report_of_a_crash_is_explained():
    """CTK's AppLauncher (PythonSlicer) prints this (Base/ctkAppLauncher.cpp, applicationFinished) and exits 1
    when its child crashes or is killed: it hides the signal, so the sentence names the likely causes."""
    launcher = ["info: DisableSplash [1]",
                "error: [/opt/Slicer/bin/python-real] exit abnormally - Report the problem."]
    assert failure_sentence(1, launcher) == (
        "the CDMSegment process ended abnormally, killed by the system (most often when memory runs out) or "
        "crashed; nothing was added to the scene; try fewer slices per batch (Advanced > Batch size), close other "
        "programs, or choose the CPU as the device")
    assert failure_sentence(2, ["usage: error"]) == "the CDMSegment process failed (exit code 2): usage: error"
    assert failure_sentence(0xC0000005, []).startswith("the CDMSegment process crashed (access violation, 0xC0000005")
    assert signal_sentence(1) == signal_sentence(0) == ""


def test_a_failing_child_reports_its_own_one_line_error_and_changes_nothing(scene, tiny_model, run_folders):
    node = add_volume(scene, phantom(SHAPE), GEOMETRIES["axial"])
    before = node_ids(scene)
    with pytest.raises(CDMSegmentError) as raised:
        CDMSegmentLogic().process(node, model=tiny_model, device="cpu", method="gradcam")
    assert str(raised.value) == ("gradcam needs a noise-aware classifier; give one with --classifier "
                                 "(train one with 'cdmsegment train-classifier')")
    assert node_ids(scene) == before and list(run_folders.iterdir()) == []


def test_an_input_deleted_during_the_run_is_a_clear_error_and_adds_nothing(scene, tiny_model, run_folders):
    node = add_volume(scene, phantom(SHAPE), GEOMETRIES["axial"])
    logic = CDMSegmentLogic()
    run = logic.startRun(node, model=tiny_model, device="cpu", settings=CDMSettings(steps=1))
    scene.RemoveNode(node)
    after_deletion = node_ids(scene)
    run.wait()
    with pytest.raises(CDMSegmentError, match="^the input volume 'flair' was deleted while CDMSegment ran; "
                                              "nothing was added to the scene$"):
        logic.addResults(run, node)
    assert node_ids(scene) == after_deletion and list(run_folders.iterdir()) == []


@pytest.mark.parametrize("column, spacing", [(0, "0 x 1.1 x 3"), (2, "0.9 x 1.1 x 0")])
def test_a_zero_spacing_volume_is_refused_before_anything_starts(scene, tiny_model, run_folders, column, spacing):
    geometry = GEOMETRIES["axial"].copy()
    geometry[:3, column] = 0
    node = add_volume(scene, phantom(SHAPE), geometry)
    before = node_ids(scene)
    with pytest.raises(CDMSegmentError, match=f"^FLAIR 'flair' has a voxel spacing of {spacing} mm or axes that are "
                                              "not independent; set the spacing"):
        CDMSegmentLogic().process(node, model=tiny_model, device="cpu")
    assert node_ids(scene) == before and list(run_folders.iterdir()) == []


def test_a_new_threshold_after_the_segment_was_deleted_is_a_clear_error(scene, tiny_model, run_folders):
    node = add_volume(scene, phantom(SHAPE), GEOMETRIES["axial"])
    heatmap_node, segmentation_node = CDMSegmentLogic().process(node, model=tiny_model, device="cpu",
                                                                settings=CDMSettings(steps=1))
    segmentation_node.GetSegmentation().RemoveSegment(segmentation_node.GetSegmentation().GetNthSegmentID(0))
    before = node_ids(scene)
    with pytest.raises(CDMSegmentError, match="^'flair segmentation' has no segment any more \\(it was deleted\\); "
                                              "press Apply to make a new result$"):
        CDMSegmentLogic.remakeSegment(heatmap_node, segmentation_node, 0.0)
    scene.RemoveNode(segmentation_node)
    with pytest.raises(CDMSegmentError, match="^the segmentation of this result was deleted"):
        CDMSegmentLogic.remakeSegment(heatmap_node, segmentation_node, 0.0)
    assert node_ids(scene) == [i for i in before if i != segmentation_node.GetID()]


def test_the_runs_threshold_gives_back_the_runs_segment_speck_removal_included(scene, tiny_model, run_folders):
    node = add_volume(scene, phantom(SHAPE), GEOMETRIES["oblique"])
    logic = CDMSegmentLogic()
    run = logic.startRun(node, model=tiny_model, device="cpu",
                         settings=CDMSettings(steps=1, threshold="otsu", min_component_ml=0.02))
    summary = run.wait()
    heatmap_node, segmentation_node = logic.addResults(run, node)
    assert summary["min_component_voxels"] == round(0.02 * 1000 / (0.6 * 1.3 * 2.2)) > 1
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    shape = slicer.util.arrayFromVolume(node).shape
    made = mrml.segment_mask(segmentation_node, segment_id, mrml.ijk_to_ras(node), shape)
    heatmap = slicer.util.arrayFromVolume(heatmap_node)
    assert (heatmap > summary["thresholds"][0]).sum() > made.sum() > 0  # specks were removed
    assert logic.remakeSegment(heatmap_node, segmentation_node, summary["thresholds"][0]) is segmentation_node
    np.testing.assert_array_equal(mrml.segment_mask(segmentation_node, segment_id, mrml.ijk_to_ras(node), shape), made)


@pytest.mark.parametrize("heatmap_support, strong_finding_ml", [(0.0, 0.0), (0.05, 0.0), (0.05, 0.001)])
def test_a_new_threshold_delineates_the_lesion_by_its_intensity_as_the_run_did(scene, run_folders, tmp_path,
                                                                              heatmap_support, strong_finding_ml):
    """A model whose defaults refine the CDM's mask by the lesion's intensity (and, with heatmap support, add the
    bright regions its heatmap supports; with strong findings, keep their own bright voxels): the segment re-made
    at the run's threshold is the run's own (the refinement and the input travel with the segmentation), and with
    the input deleted a new threshold is refused rather than made another way."""
    from conftest import make_tiny_model_file
    from CDMSegmentLib.core.refine import lesion_intensity_components
    from CDMSegmentLib.core.threshold import make_mask

    model = tmp_path / "refining.pt"
    make_tiny_model_file(model, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 1,
                                          "lesion_intensity": 0.7, "lesion_intensity_floor": 1.2,
                                          "lesion_support": 0.0, "heatmap_floor": 1.0,
                                          "heatmap_support": heatmap_support,
                                          "strong_finding_ml": strong_finding_ml, "strong_finding_peak": 1.0})
    node = add_volume(scene, phantom(SHAPE), GEOMETRIES["oblique"])
    logic = CDMSegmentLogic()
    run = logic.startRun(node, model=model, device="cpu", settings=CDMSettings(threshold="otsu"))
    summary = run.wait()
    heatmap_node, segmentation_node = logic.addResults(run, node)
    refinement = summary["refinement"]
    assert refinement["lesion_intensity_floor"] == 1.2 and refinement["brain_median"] > 0
    assert refinement.get("heatmap_support", 0.0) == heatmap_support
    assert (refinement.get("strong_finding_voxels", 0) > 0) == (strong_finding_ml > 0)
    assert json.loads(segmentation_node.GetAttribute(mrml.REFINEMENT_ATTRIBUTE)) == refinement
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    shape = slicer.util.arrayFromVolume(node).shape
    made = mrml.segment_mask(segmentation_node, segment_id, mrml.ijk_to_ras(node), shape)
    plain = make_mask(slicer.util.arrayFromVolume(heatmap_node), summary["thresholds"][0])
    assert made.any() and not np.array_equal(made, plain)  # the intensity, not the heatmap, drew the edges
    without_support = lesion_intensity_components(plain, slicer.util.arrayFromVolume(node), None, 0.7, 1.2,
                                                  brain_median=refinement["brain_median"])
    assert np.array_equal(made, without_support) == (heatmap_support == 0)  # the support added bright regions
    lower = summary["thresholds"][0] / 2
    assert logic.remakeSegment(heatmap_node, segmentation_node, lower) is segmentation_node
    assert logic.remakeSegment(heatmap_node, segmentation_node, summary["thresholds"][0]) is segmentation_node
    np.testing.assert_array_equal(mrml.segment_mask(segmentation_node, segment_id, mrml.ijk_to_ras(node), shape), made)
    scene.RemoveNode(node)
    with pytest.raises(CDMSegmentError, match="input volume this result was delineated on was deleted"):
        logic.remakeSegment(heatmap_node, segmentation_node, lower)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's environment from /proc")
def test_the_child_uses_the_logics_model_cache(scene, tiny_model, run_folders, tmp_path):
    """One model cache: a logic given a cache folder hands it to the child (where the ONNX graphs go); without
    one, the child inherits the per-user default (CDMSEGMENT_CACHE or ~/.cache/CDMSegment/models)."""
    node = add_volume(scene, phantom(LONG), GEOMETRIES["axial"])
    for logic, expected in [(CDMSegmentLogic(cacheDir=tmp_path / "cache"), str(tmp_path / "cache")),
                            (CDMSegmentLogic(), os.environ.get("CDMSEGMENT_CACHE"))]:
        run = running(logic, node, tiny_model)
        try:
            environment = dict(entry.split("=", 1) for entry in Path(f"/proc/{run.process.pid}/environ").read_text()
                               .split("\0") if "=" in entry)
        finally:
            run.close()
        assert environment.get("CDMSEGMENT_CACHE") == expected
    assert list(run_folders.iterdir()) == []
