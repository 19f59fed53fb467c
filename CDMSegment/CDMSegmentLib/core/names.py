"""The names a run is chosen by (heatmap methods, slice axes), without torch: the command line checks them as
it parses, before a model loads; core/methods.py and core/slicing.py give them their meaning."""

CDM_METHODS = ("cdm", "cg-cdm")
CAM_METHODS = ("gradcam", "gradcam++", "scorecam", "layercam")
METHODS = CDM_METHODS + CAM_METHODS + ("cg-diff",)
CLASSIFIER_METHODS = ("cg-cdm", "cg-diff") + CAM_METHODS  # the methods that need a noise-aware classifier

AXIS_NAMES = {"axial": 0, "coronal": 1, "sagittal": 2}  # canonical array axes (S, P, L)
