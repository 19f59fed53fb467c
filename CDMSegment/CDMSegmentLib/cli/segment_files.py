"""Segment files on disk: read a case, run the volume runner per class, write heatmap(s) and a .seg.nrrd.

This is the function behind ``cdmsegment segment``, which the Slicer module runs in a child process
(``slicer_adapters.child_process``) on a copy of the input node.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..core.errors import CDMSegmentError
from ..core.image import read_volume
from ..core.modelfile import load_model, registered_classifier
from ..core.settings import CDMSettings
from .writers import atomic_outputs, file_stem, write_heatmap, write_segmentation
from ..core.runner import segment_volume


@dataclass
class SegmentSummary:
    heatmap_paths: list
    segmentation_path: Path
    class_names: list
    thresholds: list  # per class, in heatmap units
    min_component_voxels: int
    slices_total: int
    slices_run: int
    voxels_segmented: int
    volume_ml: float
    seconds: float
    device: str

    def line(self) -> str:
        files = ", ".join(str(p) for p in self.heatmap_paths + [self.segmentation_path])
        return (f"{self.slices_run} of {self.slices_total} slices run, {self.voxels_segmented} voxels segmented "
                f"({self.volume_ml:.1f} ml), {self.seconds:.1f} s on {self.device}: {files}")

    def to_json(self) -> dict:
        """The summary as plain JSON values (paths as strings), as the --progress-lines summary carries it."""
        return {k: [str(p) for p in v] if k == "heatmap_paths" else str(v) if isinstance(v, Path) else v
                for k, v in asdict(self).items()}


def segment_files(inputs: Sequence[Union[str, Path]], output_dir: Union[str, Path], *, model=None,
                  classifier=None, target_class: Optional[int] = None, settings: CDMSettings = CDMSettings(),
                  overwrite: bool = False, log: Callable[[str], None] = print,
                  phase: Callable[[str], None] = lambda name: None,
                  progress: Optional[Callable[[int, int], None]] = None, **run_options) -> SegmentSummary:
    """Read one case (one input per model modality), segment each class, write ``<stem>_heatmap.nrrd``
    (``<stem>_<class>_heatmap.nrrd`` for several classes) and ``<stem>.seg.nrrd`` in ``output_dir``.

    phase(name) says what the run does now; progress(done, total) counts slices over all classes.
    """
    start = time.perf_counter()
    phase("loading the model")
    diffusion = load_model(model)
    if classifier is None and run_options.get("method") == "cg-cdm":
        classifier = registered_classifier(diffusion)  # None (then a clear error) when it has none
    guide = load_model(classifier, kind="classifier") if classifier is not None else None
    phase("reading the input")
    volumes = [read_volume(p) for p in inputs]
    params = settings.params(diffusion, guide)
    min_voxels = settings.min_component_voxels(diffusion, volumes[0].spacing_mm)
    classes = diffusion.target_classes(target_class)
    output_dir = Path(output_dir)
    stem = file_stem(inputs[0])
    names = [diffusion.class_names[c] for c in classes]
    heatmap_paths = [output_dir / (f"{stem}_heatmap.nrrd" if len(classes) == 1 else f"{stem}_{n}_heatmap.nrrd")
                     for n in names]
    seg_path = output_dir / f"{stem}.seg.nrrd"
    existing = [p for p in heatmap_paths + [seg_path] if p.exists()]
    if existing and not overwrite:
        raise CDMSegmentError(f"{existing[0]} already exists; choose another output folder or pass --overwrite")
    phase("segmenting")
    results = []
    for n, c in enumerate(classes):
        def class_progress(done: int, total: int, n: int = n) -> None:
            progress(n * total + done, len(classes) * total)

        results.append(segment_volume(diffusion, volumes, target_class=c, params=params, classifier=guide, log=log,
                                      threshold=settings.threshold, min_component_voxels=min_voxels,
                                      progress=class_progress if progress else None, **run_options))
    phase("writing the results")
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_outputs(heatmap_paths + [seg_path]) as tmp:
        for path, result in zip(tmp, results):
            write_heatmap(path, result.heatmap, volumes[0])
        write_segmentation(tmp[-1], {n: r.mask for n, r in zip(names, results)}, volumes[0])
    voxels = int(sum(int(r.mask.sum()) for r in results))
    voxel_ml = float(np.prod(volumes[0].spacing_mm)) / 1000.0
    return SegmentSummary(heatmap_paths, seg_path, names, [r.threshold for r in results], min_voxels,
                          results[0].slices_total, results[0].slices_run, voxels, voxels * voxel_ml,
                          time.perf_counter() - start, results[0].device)
