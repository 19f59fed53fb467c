"""CDMSegment: weakly supervised segmentation with a conditional diffusion model (Hu et al., MICCAI 2023).

Thin Slicer layer over CDMSegmentLib: the Widget owns Qt, the Logic owns MRML through
CDMSegmentLib.slicer_adapters.mrml, the core does the rest. Slicer's process never imports torch: models are
described from their files (CDMSegmentLib.core.model_description), and the network is loaded only in the
run's child process. Importing torch here would initialise CUDA and, on Windows, lock torch's files against an
upgrade by the PyTorch extension until Slicer restarts.
"""

# Annotations stay strings until Slicer's parameterNodeWrapper resolves them (typing.get_type_hints):
# under slicer-core, which has no parameterNodeWrapper, the Logic is imported without them.
from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import json
import logging
import sys
import unittest
from pathlib import Path
from typing import Annotated

import slicer
import vtk
from slicer.util import VTKObservationMixin

from CDMSegmentLib.slicer_adapters import mrml

try:  # the Slicer application
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
except ImportError:
    # slicer-core (pytest) has MRML but no Qt, no translations and no scripted-module base classes: minimal
    # bases in their place, so that this file imports and the Logic and the Widget's class order are tested.
    def _(text):
        return text

    def translate(context, text):
        return text

    def parameterNodeWrapper(cls):
        return cls

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            super().__init__()  # as Slicer's: chains to the next base, VTKObservationMixin
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            logging.info(message)

MINIMUM_TORCH_VERSION = "2.1"
DOCUMENTATION_URL = "https://github.com/cdmsegment/SlicerCDMSegment#readme"  # EXTENSION_HOMEPAGE in CMakeLists.txt
RESOURCES = Path(__file__).resolve().parent / "Resources"
# The sample ships with the module: {"file_name", "sha256", "segmentation_file_name", "segmentation_sha256"}
SAMPLE_DESCRIPTION = RESOURCES / "Sample" / "CDMSegmentSample.json"
SAMPLE_DICE_FLOOR = 0.75  # the sample's Dice: 0.997 with the default model, 0.87 with brain-flair-phantom
# While a job runs (the model in its child process, or a model download on a worker thread, which waits
# there for its share of the GIL: worker_thread.YIELD_S), the panel polls it every POLL_MS.
POLL_MS = 40


class CDMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CDMSegment")
        # Slicer's own category names are translated in this context (as its module template does).
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        # The LICENSE's copyright holder; no person or organisation has been named anywhere in the project yet.
        self.parent.contributors = ["CDMSegment authors (https://github.com/cdmsegment)"]
        self.parent.helpText = _("Segments a lesion class from image-level training labels only, with the conditional "
                                 "diffusion model of Hu et al. (MICCAI 2023): a heatmap and an editable segment. "
                                 "Research use only; not a medical device.") + " " + _(
            'See the <a href="{url}">documentation</a> for how to use it, the console API and training your own '
            "model.").format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _("Method: Hu, Chen, Ho, Shi, arXiv 2306.03878.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the sample FLAIR volume with the SampleData module when its description is published."""
    if not SAMPLE_DESCRIPTION.is_file():
        logging.info(f"CDMSegment: no sample registered ({SAMPLE_DESCRIPTION.name} not found)")
        return
    import SampleData

    sample = json.loads(SAMPLE_DESCRIPTION.read_text())
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="CDMSegment", sampleName="CDMSegmentSample", uris=sampleUri(sample["file_name"]),
        fileNames=sample["file_name"],
        checksums=f"SHA256:{sample['sha256']}", nodeNames=Path(sample["file_name"]).name.split(".")[0],
        thumbnailFileName=str(RESOURCES / "Icons" / "CDMSegment.png"))


def torchInstalled() -> bool:
    """Whether torch can be imported, found without importing it (an import can initialise CUDA)."""
    return importlib.util.find_spec("torch") is not None


def torchStatusText(lastRunDevice=None) -> str:
    """The panel's line about PyTorch, read from the installed package's metadata only (importing torch in
    Slicer's process would initialise CUDA and, on Windows, lock torch's files against an upgrade)."""
    if not torchInstalled():
        return _("PyTorch is not installed: Apply offers to install it")
    version = importlib.metadata.version("torch")
    if lastRunDevice:
        return _("PyTorch {version}; the last run was on {device}").format(version=version, device=lastRunDevice)
    return _("PyTorch {version}; the device is chosen when a run starts").format(version=version)


