"""The volume runner on MRML nodes: what the Slicer module's logic does, usable without Qt.

Three steps, so that a panel can keep the scene on the main thread and the model off it:
``prepare_inputs`` (main thread: checked copies of the input nodes), ``run_model`` (any
thread, never touches MRML) and ``add_results`` (main thread: new nodes beside the input).
``segment_nodes`` chains them for the console. Nodes are read and made only through mrml.py.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import mrml
from ..core.image import Volume
from ..core.methods import CDMParams
from ..core.modelfile import LoadedModel
from ..core.runner import SegmentationResult, check_inputs, segment_volume


def prepare_inputs(nodes: Sequence, model: LoadedModel, harden: bool = False) -> Tuple[List[Volume], np.ndarray]:
    """Copies of the input nodes as Volumes, checked against the model, and the first one's world IJK-to-RAS."""
    labels = model.modalities + [f"input {n + 1}" for n in range(len(model.modalities), len(nodes))]
    volumes = [mrml.volume_from_node(node, harden, label) for node, label in zip(nodes, labels)]
    check_inputs(model, volumes)
    return volumes, mrml.world_ijk_to_ras(nodes[0], harden)


def run_model(model: LoadedModel, volumes: Sequence[Volume], classes: Sequence[int], *,
              progress: Optional[Callable[[int, int], None]] = None, cancel=None, log: Callable[[str], None] = print,
              **options) -> Dict[str, SegmentationResult]:
    """{class name: result} for each class; progress(done, total) counts slices over all classes."""
    results = {}
    for n, c in enumerate(classes):
        def class_progress(done: int, total: int, n: int = n) -> None:
            progress(n * total + done, len(classes) * total)

        results[model.class_names[c]] = segment_volume(
            model, volumes, target_class=c, progress=class_progress if progress else None, cancel=cancel, log=log,
            **options)
    return results


def add_results(reference_node, ijk_to_ras: np.ndarray, results: Dict[str, SegmentationResult],
                name: Optional[str] = None) -> List:
    """New heatmap volume(s) and a segmentation in the reference node's scene and study; returns them."""
    return mrml.add_result_nodes(reference_node.GetScene(), reference_node, ijk_to_ras,
                                 {c: r.heatmap for c, r in results.items()}, {c: r.mask for c, r in results.items()},
                                 name or reference_node.GetName())


def summary(results: Dict[str, SegmentationResult]) -> str:
    """One log line for a run."""
    return "; ".join(f"{c}: {r.slices_run} of {r.slices_total} slices, {int(r.mask.sum())} voxels, "
                     f"{r.seconds:.1f} s on {r.device}" for c, r in results.items())


def segment_nodes(nodes: Sequence, model: LoadedModel, *, target_class: Optional[int] = None, preset: str = "model",
                  noise_level=None, steps=None, tau=None, noise_draws=None, guidance_scale=None,
                  classifier: Optional[LoadedModel] = None, harden: bool = False, progress=None, cancel=None,
                  log: Callable[[str], None] = print, **run_options) -> List:
    """prepare_inputs -> run_model -> add_results on the calling thread; returns the new nodes
    (heatmaps first, the segmentation last). Cancelled or failed runs add nothing to the scene."""
    volumes, ijk_to_ras = prepare_inputs(nodes, model, harden)
    params = CDMParams.for_model(model, preset, classifier, noise_level=noise_level, steps=steps, tau=tau,
                                 noise_draws=noise_draws, guidance_scale=guidance_scale)
    results = run_model(model, volumes, model.target_classes(target_class), progress=progress, cancel=cancel,
                        log=log, params=params, classifier=classifier, **run_options)
    log(summary(results))
    return add_results(nodes[0], ijk_to_ras, results)
