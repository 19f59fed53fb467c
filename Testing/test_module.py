"""CDMSegmentLogic (CDMSegment.py) end to end on a real slicer-core scene with a tiny model file."""

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk
from vtkmodules.util import numpy_support

from CDMSegment import CDMSegmentLogic
from CDMSegmentLib.slicer_adapters import mrml
from CDMSegmentLib.core.errors import CDMSegmentError, ModelFileError
from CDMSegmentLib.core.modelfile import sha256_of
from CDMSegmentLib.core.settings import CDMSettings
from CDMSegmentLib.core.threshold import make_mask
from CDMSegmentLib.core.runner import segment_volume
from conftest import add_volume, make_tiny_classifier_file, mrml_scene, phantom
from test_mrml import GEOMETRIES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def processed(tiny_model):
    """One run per geometry, made on first use and shared by the tests (each run is a child process):
    get(name) -> (scene, input node, heatmap node, segmentation node)."""
    with contextlib.ExitStack() as stack:
        runs = {}

        def get(name):
            if name not in runs:
                scene = stack.enter_context(mrml_scene())
                node = add_volume(scene, phantom(), GEOMETRIES[name])
                runs[name] = (scene, node, *CDMSegmentLogic().process(node, model=tiny_model, device="cpu"))
            return runs[name]

        yield get


@pytest.mark.parametrize("name", GEOMETRIES)
def test_process_makes_a_heatmap_and_a_segmentation_on_the_input_grid(processed, tiny_model, name):
    scene, node, heatmap_node, segmentation_node = processed(name)
    before = phantom()
    np.testing.assert_allclose(mrml.ijk_to_ras(heatmap_node), GEOMETRIES[name], atol=1e-9)  # through a file
    heatmap = slicer.util.arrayFromVolume(heatmap_node)
    assert heatmap.shape == before.shape and heatmap.dtype == np.float32 and heatmap.max() > 0
    assert (heatmap[before == 0] == 0).all()
    # What was meant: the same run in this process (a left-handed grid is read back reversed: put back on it).
    expected = segment_volume(tiny_model, [mrml.volume_from_node(node)], device="cpu")
    np.testing.assert_array_equal(heatmap, expected.heatmap)
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    assert segmentation_node.GetSegmentation().GetSegment(segment_id).GetName() == "Tumour"
    mask = mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES[name], before.shape)
    np.testing.assert_array_equal(mask, expected.mask)
    assert 0 < mask.sum() < (before > 0).sum()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)
    np.testing.assert_array_equal(mrml.ijk_to_ras(node), GEOMETRIES[name])
    assert mrml.study_of(scene, segmentation_node) == mrml.study_of(scene, node)


def test_process_takes_a_model_file_path_and_a_list_of_inputs(scene, tiny_model_path):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    outputs = CDMSegmentLogic().process([node], model=str(tiny_model_path), device="cpu", settings=CDMSettings(steps=1),
                                        batchSize=3)
    assert [n.GetClassName() for n in outputs] == ["vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"]
    assert outputs[0].GetName() == "flair heatmap" and outputs[1].GetName() == "flair segmentation"


def test_a_re_run_makes_new_nodes_and_keeps_the_first(processed, tiny_model):
    scene, node, *first = processed("axial")
    second = CDMSegmentLogic().process(node, model=tiny_model, device="cpu", settings=CDMSettings(steps=1))
    assert {n.GetID() for n in first}.isdisjoint(n.GetID() for n in second)
    assert all(scene.GetNodeByID(n.GetID()) is n for n in first)
    assert second[1].GetName() != first[1].GetName()


def test_threshold_remakes_the_segment_from_the_kept_heatmap(processed):
    scene, node, heatmap_node, segmentation_node = processed("coronal")
    heatmap = slicer.util.arrayFromVolume(heatmap_node)
    threshold = float(np.percentile(heatmap[heatmap > 0], 50))
    written = CDMSegmentLogic.remakeSegment(heatmap_node, segmentation_node, threshold)
    assert written is segmentation_node
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES["coronal"],
                                                    heatmap.shape), make_mask(heatmap, threshold))