def applyProblem(modelChosen: bool, missingInputs, classifierMissing: bool) -> str:
    """What Apply lacks, for its tooltip ('' when it can run): a model, an input per modality, a classifier."""
    if not modelChosen:
        return _("Choose a model first.")
    if missingInputs:
        return _("Choose the input volume for: {modalities}.").format(modalities=", ".join(missingInputs))
    if classifierMissing:
        return _("CG-CDM needs a classifier registered with this model, and this model has none: choose CDM.")
    return ""


def slicerShowsPipErrors() -> bool:
    """Whether slicer.util.pip_install shows its own error dialog (slicer.packaging, Slicer 5.12 and later)."""
    return importlib.util.find_spec("slicer.packaging") is not None


def selfTestMissing() -> str:
    """What the self-test lacks to run ('' when nothing): PyTorch, or the bundled sample."""
    if not torchInstalled():
        return "PyTorch is not installed (install it from the PyTorch module)"
    if not SAMPLE_DESCRIPTION.is_file():
        return f"the sample ({SAMPLE_DESCRIPTION.name}) is not bundled"
    return ""


def forgetLibraryModules():
    """Drop CDMSegmentLib and its modules from sys.modules, so that the next import reads them from disk."""
    for name in [n for n in sys.modules if n == "CDMSegmentLib" or n.startswith("CDMSegmentLib.")]:
        del sys.modules[name]


def sampleUri(fileName: str) -> str:
    """A file:// URI of a file bundled in Resources/Sample: SampleData copies it like a download, offline."""
    return (RESOURCES / "Sample" / fileName).as_uri()


# Labelled choices for Slicer's enum connector (guiConnectors.py, Slicer 5.6 and later): the combo box shows
# label(), the parameter node stores the member's name. The names are the strings the parameter node held
# before (scenes saved then read back), save "cg-cdm", which is not a name (CDMSegmentLogic.getParameterNode).
class Method(enum.Enum):
    cdm = "cdm"
    cg_cdm = "cg-cdm"

    def label(self):
        return {Method.cdm: _("CDM"), Method.cg_cdm: _("CG-CDM (classifier-guided)")}[self]


