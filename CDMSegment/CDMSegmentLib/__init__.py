"""CDMSegment: weakly supervised segmentation with conditional diffusion models (Hu et al., MICCAI 2023).

The package map, one concern per sub-package, imports in one direction only
(``Testing/test_layering.py`` holds the rules): ``core`` is the inference path a
Slicer user runs (the noise schedule, the conditional UNet, the CDM heatmap of
Algorithm 1, the method registry, model files and their download, the volume
runner, slice geometry, thresholds); ``baselines`` holds the methods the paper
compares against (the CAM family, CG-Diff), which the registry imports only
when one is asked for; ``data`` reads cases, slice labels and splits, and makes
phantoms; ``training`` trains the diffusion model and the classifier,
calibrates defaults and exports model files; ``evaluation`` scores methods on
slices and whole volumes; ``cli`` is the ``cdmsegment`` command and its file
I/O; ``slicer_adapters`` turns MRML nodes into the core's volumes and results
back into nodes, and is the only code importing slicer or vtk. Nothing here
imports qt or ctk.
"""

__version__ = "0.1.0"