def test_threshold_never_overwrites_a_segment_the_user_edited(processed):
    scene, node, heatmap_node, segmentation_node = processed("axial")
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    edited = np.zeros(phantom().shape, np.uint8)
    edited[4, 5:9, 5:9] = 1
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml._oriented_image(edited, GEOMETRIES["axial"]), segmentation_node, segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    written = CDMSegmentLogic.remakeSegment(heatmap_node, segmentation_node, 0.0)
    assert written is not segmentation_node
    np.testing.assert_array_equal(mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES["axial"],
                                                    edited.shape), edited)
    assert mrml.study_of(scene, written) == mrml.study_of(scene, heatmap_node)


def test_input_errors_are_plain_sentences(scene, tiny_model):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    with pytest.raises(CDMSegmentError, match=r"expects 1 modality \(FLAIR\), got 2 inputs"):
        CDMSegmentLogic().process([node, node], model=tiny_model, device="cpu")
    with pytest.raises(CDMSegmentError, match="target class 2 is not one of this model's classes: 1 \\(tumour\\)"):
        CDMSegmentLogic().process(node, model=tiny_model, targetClass=2, device="cpu")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(CDMSegmentError, match="hardenTransform=True"):
        CDMSegmentLogic().process(node, model=tiny_model, device="cpu")
    outputs = CDMSegmentLogic().process(node, model=tiny_model, device="cpu", hardenTransform=True)
    assert outputs[0].GetParentTransformNode() is None and node.GetParentTransformNode() is transform


def _registry_with_remote_model(tmp_path, url, sha256, size_bytes):
    registry = tmp_path / "Models" / "models.json"
    registry.parent.mkdir()
    registry.write_text(json.dumps({"models": [{"name": "remote-tiny", "file": "remote-tiny.pt", "kind": "diffusion",
                                                "url": url, "sha256": sha256, "size_bytes": size_bytes,
                                                "default": True}]}))
    return registry


def test_a_registered_model_is_downloaded_once_then_used(scene, tiny_model_path, http_server, tmp_path):
    shutil.copy(tiny_model_path, http_server.directory / "tiny.pt")
    registry = _registry_with_remote_model(tmp_path, f"{http_server.url}/tiny.pt", sha256_of(tiny_model_path),
                                           tiny_model_path.stat().st_size)
    logic = CDMSegmentLogic(cacheDir=tmp_path / "cache", registry=registry)
    assert logic.downloadNeeded("remote-tiny")["name"] == "remote-tiny"
    reports = []
    model = logic.fetchModel(progress=lambda done, total: reports.append((done, total)))
    assert model.sha256 == sha256_of(tiny_model_path) and reports[-1][0] == reports[-1][1]
    assert logic.downloadNeeded("remote-tiny") is None
    (http_server.directory / "tiny.pt").unlink()
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    assert len(logic.process(node, model="remote-tiny", device="cpu")) == 2


def test_a_tampered_download_is_refused(tiny_model_path, http_server, tmp_path):
    shutil.copy(tiny_model_path, http_server.directory / "tiny.pt")
    registry = _registry_with_remote_model(tmp_path, f"{http_server.url}/tiny.pt", "0" * 64,
                                           tiny_model_path.stat().st_size)
    logic = CDMSegmentLogic(cacheDir=tmp_path / "cache", registry=registry)
    with pytest.raises(ModelFileError, match="does not match its SHA256"):
        logic.fetchModel("remote-tiny")
    assert logic.downloadNeeded("remote-tiny") is not None


def test_a_classifier_is_loaded_as_a_classifier(scene, tiny_model_path):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    with pytest.raises(ModelFileError, match="is a diffusion model, but a classifier model is needed"):
        CDMSegmentLogic().process(node, model=str(tiny_model_path), method="cg-cdm", classifier=str(tiny_model_path),
                                  device="cpu")