class Device(enum.Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"

    def label(self):
        return {Device.auto: _("Automatic"), Device.cuda: _("GPU (CUDA)"), Device.cpu: _("CPU")}[self]


class Axis(enum.Enum):
    auto = "auto"
    axial = "axial"
    coronal = "coronal"
    sagittal = "sagittal"

    def label(self):
        return {Axis.auto: _("Automatic (axial)"), Axis.axial: _("Axial"), Axis.coronal: _("Coronal"),
                Axis.sagittal: _("Sagittal")}[self]


@parameterNodeWrapper
class CDMSegmentParameterNode:
    """What the panel shows, saved with the scene. Input volumes per modality are set by the widget.

    Slicer binds a combo box only to an enum (its labels) or a parameter with a Choice (it fills the box with
    the choices) and sets a spin box's range from WithinRange (unbounded, it would be -inf..inf); test_ui.py
    checks both. The threshold slider is driven by the widget, whose range follows each heatmap.
    outputSegmentation: where the next run writes (None: a new segmentation).
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    method: Method = Method.cdm
    device: Device = Device.auto
    noiseLevel: Annotated[float, WithinRange(0.01, 0.999)] = 0.896
    steps: Annotated[int, WithinRange(1, 1000)] = 10
    tau: Annotated[float, WithinRange(0.0, 0.999)] = 0.95
    noiseDraws: Annotated[int, WithinRange(1, 64)] = 1
    guidanceScale: Annotated[float, WithinRange(0.0, 10000.0)] = 100.0
    lesionIntensity: Annotated[float, WithinRange(0.0, 1.0)] = 0.0  # 0: off (the spin box shows "off")
    minComponentMl: Annotated[float, WithinRange(0.0, 100.0)] = 0.0  # islands under this many ml dropped; 0: none
    axis: Axis = Axis.auto
    batchSize: Annotated[int, WithinRange(0, 1024)] = 0  # 0: automatic, per device (the spin box shows "auto")
    hardenTransform: bool = False
    force: bool = False
    threshold: float = 0.0
    heatmapVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode


class CDMSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console without it (CDMSegmentLib.slicer_adapters.run_on_nodes).

    The model runs in a child process (``startRun``), which the panel polls from a timer and ``process`` waits
    for; ``addResults`` then reads its files into the scene. Models are described and checked here without torch
    (``fetchModel``); only the child process loads their networks.
    """

    def __init__(self, cacheDir=None, registry=None):
        """cacheDir: where downloaded models and the ONNX graphs go, for this process and the runs' child
        processes (default: CDMSegmentLib.core.registry.default_cache_dir, one per user, the same for the panel,
        the console and the command line); registry: a models.json other than the bundled one."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.cacheDir = Path(cacheDir) if cacheDir else None
        self.registry = Path(registry) if registry else None

    def getParameterNode(self):
        node = super().getParameterNode()
        if node.GetParameter("method") == "cg-cdm":  # saved before the method was an enum
            node.SetParameter("method", Method.cg_cdm.name)
        return CDMSegmentParameterNode(node)

    @staticmethod
    def settingsFrom(parameterNode):
        """The CDM settings (CDMSegmentLib.core.settings.CDMSettings) the parameter node holds."""
        from CDMSegmentLib.slicer_adapters.panel_choices import settings_from_parameters
        return settings_from_parameters(parameterNode)

    def downloadNeeded(self, nameOrPath):
        """The registry entry of a model that must be downloaded before use, else None."""
        from CDMSegmentLib.core.download import download_needed
        return download_needed(nameOrPath, self.cacheDir, self.registry)

    def classifierFor(self, model):
        """The name of the classifier registered to guide a model (CG-CDM), or None."""
        from CDMSegmentLib.core.model_description import registered_classifier
        return registered_classifier(model, *([self.registry] if self.registry else []))

    def fetchModel(self, nameOrPath=None, progress=None, cancel=None, kind="diffusion"):
        """A registered model (bundled, or downloaded into the cache on first use) or a model file, checked and
        described without torch (CDMSegmentLib.core.model_description.ModelDescription: metadata, path, SHA256);
        kind: 'diffusion' or 'classifier'. progress(bytes done, bytes total) and cancel (threading.Event):
        downloads. Raises ModelFileError (one line) for a missing, corrupt or foreign file."""
        from CDMSegmentLib.core.download import fetch_model
        return fetch_model(nameOrPath, kind, self.cacheDir, self.registry, progress, cancel)

    def startRun(self, inputVolumeNodes, model=None, targetClass=None, method="cdm", device="auto", settings=None,
                 axis="auto", batchSize=0, classifier=None, hardenTransform=False, force=False):
        """Check and copy the inputs and start the model on them in a child process; returns the run
        (CDMSegmentLib.slicer_adapters.child_process.ChildRun: poll(), progress, eta_seconds(), cancel(), close()).

        inputVolumeNodes: one scalar volume node per model modality (or a single node); model / classifier: a
        registered name, a file path or a described (``fetchModel``) or loaded model (method 'cg-cdm' needs the
        classifier; by default the one registered with the model); settings: CDMSettings, None fields (or None)
        meaning the model's measured defaults; batchSize: slices per batch, 0 (or None) for automatic: the model's
        measured value for the device, else 4 on a CPU and 64 on a GPU (core.runner.default_batch_size); force:
        run on an image that does not look like what the model takes (otherwise refused in one line). The inputs
        are never modified.
        """
        from CDMSegmentLib.core.model_description import ModelDescription
        from CDMSegmentLib.core.settings import CDMSettings
        from CDMSegmentLib.slicer_adapters.run_on_nodes import start_run

        nodes = self.inputList(inputVolumeNodes)
        model = model if isinstance(model, ModelDescription) else self.fetchModel(model)
        if method == "cg-cdm" and classifier is None:
            classifier = self.classifierFor(model)
        if classifier is not None and not isinstance(classifier, ModelDescription):
            classifier = self.fetchModel(classifier, kind="classifier")
        return start_run(nodes, model, harden=hardenTransform, classifier=classifier, method=method, device=device,
                         axis=axis, batch_size=batchSize, target_class=targetClass, settings=settings or CDMSettings(),
                         force=force, cache_dir=self.cacheDir)

    @staticmethod
    def inputList(inputVolumeNodes):
        return list(inputVolumeNodes) if isinstance(inputVolumeNodes, (list, tuple)) else [inputVolumeNodes]

    def addResults(self, run, inputVolumeNodes, name=None, outputSegmentation=None, replaceEdited=False):
        """A finished run's heatmap volume(s) and segmentation, read into the scene beside the first input
        through Slicer's readers; returns them (heatmaps first). outputSegmentation: an existing segmentation to
        write the segments into (same-named segments replaced), else a new one; a segment the user edited is
        replaced only with replaceEdited, otherwise the result stays a new segmentation. The run's files are
        removed afterwards."""
        from CDMSegmentLib.slicer_adapters.run_on_nodes import add_results
        try:
            return add_results(run, self.inputList(inputVolumeNodes), name, outputSegmentation, replaceEdited)
        finally:
            run.close()

    @staticmethod
    def editedSegments(outputSegmentation, inputVolumeNode, classNames, hardenTransform=False):
        """The names of the segments a run for ``classNames`` would replace in ``outputSegmentation`` that hold
        an edit (or are not CDMSegment's): what the panel asks about before it runs."""
        from CDMSegmentLib.core.terminology import segment_style

        shape = slicer.util.arrayFromVolume(inputVolumeNode).shape
        return mrml.edited_segments(outputSegmentation, [segment_style(c).name for c in classNames],
                                    mrml.world_ijk_to_ras(inputVolumeNode, hardenTransform), shape)

    def process(self, inputVolumeNodes, model=None, targetClass=None, method="cdm", device="auto", settings=None,
                axis="auto", batchSize=0, classifier=None, hardenTransform=False, force=False, progress=None,
                cancel=None, outputSegmentation=None, replaceEdited=False):
        """Segment and add result nodes to the inputs' scene: [heatmap volume(s)..., segmentation]. Waits for the
        child process; progress(slices done, slices in total); cancel: threading.Event or callable. Arguments as
        ``startRun`` and ``addResults``. A cancelled or failed run leaves the scene as it was and removes its
        files."""
        from CDMSegmentLib.slicer_adapters.panel_choices import result_text

        run = self.startRun(inputVolumeNodes, model, targetClass, method, device, settings, axis, batchSize,
                            classifier, hardenTransform, force)
        try:
            summary = run.wait(cancel, progress, log=lambda message: logging.info(f"CDMSegment: {message}"))
        except BaseException:
            run.close()
            raise
        logging.info(f"CDMSegment: {result_text(summary)}")
        return self.addResults(run, inputVolumeNodes, None, outputSegmentation, replaceEdited)

    @staticmethod
    def remakeSegment(heatmapNode, segmentationNode, threshold):
        """Re-make the segment from the kept heatmap at ``threshold``, with the run's speck removal, without
        running the model; returns the segmentation written: a new one when the user edited the segment,
        which is never overwritten."""
        return mrml.remake_segment(heatmapNode, segmentationNode, threshold)


# Slicer's template order: VTKObservationMixin.__init__ calls super().__init__(), so with the mixin first
# ScriptedLoadableModuleWidget.__init__ would run again without a parent (test_module_conventions.py).
class CDMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Only this class touches Qt; a run happens in a child process polled by a timer.

    The model shown is described from its file's metadata (panel_choices.peek_metadata); choosing it checks its
    file (downloading it first when needed) and fills in its defaults, without torch, which only the run's child
    process imports. Apply runs only the model shown.
    """

    # The row of the first input volume in the Inputs form; one selector per further modality goes below it.
    FIRST_INPUT_ROW = 2

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for the scene observations
        self.parameterNode = self.guiConnection = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CDMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CDMSegmentLogic()  # the per-user model cache, as the console's logic and the command line
        self.model = self.classifier = self.modelSource = self.shownMetadata = None
        self.methodOfDefaults = None  # the method whose calibrated settings the Advanced section was last given
        self.job = None
        self.lastRunDevice = None
        self.extraInputSelectors = []
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)
        # The list is filled before onModelChanged listens: a model is checked (its file hashed, or downloaded)
        # only when the user picks one or presses Apply, never by opening the panel.
        self.populateModels()
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelFile)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.openSegmentEditor)
        self.ui.installOnnxRuntimeButton.connect("clicked(bool)", self.onInstallOnnxRuntime)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.progressBar.hide()
        self.ui.deviceInfoLabel.text = torchStatusText()
        self.initializeParameterNode()

    def cleanup(self):
        """Slicer closes or reloads the module: end a run (a cancelled child ends at once, so one last poll
        removes its files), stop its timer, stop observing the scene."""
        self.cancelRun()
        if self.job is not None:
            self.onPoll()
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        """The module is shown: bind the panel to this scene's parameter node."""
        self.initializeParameterNode()

    def exit(self):
        """Another module is shown: the panel stops following the parameter node until enter()."""
        if self.guiConnection is not None:
            self.parameterNode.disconnectGui(self.guiConnection)
            self.guiConnection = None
        if self.parameterNode is not None:
            self.removeObserver(self.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateControls)

    def onReload(self):
        """Reload and Test: Slicer re-reads this file only; forgetting the core's modules makes it import the
        edited ones too."""
        forgetLibraryModules()
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        """(Re)bind the panel to this scene's parameter node, defaulting the input to the volume in view."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self.parameterNode.inputVolume:
            self.parameterNode.inputVolume = mrml.default_input_volume(slicer.mrmlScene, self.shownVolume())

    def setParameterNode(self, parameterNode):
        if self.guiConnection is not None:
            self.parameterNode.disconnectGui(self.guiConnection)
        if self.parameterNode is not None:
            self.removeObserver(self.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateControls)
        self.parameterNode = parameterNode
        self.guiConnection = parameterNode.connectGui(self.ui) if parameterNode is not None else None
        if parameterNode is not None:
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateControls)
            self.updateControls()

    @staticmethod
    def shownVolume():
        """The background volume of the Red slice view; None without views (Slicer --no-main-window)."""
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager is not None else None
        return sliceWidget.sliceLogic().GetBackgroundLayer().GetVolumeNode() if sliceWidget is not None else None

    def onSceneStartClose(self, caller=None, event=None):
        """A run's result must not land in the next scene: cancel it. The panel lets go of the parameter node,
        which the scene is about to delete; onSceneEndClose binds the new one when the module is shown."""
        self.cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller=None, event=None):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def updateControls(self, caller=None, event=None):
        """Apply only when it can run (its tooltip says what is missing), the result's controls only with a
        result, the guidance scale only for CG-CDM, the CPU engine line only when the run will be on the CPU."""
        p = self.parameterNode
        if p is None:
            return
        if self.job is None:
            problem = self.applyProblem()
            self.ui.applyButton.enabled = not problem
            self.ui.applyButton.toolTip = problem or _("Segment the input with the model shown")
        hasResult = p.heatmapVolume is not None and p.segmentation is not None and self.job is None
        self.ui.thresholdSlider.enabled = self.ui.segmentEditorButton.enabled = hasResult
        self.ui.guidanceScaleSpinBox.enabled = p.method == Method.cg_cdm
        if self.model is not None and p.method != self.methodOfDefaults:
            self.useMethodDefaults()
        self.showCpuEngine()

    def useMethodDefaults(self):
        """Another method chosen: the Advanced section's sampler settings become the ones that method's threshold
        was calibrated at (CG-CDM: its classifier's); the refinement and the speck removal are left as they are."""
        from CDMSegmentLib.slicer_adapters.panel_choices import sampler_defaults

        p = self.parameterNode
        self.methodOfDefaults = p.method
        for name, value in sampler_defaults(self.model, self.classifier, p.method.value).items():
            setattr(p, name, value)

    def applyProblem(self) -> str:
        p = self.parameterNode
        nodes = [p.inputVolume] + [selector.currentNode() for selector in self.extraInputSelectors]
        missing = [modality for modality, node in zip(self.modalities(), nodes) if node is None]
        classifierMissing = p.method == Method.cg_cdm and self.model is not None and self.classifier is None
        return applyProblem(self.ui.modelSelector.currentIndex >= 0, missing, classifierMissing)

    def modalities(self):
        """The chosen model's modality names (from its file before it is checked), else one unnamed input."""
        metadata = self.model.metadata if self.model is not None else self.shownMetadata
        return list(metadata["modalities"]) if metadata else [_("input volume")]

    def ensureDependencies(self):
        """torch through the PyTorch extension, after an explicit confirmation. numpy, scipy, SimpleITK and
        requests come with Slicer and are never reinstalled (pip-installing them is what breaks Slicers).
        torch is never imported here: its version comes from its package metadata, the device from the run."""
        from CDMSegmentLib.slicer_adapters.panel_choices import torch_version_problem

        if not torchInstalled():
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("CDMSegment needs the PyTorch extension: install it from the Extensions "
                                           "Manager and restart Slicer."))
                return False
            if not slicer.util.confirmOkCancelDisplay(
                    _("CDMSegment needs PyTorch, not installed yet. Install it now through the PyTorch extension? "
                      "About 1 GB: the CPU or CUDA build that suits this computer.")):
                return False
            with slicer.util.tryWithErrorDisplay(_("Could not install PyTorch."), waitCursor=True):
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            importlib.invalidate_caches()
            self.ui.deviceInfoLabel.text = torchStatusText()
            if not torchInstalled():
                return False
        version = importlib.metadata.version("torch")
        problem = torch_version_problem(version, MINIMUM_TORCH_VERSION)
        if problem:
            self.ui.deviceInfoLabel.text = _("PyTorch {version} is too old").format(version=version)
            slicer.util.errorDisplay(problem)
            return False
        return True

    def showCpuEngine(self):
        """The line on what a CPU run evaluates the network with, and the install button while that is torch;
        both only when the run will be on the CPU."""
        from CDMSegmentLib.slicer_adapters.panel_choices import cpu_engine_text, runs_on_cpu, torch_build

        onCpu = runs_on_cpu(self.parameterNode.device.value, torch_build(), self.lastRunDevice)
        self.ui.cpuEngineLabel.text, offerInstall = cpu_engine_text()
        self.ui.cpuEngineLabel.visible = onCpu
        self.ui.installOnnxRuntimeButton.visible = onCpu and offerInstall

    def onInstallOnnxRuntime(self):
        """pip-install ONNX Runtime into Slicer's Python after an explicit confirmation. The next run's child
        process finds it (no restart); a failure is shown once (Slicer 5.12 and later show pip's own dialog),
        and runs keep using torch."""
        from CDMSegmentLib.slicer_adapters.panel_choices import onnx_install_question, onnx_install_requirements

        if not slicer.util.confirmOkCancelDisplay(onnx_install_question()):
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not install ONNX Runtime; runs keep using PyTorch."),
                                                 show=not slicerShowsPipErrors(), waitCursor=True):
                slicer.util.pip_install(onnx_install_requirements())  # a list: Slicer 5.6 takes a str or a list
                logging.info("CDMSegment: ONNX Runtime installed; CPU runs use it from the next Apply")
        finally:
            importlib.invalidate_caches()  # the import system caches directory listings: see the new packages
            self.showCpuEngine()

    def populateModels(self):
        """The registered models, from models.json (no torch needed); the first is described from its file."""
        from CDMSegmentLib.slicer_adapters.panel_choices import model_choices

        self.ui.modelSelector.clear()
        for name in model_choices():
            self.ui.modelSelector.addItem(name, name)
        self.describeChosenModel()

    def describeChosenModel(self):
        """Describe the model shown from its file's metadata: its classes fill the target class, its modalities
        the input rows. A model not at hand yet (to download) is described by the registry."""
        from CDMSegmentLib.core.registry import default_cache_dir
        from CDMSegmentLib.slicer_adapters.panel_choices import (metadata_text, model_file_of, peek_metadata,
                                                                 registry_text)

        source = self.chosenSource()
        checked = self.model is not None and self.modelSource == source
        cacheDir = self.logic.cacheDir or default_cache_dir()
        metadata = self.model.metadata if checked else peek_metadata(source and model_file_of(source, cacheDir))
        self.shownMetadata = metadata
        if metadata is not None:
            self.ui.modelInfoLabel.text = metadata_text(metadata)
        elif source:
            self.ui.modelInfoLabel.text = registry_text(source) if not Path(source).is_file() else _(
                "{name}: no CDMSegment model metadata in this file").format(name=Path(source).name)
        classes = list(metadata["class_names"][1:]) if metadata else []
        if classes != [self.ui.targetClassSelector.itemText(i) for i in range(self.ui.targetClassSelector.count)]:
            self.ui.targetClassSelector.clear()
            self.ui.targetClassSelector.addItems(classes)
        self.showInputRows(self.modalities())
        self.updateControls()

    def showInputRows(self, modalities):
        """One input row per modality: the first is the .ui's, the others are inserted below it."""
        self.ui.firstInputLabel.text = f"{modalities[0]}:"
        if [s.objectName for s in self.extraInputSelectors] == list(modalities[1:]):
            return
        formLayout = self.ui.inputsCollapsibleButton.layout()
        for selector in self.extraInputSelectors:
            formLayout.removeRow(selector)
        self.extraInputSelectors = []
        for n, modality in enumerate(modalities[1:]):
            selector = slicer.qMRMLNodeComboBox()
            selector.objectName = modality
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.showChildNodeTypes = False  # no labelmap, vector or diffusion volumes
            selector.addEnabled = selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateControls)
            formLayout.insertRow(self.FIRST_INPUT_ROW + 1 + n, f"{modality}:", selector)
            self.extraInputSelectors.append(selector)

    def chosenSource(self):
        """The model shown: a registered name or a file path; None when the list is empty."""
        return self.ui.modelSelector.itemData(self.ui.modelSelector.currentIndex)

    def onLoadModelFile(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Load a CDMSegment model"), "",
                                              _("TorchScript model") + " (*.pt *.pth *.ts);;" + _("All files") + " (*)")
        if path:
            self.ui.modelSelector.addItem(Path(path).name, path)
            self.ui.modelSelector.currentIndex = self.ui.modelSelector.count - 1

    def onModelChanged(self, index):
        """Describe the chosen model and check it (PyTorch need not be installed: Apply offers the install, then
        runs this model, never another)."""
        if self.job is not None:
            return
        self.model = self.classifier = self.modelSource = None
        self.describeChosenModel()
        self.fetchChosenModel()

    def fetchChosenModel(self) -> bool:
        """Check and describe the model shown, downloading it first (with consent, in the background) when not
        cached. True when it is ready now; False when it failed, was declined, or is downloading."""
        source = self.chosenSource()
        if not source:
            return False
        entry = self.logic.downloadNeeded(source)
        if entry is None:
            with slicer.util.tryWithErrorDisplay(_("Could not load the model."), waitCursor=True):
                self.useModel(self.logic.fetchModel(source), source)
            return self.model is not None and self.modelSource == source
        if slicer.util.confirmOkCancelDisplay(_("Download model {name} ({size:.0f} MB) from {url}?").format(
                name=entry["name"], size=entry.get("size_bytes", 0) / 1e6, url=entry["url"])):
            from CDMSegmentLib.slicer_adapters.worker_thread import BackgroundJob

            self.startJob(BackgroundJob(lambda progress, cancel: self.logic.fetchModel(source, progress, cancel)),
                          "MB", lambda job: self.useModel(job.result, source))
        return False

    def useModel(self, model, source):
        """Show the checked model (a ModelDescription; ``source``: its entry in the model list): classes, measured
        defaults, inputs. A classifier registered with the model is checked too: it makes CG-CDM available."""
        from CDMSegmentLib.slicer_adapters.panel_choices import advanced_defaults, noise_draws_step

        classifierName = self.logic.classifierFor(model)
        self.model, self.modelSource, self.classifier = model, source, None
        if classifierName and self.logic.downloadNeeded(classifierName) is None:
            with slicer.util.tryWithErrorDisplay(_("Could not load the model's classifier."), waitCursor=True):
                self.classifier = self.logic.fetchModel(classifierName, kind="classifier")
        if self.classifier is None:
            self.parameterNode.method = Method.cdm
        self.methodOfDefaults = self.parameterNode.method
        # an ensemble's noise draws take turns on its networks: whole rounds only
        self.ui.noiseDrawsSpinBox.minimum = self.ui.noiseDrawsSpinBox.singleStep = noise_draws_step(model)
        for name, value in advanced_defaults(model, self.classifier, self.parameterNode.method.value).items():
            setattr(self.parameterNode, name, value)
        self.describeChosenModel()

    def onApplyButton(self):
        if self.job is not None:
            self.job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self.ensureDependencies():
            return
        if (self.model is None or self.modelSource != self.chosenSource()) and not self.fetchChosenModel():
            return  # failed, declined, or downloading: Apply again once it is ready
        p = self.parameterNode
        nodes = [p.inputVolume] + [selector.currentNode() for selector in self.extraInputSelectors]
        targetClass = self.ui.targetClassSelector.currentIndex + 1
        output, replaceEdited = p.outputSegmentation, False
        with slicer.util.tryWithErrorDisplay(_("Could not start CDMSegment."), waitCursor=True):
            if output is not None:
                edited = self.logic.editedSegments(output, nodes[0], [self.model.class_names[targetClass]],
                                                   p.hardenTransform)
                if edited and not slicer.util.confirmOkCancelDisplay(_(
                        "Segment {names} of {segmentation} holds edits (or was not made by CDMSegment). Replace "
                        "it with the new result? Cancel keeps it; choose another output segmentation, or "
                        "'Create new segmentation', to keep both.").format(names=", ".join(edited),
                                                                          segmentation=output.GetName())):
                    return
                replaceEdited = bool(edited)
            run = self.logic.startRun(nodes, self.model, targetClass, p.method.value, p.device.value,
                                      self.logic.settingsFrom(p), p.axis.value, p.batchSize,
                                      self.classifier if p.method == Method.cg_cdm else None, p.hardenTransform,
                                      p.force)
            self.startJob(run, "slices", lambda run: self.showResult(
                nodes, self.logic.addResults(run, nodes, None, output, replaceEdited), run.summary), onEnd=run.close)

    def cancelRun(self):
        """Ask a running job to stop (its timer ends it and removes its files); nothing when none runs."""
        if self.job is not None:
            self.job.cancel()

    def startJob(self, job, unit, onDone, onEnd=lambda: None):
        """Poll ``job`` (a child run, or a download's BackgroundJob) from the timer; Apply becomes Cancel.
        ``onDone(job)`` runs on the main thread when it succeeds, ``onEnd()`` when it fails or is cancelled.
        unit: 'slices' or 'MB' (progress reported in bytes)."""
        self.lastMessage = ""
        self.job, self.jobUnit, self.onJobDone, self.onJobEnd = job, unit, onDone, onEnd
        self.ui.applyButton.text = _("Cancel")
        self.ui.applyButton.enabled = True
        self.ui.applyButton.toolTip = _("Stop now; nothing is added to the scene")
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Starting...")
        self.updateControls()
        self.timer.start()

    def onPoll(self):
        """Main thread: show progress; when the job ends, hand over its result or show its error."""
        from CDMSegmentLib.slicer_adapters.panel_choices import progress_text

        job = self.job
        finished = job.poll()  # never blocks long: a child run is read without waiting
        while job.messages:
            self.lastMessage = job.messages.pop(0)
            logging.info(f"CDMSegment: {self.lastMessage}")
        done, total = job.progress
        self.ui.progressBar.maximum = 1000
        self.ui.progressBar.value = int(1000 * done / total) if total else 0
        self.ui.statusLabel.text = progress_text(done, total, self.jobUnit, job.eta_seconds(), self.lastMessage)
        if not finished:
            return
        self.timer.stop()
        self.job = None
        self.ui.applyButton.text = _("Apply")
        self.ui.progressBar.hide()
        try:
            if job.cancelled or job.error is not None:
                self.onJobEnd()
                self.ui.statusLabel.text = _("Cancelled; the scene is as it was.") if job.cancelled else _("Failed.")
                if not job.cancelled:
                    slicer.util.errorDisplay(_("CDMSegment failed: {error}").format(error=job.error))
                return
            with slicer.util.tryWithErrorDisplay(_("Could not show the result.")):
                self.onJobDone(job)
        finally:
            self.updateControls()

    def showResult(self, inputNodes, outputNodes, summary):
        from CDMSegmentLib.slicer_adapters.panel_choices import result_text, slider_range

        heatmapNode, segmentationNode = outputNodes[0], outputNodes[-1]
        p = self.parameterNode
        p.heatmapVolume = None  # the slider set-up below must not re-make the previous run's segment
        slider = self.ui.thresholdSlider
        top, step, decimals = slider_range(slicer.util.arrayFromVolume(heatmapNode).max())
        slider.decimals = decimals  # first: Qt rounds the range and the step to the decimals
        slider.maximum, slider.singleStep = top, step
        slider.value = p.threshold = summary["thresholds"][0]
        p.heatmapVolume, p.segmentation = heatmapNode, segmentationNode
        p.outputSegmentation = segmentationNode  # the next run writes here, asking before it replaces an edit
        slicer.util.setSliceViewerLayers(background=inputNodes[0], foreground=heatmapNode,
                                         foregroundOpacity=mrml.HEATMAP_OPACITY)
        self.lastRunDevice = summary["device"]
        self.ui.deviceInfoLabel.text = torchStatusText(self.lastRunDevice)
        self.ui.statusLabel.text = result_text(summary)

    def onThresholdChanged(self, value):
        p = self.parameterNode
        if p.heatmapVolume is None or p.segmentation is None or self.job is not None:
            return
        p.threshold = value
        with slicer.util.tryWithErrorDisplay(_("Could not re-make the segment.")):
            p.segmentation = self.logic.remakeSegment(p.heatmapVolume, p.segmentation, value)

    def openSegmentEditor(self):
        p = self.parameterNode
        if p.segmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.segmentation)
        editor.setSourceVolumeNode(p.inputVolume)
        editor.setCurrentSegmentID(mrml.result_segment_id(p.segmentation))


