"""CDMSegment core: weakly supervised segmentation with conditional diffusion models.

Pure Python on numpy/torch/SimpleITK. Never imports qt or ctk; only ``mrml.py``
imports slicer or vtk.
"""

__version__ = "0.1.0"