@pytest.fixture
def guided_registry(tmp_path, tiny_model_path):
    """A registry with the tiny diffusion model and the classifier registered to guide it (CG-CDM),
    the classifier carrying a measured scale and threshold."""
    models = tmp_path / "Models"
    models.mkdir()
    shutil.copy(tiny_model_path, models / "tiny.pt")
    classifier_sha = make_tiny_classifier_file(models / "tiny-classifier.pt",
                                               defaults={"guidance_scale": 2.0, "cg_cdm_threshold": 1e-4})
    registry = models / "models.json"
    registry.write_text(json.dumps({"models": [
        {"name": "tiny", "file": "tiny.pt", "kind": "diffusion", "default": True, "classifier": "tiny-classifier",
         "sha256": sha256_of(tiny_model_path)},
        {"name": "tiny-classifier", "file": "tiny-classifier.pt", "kind": "classifier", "sha256": classifier_sha}]}))
    return registry


def test_cgcdm_uses_the_registered_classifier_with_its_measured_scale_and_threshold(scene, guided_registry):
    node = add_volume(scene, phantom(), np.diag([1.0, 1.0, 2.0, 1.0]))
    logic = CDMSegmentLogic(registry=guided_registry)
    assert logic.classifierFor(logic.fetchModel("tiny")) == "tiny-classifier"
    run = dict(model="tiny", device="cpu")
    heatmap_node, segmentation_node = logic.process(node, method="cg-cdm", settings=CDMSettings(steps=1), **run)
    guided = slicer.util.arrayFromVolume(heatmap_node)
    at_measured_scale = slicer.util.arrayFromVolume(logic.process(
        node, method="cg-cdm", settings=CDMSettings(steps=1, guidance_scale=2.0), **run)[0])
    unguided = slicer.util.arrayFromVolume(logic.process(node, method="cdm", settings=CDMSettings(steps=1), **run)[0])
    np.testing.assert_allclose(guided, at_measured_scale, atol=1e-6)
    assert np.abs(guided - unguided).max() > 1e-3 * np.abs(unguided).max()  # the classifier did guide it
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    mask = mrml.segment_mask(segmentation_node, segment_id, mrml.ijk_to_ras(node), guided.shape)
    content = slicer.util.arrayFromVolume(node) != 0
    np.testing.assert_array_equal(mask > 0, make_mask(guided, 1e-4, content, 0) > 0)  # the classifier's threshold
    assert 0 < (mask > 0).sum() < content.sum()


def segment_editor(scene, segmentation_node, source_node):
    """Slicer's Segment Editor logic (the one behind the Segment Editor module) on a segmentation."""
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetSegmentationNode(segmentation_node)
    editor.SetSourceVolumeNode(source_node)
    editor.SetCurrentSegmentID(segmentation_node.GetSegmentation().GetNthSegmentID(0))
    editor.UpdateReferenceGeometryImage()
    return editor


@pytest.mark.parametrize("name", ["sagittal", "oblique"])
def test_the_segment_editor_edits_the_result_on_the_input_grid_and_the_slider_keeps_the_edit(processed, name):
    scene, node, heatmap_node, segmentation_node = processed(name)
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    shape = slicer.util.arrayFromVolume(node).shape
    editor = segment_editor(scene, segmentation_node, node)
    reference = editor.GetReferenceGeometryImage()
    assert reference.GetDimensions() == node.GetImageData().GetDimensions()
    image_to_world = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(image_to_world)
    np.testing.assert_allclose([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)],
                               GEOMETRIES[name], atol=1e-9)

    # Paint a block with the editor where the model found nothing, as a user adds a missed part.
    found = mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES[name], shape) > 0
    block = np.zeros(shape, bool)
    block[2:5, 3:7, 4:9] = True
    block &= ~found
    assert block.any()
    editor.ResetModifierLabelmapToDefault()
    modifier = editor.GetModifierLabelmap()
    numpy_support.vtk_to_numpy(modifier.GetPointData().GetScalars()).reshape(shape)[:] = block
    modifier.Modified()
    editor.SaveStateForUndo()
    editor.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, editor.ModificationModeAdd, False, True)
    edited = mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES[name], shape) > 0
    np.testing.assert_array_equal(edited, found | block)  # the edit landed on the voxels painted

    remade = CDMSegmentLogic.remakeSegment(heatmap_node, segmentation_node, 0.0)
    assert remade is not segmentation_node
    np.testing.assert_array_equal(mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES[name], shape) > 0,
                                  edited)



