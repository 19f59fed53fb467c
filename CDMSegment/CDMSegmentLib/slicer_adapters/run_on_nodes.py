"""The volume runner on MRML nodes, in a child process: what the Slicer module's logic and panel do, usable
without Qt.

``start_run`` takes checked copies of the input nodes and starts the command line's ``segment`` on them
in a child process (child_process.ChildRun); once it has finished, ``add_results`` re-checks that the
inputs are still in the scene and reads the run's files into it through Slicer's readers
(result_files.py). The module's logic chains them (``CDMSegmentLogic.process``).
"""

from typing import List, Optional, Sequence, Union

import slicer

from . import mrml
from .child_process import ChildRun
from .result_files import add_result_files
from ..core.errors import CDMSegmentError
from ..core.image import Volume
from ..core.model_description import ModelDescription, check_inputs
from ..core.settings import CDMSettings


def prepare_inputs(nodes: Sequence, model: ModelDescription, harden: bool = False) -> List[Volume]:
    """Copies of the input nodes as Volumes (world geometry), checked against the model."""
    labels = model.modalities + [f"input {n + 1}" for n in range(len(model.modalities), len(nodes))]
    volumes = [mrml.volume_from_node(node, harden, label) for node, label in zip(nodes, labels)]
    check_inputs(model, volumes)
    return volumes


def segment_arguments(model: ModelDescription, *, classifier: Optional[ModelDescription] = None,
                      method: str = "cdm", device: str = "auto", axis: Union[str, int] = "auto",
                      batch_size: Optional[int] = None, target_class: Optional[int] = None,
                      settings: CDMSettings = CDMSettings(), force: bool = False) -> List[str]:
    """The ``cdmsegment segment`` options for a run with these models and settings: the models are passed by
    path, and the child process loads their networks (Slicer's process holds only their descriptions). batch_size:
    0 or None leaves it to the child (``core.runner.default_batch_size`` for the device it runs on). force: run on
    an input that does not look like what the model takes (otherwise the child refuses it in one line)."""
    arguments = ["--model", str(model.path), "--method", method, "--device", device, "--axis", str(axis)]
    if batch_size:
        arguments += ["--batch-size", str(batch_size)]
    if classifier is not None:
        arguments += ["--classifier", str(classifier.path)]
    if target_class is not None:
        arguments += ["--target-class", str(target_class)]
    if force:
        arguments.append("--force")
    return arguments + settings.command_line()


def start_run(nodes: Sequence, model: ModelDescription, *, harden: bool = False, python: Optional[str] = None,
              cache_dir=None, **options) -> ChildRun:
    """Check and copy the inputs, then start the run in a child process (options: see segment_arguments);
    cache_dir: the model cache the child uses (its ONNX graphs), default the per-user one."""
    return ChildRun(prepare_inputs(nodes, model, harden), segment_arguments(model, **options), python, cache_dir)


def _in_scene(node) -> bool:
    scene = node.GetScene()
    return scene is not None and scene.GetNodeByID(node.GetID()) is node


def add_results(run: ChildRun, nodes: Sequence, name: Optional[str] = None, into=None,
                replace_edited: bool = False) -> List:
    """A finished run's heatmap volume(s) and segmentation as new nodes in the first input's study;
    returns them (heatmaps first). ``into``: a segmentation to write the segments into instead of a new one
    (mrml.merge_segments); when that would replace a segment the user edited and ``replace_edited`` is not set,
    the result stays a new segmentation and the edit is kept. An input deleted during the run is an error and
    adds nothing."""
    for node in nodes:
        if not _in_scene(node):
            raise CDMSegmentError(f"the input volume {node.GetName()!r} was deleted while CDMSegment ran; "
                                  "nothing was added to the scene")
    summary = run.summary
    grid = mrml.RAS_FROM_LPS @ run.ijk_to_lps
    outputs = add_result_files(nodes[0], grid, run.output_paths(), summary["class_names"],
                               summary["min_component_voxels"], name or nodes[0].GetName(), summary.get("refinement"))
    if into is not None and _in_scene(into):
        shape = slicer.util.arrayFromVolume(outputs[0]).shape
        if mrml.merge_segments(into, outputs[-1], grid, shape, replace_edited):
            into.GetScene().RemoveNode(outputs[-1])
            outputs[-1] = into
    return outputs
