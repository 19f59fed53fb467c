"""Segment files on disk: read a case, run the volume runner per class, write heatmap(s) and a .seg.nrrd.

This is the function behind ``cdmsegment segment``, which the Slicer module runs in a child process
(``slicer_adapters.child_process``) on a copy of the input node.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..core.errors import CDMSegmentError
from ..core.names import CLASSIFIER_METHODS
from ..core.model_description import registered_classifier
from ..core.modelfile import load_model
from ..core.reading import read_volume
from ..core.runner import segment_volume
from ..core.settings import CDMSettings
from .writers import (atomic_outputs, check_not_existing, check_not_inputs, check_output_folder, check_output_names,
                      file_stem, write_heatmap, write_segmentation)


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
    model: str  # name and version
    model_sha256: str
    warnings: list  # the input's borderline plausibility findings, shown beside the result
    engine: str = "torch"  # what evaluated the network (core/engine.py)
    refinement: Optional[dict] = None  # the lesion-intensity refinement of the mask (core/runner.refine_mask)
    method: str = "cdm"  # core/methods.METHODS
    classifier: Optional[str] = None  # name and version of the classifier the method used, if any
    classifier_sha256: Optional[str] = None
    guidance_scale: Optional[float] = None  # s, for CG-CDM
    heatmap_maxima: Optional[list] = None  # per class, in heatmap units
    supported_voxels: int = 0  # of voxels_segmented, those the heatmap's support added (core/runner.refine_mask)

    def line(self) -> str:
        """The run in one line: what was segmented, by which method and weights (SHA256), at which threshold,
        and into which files; says so when no voxel of the heatmap reached the threshold, or when the heatmap
        did but nothing was left after the speck removal and refinement."""
        files = ", ".join(str(p) for p in self.heatmap_paths + [self.segmentation_path])
        warned = "".join(f"; warning: {w}" for w in self.warnings)
        thresholds = ", ".join(f"{t:.3g}" for t in self.thresholds)
        supporting = bool(self.refinement and self.refinement.get("heatmap_support"))
        if (self.heatmap_maxima and all(m < t for m, t in zip(self.heatmap_maxima, self.thresholds))
                and self.voxels_segmented == 0):
            note = (f"; no voxel of the heatmap reached the threshold {thresholds} (its maximum: "
                    f"{', '.join(f'{m:.3g}' for m in self.heatmap_maxima)})")
        elif self.voxels_segmented == 0 and self.heatmap_maxima:
            removed = f"the removal of components under {self.min_component_voxels} voxels (--min-component-ml)"
            if self.refinement:
                removed += " and the lesion-intensity refinement"
                removed += " (no bright region the heatmap supports either)" if supporting else ""
                if self.refinement.get("min_finding_voxels", 0) > 1:
                    removed += (f", then of the findings under {self.refinement['min_finding_voxels']} voxels (the "
                                "model's min_finding_ml)")
            note = f"; the heatmap reached the threshold, but nothing was left after {removed}"
        else:
            note = "; the CDM's mask delineated by the lesion's intensity" if self.refinement else ""
            note += ", with the bright regions its heatmap supports" if self.supported_voxels else ""
        by = "" if self.method == "cdm" else f" by {self.method}"
        guided = "" if self.classifier is None else (
            f" and classifier {self.classifier} (SHA256 {self.classifier_sha256}"
            + (f", guidance scale {self.guidance_scale:g})" if self.guidance_scale is not None else ")"))
        return (f"{self.slices_run} of {self.slices_total} slices run, {self.voxels_segmented} voxels segmented "
                f"({self.volume_ml:.1f} ml{note}), {self.seconds:.1f} s on {self.device} ({self.engine}){by} with model "
                f"{self.model} (SHA256 {self.model_sha256}){guided} at threshold {thresholds}: {files}{warned}")

    def to_json(self) -> dict:
        """The summary as plain JSON values (paths as strings), as the --progress-lines summary carries it."""
        return {k: [str(p) for p in v] if k == "heatmap_paths" else str(v) if isinstance(v, Path) else v
                for k, v in asdict(self).items()}


def provenance(model, classifier, method: str, params, seed: int) -> dict:
    """What a result was made with, for its files' headers: the model (name, version, SHA256), the method, the
    classifier when the method used one, the sampler's settings the method used (JSON: CDMParams.used_by) and the
    seed."""
    made = {"Model": f"{model.metadata['name']} {model.metadata['version']}", "ModelSHA256": model.sha256,
            "Method": method, "Settings": json.dumps(params.used_by(method), sort_keys=True), "Seed": str(seed)}
    if classifier is not None:
        made.update(Classifier=f"{classifier.metadata['name']} {classifier.metadata['version']}",
                    ClassifierSHA256=classifier.sha256)
    return made


def result_provenance(results) -> dict:
    """The threshold of each class's heatmap (heatmap units, comma-separated) and the lesion-intensity refinement
    (JSON; absent without one), from the runner's results."""
    made = {"Threshold": ",".join(repr(float(r.threshold)) for r in results)}
    if results[0].refinement:
        made["Refinement"] = json.dumps(results[0].refinement, sort_keys=True)
    return made