def _paint(segmentation_node, segment_id, grid, shape):
    """A user's edit: a block painted into the segment."""
    edited = np.zeros(shape, np.uint8)
    edited[4, 5:9, 5:9] = 1
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml._oriented_image(edited, grid), segmentation_node, segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return edited


def test_a_run_writes_into_the_chosen_segmentation_and_keeps_its_other_segments(scene, tiny_model):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    other = chosen.GetSegmentation().AddEmptySegment("ventricles", "ventricles")
    painted = _paint(chosen, other, GEOMETRIES["axial"], phantom().shape)
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    heatmap_node, written = CDMSegmentLogic().process(node, model=tiny_model, device="cpu", outputSegmentation=chosen)
    assert written is chosen and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    segmentation = chosen.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == [
        "ventricles", "Tumour"]
    expected = segment_volume(tiny_model, [mrml.volume_from_node(node)], device="cpu").mask
    tumour = segmentation.GetSegmentIdBySegmentName("Tumour")
    np.testing.assert_array_equal(mrml.segment_mask(chosen, tumour, GEOMETRIES["axial"], expected.shape), expected)
    np.testing.assert_array_equal(mrml.segment_mask(chosen, other, GEOMETRIES["axial"], expected.shape), painted)
    # A new threshold re-makes the run's segment, not the first one.
    assert CDMSegmentLogic.remakeSegment(heatmap_node, chosen, 0.0) is chosen
    np.testing.assert_array_equal(mrml.segment_mask(chosen, other, GEOMETRIES["axial"], expected.shape), painted)
    assert mrml.segment_mask(chosen, tumour, GEOMETRIES["axial"], expected.shape).sum() > expected.sum()


def test_a_rerun_into_a_segmentation_never_replaces_an_edit_unless_asked(scene, tiny_model):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    logic, shape = CDMSegmentLogic(), phantom().shape
    first = logic.process(node, model=tiny_model, device="cpu")[-1]
    assert logic.editedSegments(first, node, ["tumour"]) == []
    tumour = first.GetSegmentation().GetSegmentIdBySegmentName("Tumour")
    edited = _paint(first, tumour, GEOMETRIES["axial"], shape)
    assert logic.editedSegments(first, node, ["tumour"]) == ["Tumour"]

    kept = logic.process(node, model=tiny_model, device="cpu", outputSegmentation=first)[-1]
    assert kept is not first and kept.GetScene() is scene
    np.testing.assert_array_equal(mrml.segment_mask(first, tumour, GEOMETRIES["axial"], shape), edited)

    replaced = logic.process(node, model=tiny_model, device="cpu", outputSegmentation=first, replaceEdited=True)[-1]
    assert replaced is first and first.GetSegmentation().GetNumberOfSegments() == 1
    np.testing.assert_array_equal(mrml.segment_mask(first, tumour, GEOMETRIES["axial"], shape),
                                  mrml.segment_mask(kept, kept.GetSegmentation().GetNthSegmentID(0),
                                                    GEOMETRIES["axial"], shape))
    assert logic.editedSegments(first, node, ["tumour"]) == []


def test_the_default_input_is_found_without_a_collection_to_release(scene):
    """scene.GetNodesByClass returns a collection its caller must UnRegister; mrml.default_input_volume walks
    the scene by index instead, and skips what is not a plain scalar volume."""
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    assert mrml.default_input_volume(scene) is node
    sources = [p.read_text() for p in (ROOT / "CDMSegment").rglob("*.py")]
    assert not any("GetNodesByClass(" in source for source in sources)
