"""The CAM baselines (Grad-CAM, Grad-CAM++, Score-CAM, LayerCAM) from the ``grad-cam`` library.

They run on the noise-aware classifier at t = 0 (the clean slice), with its last encoder
convolution as the target layer, and explain the target class. The library is used as is;
this file only adapts the classifier to it. Every CAM map comes back min-max scaled to
[0, 1] per slice by the library itself, so on a healthy slice its maximum is 1 as well:
a volume-level threshold cannot tell healthy slices from lesion slices with a CAM, only
the image-level score could, and the paper's baselines do not use it either.
"""

import contextlib
import importlib.util
import io
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

from ..core.errors import CDMSegmentError
from ..core.names import CAM_METHODS


def _define_missing_torchvision_ops() -> None:
    """Let ``import torchvision`` succeed when its compiled ops cannot load.

    grad-cam imports torchvision. PyPI's torchvision wheels are CUDA builds; beside a CPU-only
    torch their ``_C.so`` fails to load, so ``torchvision::nms`` is never defined, and
    ``torchvision/_meta_registrations.py`` then calls ``torch.library.register_fake`` on it
    unconditionally and the import dies with "operator torchvision::nms does not exist".
    Defining the two schemas it registers fakes for (copied from torchvision's csrc/ops/nms.cpp
    and quantized/cpu/qnms_kernel.cpp) lets the import finish. The ops get no kernel: calling
    them would still fail, but the CAM classes use only torchvision's pure-Python parts.
    A torchvision whose ``_C`` loads defines the ops itself, and defining them here first
    would abort the process, so the schemas are added only after that load has failed.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for library in sorted(Path(list(spec.submodule_search_locations)[0]).glob("_C*.so")):
        try:
            torch.ops.load_library(str(library))
            return
        except OSError:
            break
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def cam_classes() -> Dict[str, type]:
    """Method name -> the grad-cam class; imported on first use (grad-cam is an optional dependency)."""
    _define_missing_torchvision_ops()
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
    except ImportError:
        raise CDMSegmentError("the CAM baselines need the grad-cam package: pip install 'grad-cam>=1.5'") from None
    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM, "layercam": LayerCAM}


class ClassifierAtTimeZero(nn.Module):
    """x (B, C, H, W) -> logits of ``classifier(x, t = 0)``, with its CAM target layer as a hookable module.

    ``target_layer`` is an identity on the output of ``classifier.features``: grad-cam needs
    forward hooks on the layer it explains, and hooks on modules inside a TorchScript model
    file never run, while hooks on this Python module do.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.target_layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.classifier.classify_features(self.target_layer(self.classifier.features(x, t)))


def cam_heatmap(method: str, classifier: nn.Module, x_0: torch.Tensor, target_class: int = 1) -> torch.Tensor:
    """The ``method`` CAM of ``target_class`` for a batch of slices.

    classifier: has ``features(x, t)`` (the target layer's output) and ``classify_features(h)``.
    x_0: (B, C, H, W) in [-1, 1]. Returns (B, H, W) float32 in [0, 1] on x_0's device
    (each slice min-max scaled by grad-cam).
    """
    classes = cam_classes()
    if method not in classes:
        raise CDMSegmentError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = ClassifierAtTimeZero(classifier)
    targets = [ClassifierOutputTarget(target_class) for _ in range(x_0.shape[0])]
    # Score-CAM draws a tqdm bar per slice on stderr; thousands of them would bury the evaluation's own log
    quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
    with torch.enable_grad(), quiet, classes[method](model=model, target_layers=[model.target_layer]) as cam:
        maps = cam(input_tensor=x_0.float(), targets=targets)
    return torch.from_numpy(maps).to(x_0.device)


def build_cam_method(method: str, classifier, target_class: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The registry's interface: fn(x_0 (B, C, H, W), slice_ids (B,)) -> (B, H, W); classifier: a LoadedModel."""
    cam_classes()  # fail now, not on the first batch, when grad-cam is missing

    def heatmap(x_0: torch.Tensor, slice_ids: torch.Tensor) -> torch.Tensor:
        return cam_heatmap(method, classifier.network, x_0, target_class)

    return heatmap