def input_list(inputs) -> list:
    """The inputs as a list of paths, one per modality; a lone path (a str or Path, which would be read letter
    by letter) or anything else is refused with a line saying what to write."""
    if isinstance(inputs, (str, bytes, Path)):
        raise CDMSegmentError(f"inputs must be a list of paths, one per modality, not a single "
                              f"{type(inputs).__name__}: write [{str(inputs)!r}]")
    try:
        paths = list(inputs)
    except TypeError:
        raise CDMSegmentError(f"inputs must be a list of paths, one per modality, got {type(inputs).__name__}") \
            from None
    wrong = [p for p in paths if not isinstance(p, (str, Path))]
    if wrong or not paths:
        raise CDMSegmentError(f"inputs must be a list of paths (str or Path), one per modality, got "
                              f"{type(wrong[0]).__name__ if wrong else 'an empty list'}")
    return paths


def segment_files(inputs: Sequence[Union[str, Path]], output_dir: Union[str, Path], *, model=None,
                  classifier=None, target_class: Optional[int] = None, settings: CDMSettings = CDMSettings(),
                  overwrite: bool = False, series: Sequence[str] = (), keep: Sequence[Union[str, Path]] = (),
                  log: Callable[[str], None] = print,
                  phase: Callable[[str], None] = lambda name: None,
                  progress: Optional[Callable[[int, int], None]] = None, **run_options) -> SegmentSummary:
    """Read one case (one input per model modality), segment each class, write ``<stem>_heatmap.nrrd``
    (``<stem>_<class>_heatmap.nrrd`` for several classes) and ``<stem>.seg.nrrd`` in ``output_dir``.

    series: SeriesInstanceUIDs choosing among the series of a DICOM folder. keep: other files (or DICOM
    folders) no output may replace, besides the inputs (the other cases of a cohort). The output folder is
    checked before the model loads, the output names before it runs; run_options go to segment_volume
    (``force`` among them). phase(name) says what the run does now; progress(done, total) counts slices
    over all classes.
    """
    start = time.perf_counter()
    inputs = input_list(inputs)
    if series and not any(Path(p).is_dir() for p in inputs):
        raise CDMSegmentError("--series chooses among the series of a DICOM folder, but no input is a folder; "
                              "leave it out, or give the folder")
    phase("reading the input")
    output_dir = Path(output_dir)
    volumes = [read_volume(p, series) for p in inputs]
    check_output_folder(output_dir, volumes[0].array.size * 5, log)  # float32 heatmap + uint8 labels, uncompressed
    phase("loading the model")
    diffusion = load_model(model)
    if classifier is None and run_options.get("method") == "cg-cdm":
        classifier = registered_classifier(diffusion)  # None (then a clear error) when it has none
    guide = load_model(classifier, kind="classifier") if classifier is not None else None
    method = run_options.get("method", "cdm")
    uses_guide = guide is not None and method in CLASSIFIER_METHODS
    params = settings.params(diffusion, guide, method)
    min_voxels = settings.min_component_voxels(diffusion, volumes[0].spacing_mm)
    classes = diffusion.target_classes(target_class)
    stem = file_stem(inputs[0])
    names = [diffusion.class_names[c] for c in classes]
    heatmap_paths = [output_dir / (f"{stem}_heatmap.nrrd" if len(classes) == 1 else f"{stem}_{n}_heatmap.nrrd")
                     for n in names]
    seg_path = output_dir / f"{stem}.seg.nrrd"
    check_not_inputs(heatmap_paths + [seg_path], [*inputs, *keep])
    check_output_names(heatmap_paths + [seg_path])
    check_not_existing(heatmap_paths + [seg_path], overwrite)
    phase("segmenting")
    results = []
    for n, c in enumerate(classes):
        def class_progress(done: int, total: int, n: int = n) -> None:
            progress(n * total + done, len(classes) * total)

        results.append(segment_volume(diffusion, volumes, target_class=c, params=params, classifier=guide, log=log,
                                      threshold=settings.threshold, min_component_voxels=min_voxels,
                                      grow_above=settings.grow_above, lesion_intensity=settings.lesion_intensity, progress=class_progress if progress else None, **run_options))
    phase("writing the results")
    made = provenance(diffusion, guide if uses_guide else None, method, params, run_options.get("seed", 0))
    with atomic_outputs(heatmap_paths + [seg_path], overwrite, inputs=[*inputs, *keep]) as tmp:
        for path, result in zip(tmp, results):
            write_heatmap(path, result.heatmap, volumes[0], {**made, **result_provenance([result])})
        write_segmentation(tmp[-1], {n: r.mask for n, r in zip(names, results)}, volumes[0],
                           {**made, **result_provenance(results)})
    voxels = int(sum(int(r.mask.sum()) for r in results))
    voxel_ml = float(np.prod(volumes[0].spacing_mm)) / 1000.0
    return SegmentSummary(heatmap_paths, seg_path, names, [r.threshold for r in results], min_voxels,
                          results[0].slices_total, results[0].slices_run, voxels, voxels * voxel_ml,
                          time.perf_counter() - start, results[0].device,
                          f"{diffusion.metadata['name']} {diffusion.metadata['version']}", diffusion.sha256,
                          results[0].warnings, results[0].engine, results[0].refinement, method,
                          f"{guide.metadata['name']} {guide.metadata['version']}" if uses_guide else None,
                          guide.sha256 if uses_guide else None,
                          params.guidance_scale if method == "cg-cdm" else None,
                          [float(r.heatmap.max()) if r.heatmap.size else 0.0 for r in results],
                          sum(r.supported_voxels for r in results))