class CDMSegmentTest(ScriptedLoadableModuleTest):
    """Reload and Test (``runTest``) and Slicer's CTest (``slicer_add_python_unittest``, which loads the test_*
    methods with unittest's ``loadTestsFromName`` and never calls ``runTest``): the sample volume end to end on
    the CPU, with a Dice floor."""

    def runTest(self):
        self.test_sampleEndToEnd()

    def test_sampleEndToEnd(self):
        """Returns with a message, never SkipTest (which Reload and Test reports as a failure), where nothing can
        run: the extension build machines never install torch. The guard is here, in the test method, because
        the CTest runs this method alone."""
        missing = selfTestMissing()
        if missing:
            logging.warning(f"CDMSegment self-test: {missing}; nothing was tested")
            return
        slicer.mrmlScene.Clear()
        score = self.sampleDice()
        self.delayDisplay(f"Dice {score:.3f} (floor {SAMPLE_DICE_FLOOR})")
        self.assertGreaterEqual(score, SAMPLE_DICE_FLOOR, f"the sample's Dice {score:.3f} is below its floor")

    def sampleDice(self) -> float:
        """The Dice of the default model on the bundled sample against the sample's own segmentation."""
        import SampleData
        from CDMSegmentLib.evaluation.metrics import dice

        if SampleData.SampleDataLogic().sourceForSampleName("CDMSegmentSample") is None:
            registerSampleData()  # "Reload and Test" after startup, or a test run that skipped startupCompleted
        volume = SampleData.downloadSample("CDMSegmentSample")
        sample = json.loads(SAMPLE_DESCRIPTION.read_text())
        truthPath = SampleData.SampleDataLogic().downloadFileIntoCache(sampleUri(sample["segmentation_file_name"]),
                                                                       sample["segmentation_file_name"])
        truth = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(truthPath)) > 0
        nodes = CDMSegmentLogic().process(volume, device="cpu")
        segmentation = nodes[-1]
        mask = mrml.segment_mask(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0),
                                 mrml.ijk_to_ras(volume), truth.shape) > 0
        return dice(mask, truth)
