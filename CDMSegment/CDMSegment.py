"""CDMSegment: weakly supervised segmentation with a conditional diffusion model (Hu et al., MICCAI 2023).

Thin Slicer layer over CDMSegmentLib: the Widget owns Qt, the Logic owns MRML through
CDMSegmentLib.slicer_adapters.mrml, the core does the rest. Model and torch imports happen inside methods,
after the dependency check, so the module loads in a Slicer without torch.
"""

# Annotations stay strings until Slicer's parameterNodeWrapper resolves them (typing.get_type_hints):
# under slicer-core, which has no parameterNodeWrapper, the Logic is imported without them.
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import sys
import unittest
from pathlib import Path
from typing import Annotated

import slicer
from slicer.util import VTKObservationMixin

from CDMSegmentLib.slicer_adapters import mrml

try:  # the Slicer application
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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
RESOURCES = Path(__file__).resolve().parent / "Resources"
# The sample ships with the module: {"file_name", "sha256", "segmentation_file_name", "segmentation_sha256"}
SAMPLE_DESCRIPTION = RESOURCES / "Sample" / "CDMSegmentSample.json"
SAMPLE_DICE_FLOOR = 0.75  # the sample's Dice was 0.87 (make demo); pytest asserts the same floor
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
        self.parent.contributors = ["CDMSegment developers"]
        self.parent.helpText = _("Segments a lesion class from image-level training labels only, with the conditional "
                                 "diffusion model of Hu et al. (MICCAI 2023): a heatmap and an editable segment. "
                                 "Research use only; not a medical device.")
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


def torchStatusText() -> str:
    """The panel's line about PyTorch, read from the installed package's metadata only."""
    if not torchInstalled():
        return "PyTorch is not installed: Apply offers to install it"
    return f"PyTorch {importlib.metadata.version('torch')}; the device is chosen when a run starts"


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


@parameterNodeWrapper
class CDMSegmentParameterNode:
    """What the panel shows, saved with the scene. Input volumes per modality are set by the widget.

    Slicer binds a combo box only to a parameter with a Choice (it fills the box with the choices)
    and sets a spin box's range from WithinRange (unbounded, it would be -inf..inf); test_ui.py
    checks both. The threshold slider is driven by the widget, whose range follows each heatmap.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    method: Annotated[str, Choice(["cdm", "cg-cdm"])] = "cdm"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    noiseLevel: Annotated[float, WithinRange(0.01, 0.999)] = 0.896
    steps: Annotated[int, WithinRange(1, 1000)] = 10
    tau: Annotated[float, WithinRange(0.0, 0.999)] = 0.95
    noiseDraws: Annotated[int, WithinRange(1, 64)] = 1
    guidanceScale: Annotated[float, WithinRange(0.0, 10000.0)] = 100.0
    axis: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    batchSize: Annotated[int, WithinRange(0, 1024)] = 0  # 0: automatic, per device (the spin box shows "auto")
    hardenTransform: bool = False
    force: bool = False
    threshold: float = 0.0
    heatmapVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode


class CDMSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console without it (CDMSegmentLib.slicer_adapters.run_on_nodes).

    The model runs in a child process (``startRun``), which the panel polls from a timer and ``process`` waits
    for; ``addResults`` then reads its files into the scene. The core is imported inside the methods: it needs
    torch, which may not be installed yet.
    """

    def __init__(self, cacheDir=None, registry=None):
        """cacheDir: where downloaded models go; registry: a models.json other than the bundled one."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.cacheDir = Path(cacheDir) if cacheDir else None
        self.registry = Path(registry) if registry else None

    def getParameterNode(self):
        return CDMSegmentParameterNode(super().getParameterNode())

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
        """The name of the classifier registered to guide a loaded model (CG-CDM), or None."""
        from CDMSegmentLib.core.modelfile import registered_classifier
        return registered_classifier(model, *([self.registry] if self.registry else []))

    def loadModel(self, nameOrPath=None, progress=None, cancel=None, kind="diffusion"):
        """A registered model (bundled, or downloaded into the cache on first use) or a model file; kind:
        'diffusion' or 'classifier'. progress(bytes done, bytes total) and cancel (threading.Event): downloads."""
        from CDMSegmentLib.core.download import fetch_model
        return fetch_model(nameOrPath, kind, self.cacheDir, self.registry, progress, cancel)

    def startRun(self, inputVolumeNodes, model=None, targetClass=None, method="cdm", device="auto", settings=None,
                 axis="auto", batchSize=0, classifier=None, hardenTransform=False, force=False):
        """Check and copy the inputs and start the model on them in a child process; returns the run
        (CDMSegmentLib.slicer_adapters.child_process.ChildRun: poll(), progress, eta_seconds(), cancel(), close()).

        inputVolumeNodes: one scalar volume node per model modality (or a single node); model / classifier: a
        registered name, a file path or a loaded model (method 'cg-cdm' needs the classifier; by default the one
        registered with the model); settings: CDMSettings, None fields (or None) meaning the model's measured
        defaults; batchSize: slices per batch, 0 (or None) for automatic: the model's measured value for the
        device, else 4 on a CPU and 64 on a GPU (CDMSegmentLib.core.runner.default_batch_size); force: run on an
        image that does not look like what the model takes (otherwise refused in one line). The inputs are never
        modified.
        """
        from CDMSegmentLib.core.modelfile import LoadedModel
        from CDMSegmentLib.core.settings import CDMSettings
        from CDMSegmentLib.slicer_adapters.run_on_nodes import start_run

        nodes = self.inputList(inputVolumeNodes)
        model = model if isinstance(model, LoadedModel) else self.loadModel(model)
        if method == "cg-cdm" and classifier is None:
            classifier = self.classifierFor(model)
        if classifier is not None and not isinstance(classifier, LoadedModel):
            classifier = self.loadModel(classifier, kind="classifier")
        return start_run(nodes, model, harden=hardenTransform, classifier=classifier, method=method, device=device,
                         axis=axis, batch_size=batchSize, target_class=targetClass, settings=settings or CDMSettings(),
                         force=force)

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
    """The panel. Only this class touches Qt; a run happens on a worker thread polled by a timer."""

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
        self.logic = CDMSegmentLogic(Path(slicer.app.cachePath) / "CDMSegment")
        self.model = self.classifier = None
        self.job = None
        self.extraInputSelectors = []
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)
        # The list is filled before onModelChanged listens: a model is loaded (torch imported) only when
        # the user picks one or presses Apply, never by opening the panel.
        self.populateModels()
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelFile)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.openSegmentEditor)
        self.ui.installOnnxRuntimeButton.connect("clicked(bool)", self.onInstallOnnxRuntime)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.progressBar.hide()
        self.ui.deviceInfoLabel.text = torchStatusText()
        self.showCpuEngine()
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
        self.parameterNode = parameterNode
        self.guiConnection = parameterNode.connectGui(self.ui) if parameterNode is not None else None

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

    def ensureDependencies(self, ask=True):
        """torch through the PyTorch extension, after an explicit confirmation. numpy, scipy, SimpleITK and
        requests come with Slicer and are never reinstalled (pip-installing them is what breaks Slicers)."""
        try:
            import PyTorchUtils
        except ImportError:
            if ask:
                slicer.util.errorDisplay("CDMSegment needs the PyTorch extension: install it from the Extensions "
                                         "Manager and restart Slicer.")
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if not ask or not slicer.util.confirmOkCancelDisplay(
                    "CDMSegment needs PyTorch, not installed yet. Install it now through the PyTorch extension? "
                    "About 1 GB: the CPU or CUDA build that suits this computer."):
                self.ui.deviceInfoLabel.text = "PyTorch is not installed: Apply offers to install it"
                return False
            with slicer.util.tryWithErrorDisplay("Could not install PyTorch.", waitCursor=True):
                torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if not torchLogic.torchInstalled():
                return False
        import torch

        from CDMSegmentLib.slicer_adapters.panel_choices import torch_version_problem

        problem = torch_version_problem(torch.__version__, MINIMUM_TORCH_VERSION)
        if problem:
            self.ui.deviceInfoLabel.text = f"PyTorch {torch.__version__} is too old"
            if ask:
                slicer.util.errorDisplay(problem)
            return False
        found = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU found: CPU"
        self.ui.deviceInfoLabel.text = f"PyTorch {torch.__version__}; {found}"
        return True

    def showCpuEngine(self):
        """The line on what a CPU run evaluates the network with, and the install button while that is torch."""
        from CDMSegmentLib.slicer_adapters.panel_choices import cpu_engine_text

        self.ui.cpuEngineLabel.text, offerInstall = cpu_engine_text()
        self.ui.installOnnxRuntimeButton.visible = offerInstall

    def onInstallOnnxRuntime(self):
        """pip-install ONNX Runtime into Slicer's Python after an explicit confirmation. The next run's child
        process finds it (no restart); a failed install is shown, and runs keep using torch."""
        from CDMSegmentLib.slicer_adapters.panel_choices import onnx_install_question, onnx_install_requirements

        if not slicer.util.confirmOkCancelDisplay(onnx_install_question()):
            return
        try:
            with slicer.util.tryWithErrorDisplay("Could not install ONNX Runtime; runs keep using PyTorch.",
                                                 waitCursor=True):
                slicer.util.pip_install(onnx_install_requirements())  # a list: Slicer 5.6 takes a str or a list
                logging.info("CDMSegment: ONNX Runtime installed; CPU runs use it from the next Apply")
        finally:
            importlib.invalidate_caches()  # the import system caches directory listings: see the new packages
            self.showCpuEngine()

    def populateModels(self):
        """The registered models, from models.json (no torch needed); the first is described until one loads."""
        from CDMSegmentLib.slicer_adapters.panel_choices import model_choices, registry_text

        self.ui.modelSelector.clear()
        for name in model_choices():
            self.ui.modelSelector.addItem(name, name)
        if self.model is None and self.ui.modelSelector.count:
            self.ui.modelInfoLabel.text = registry_text(self.ui.modelSelector.itemData(0))

    def onLoadModelFile(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Load a CDMSegment model", "",
                                              "TorchScript model (*.pt *.pth *.ts);;All files (*)")
        if path:
            self.ui.modelSelector.addItem(Path(path).name, path)
            self.ui.modelSelector.currentIndex = self.ui.modelSelector.count - 1

    def onModelChanged(self, index):
        """Load the chosen model, downloading it first (with consent, in the background) when not cached."""
        source = self.ui.modelSelector.itemData(index)
        if not source or self.job is not None:
            return
        entry = self.logic.downloadNeeded(source)
        if entry is None:
            with slicer.util.tryWithErrorDisplay("Could not load the model.", waitCursor=True):
                self.useModel(self.logic.loadModel(source))
        elif slicer.util.confirmOkCancelDisplay(
                f"Download model {entry['name']} ({entry.get('size_bytes', 0) / 1e6:.0f} MB) from {entry['url']}?"):
            from CDMSegmentLib.slicer_adapters.worker_thread import BackgroundJob

            self.startJob(BackgroundJob(lambda progress, cancel: self.logic.loadModel(source, progress, cancel)),
                          "MB", lambda job: self.useModel(job.result))

    def useModel(self, model):
        """Show the model's classes, methods and measured defaults, and one input selector per modality.
        A classifier registered with the model is loaded too: it makes CG-CDM available."""
        from CDMSegmentLib.slicer_adapters.panel_choices import advanced_defaults, model_text

        classifierName = self.logic.classifierFor(model)
        self.model, self.classifier = model, None
        if classifierName and self.logic.downloadNeeded(classifierName) is None:
            with slicer.util.tryWithErrorDisplay("Could not load the model's classifier.", waitCursor=True):
                self.classifier = self.logic.loadModel(classifierName, kind="classifier")
        self.ui.modelInfoLabel.text = model_text(model)
        self.ui.targetClassSelector.clear()
        self.ui.targetClassSelector.addItems(model.class_names[1:])
        if self.classifier is None:
            self.parameterNode.method = "cdm"
        self.onMethodChanged()
        for name, value in advanced_defaults(model, self.classifier).items():
            setattr(self.parameterNode, name, value)
        self.ui.firstInputLabel.text = f"{model.modalities[0]}:"
        formLayout = self.ui.extraInputsWidget.layout()
        for selector in self.extraInputSelectors:
            formLayout.removeRow(selector)
        self.extraInputSelectors = []
        for modality in model.modalities[1:]:
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.showChildNodeTypes = False  # no labelmap, vector or diffusion volumes
            selector.addEnabled = selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            formLayout.addRow(f"{modality}:", selector)
            self.extraInputSelectors.append(selector)

    def onMethodChanged(self, index=None):
        """CG-CDM needs a classifier registered with the model; its guidance scale means nothing to CDM."""
        guided = self.ui.methodSelector.currentText == "cg-cdm"
        self.ui.guidanceScaleSpinBox.enabled = guided
        if guided and self.model is not None and self.classifier is None:
            self.ui.statusLabel.text = "CG-CDM needs a classifier registered with this model; this one has none."

    def onApplyButton(self):
        if self.job is not None:
            self.job.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not self.ensureDependencies():
            return
        if self.model is None:
            self.populateModels()
            if self.model is None:
                return
        with slicer.util.tryWithErrorDisplay("Could not start CDMSegment.", waitCursor=True):
            p = self.parameterNode
            nodes = [p.inputVolume] + [selector.currentNode() for selector in self.extraInputSelectors]
            if p.method == "cg-cdm" and self.classifier is None:
                raise ValueError("CG-CDM needs a classifier registered with this model, and this model has none. "
                                 "Choose CDM, or run CG-CDM from the Python console with classifier=...")
            run = self.logic.startRun(nodes, self.model, self.ui.targetClassSelector.currentIndex + 1, p.method,
                                      p.device, self.logic.settingsFrom(p), p.axis, p.batchSize,
                                      self.classifier if p.method == "cg-cdm" else None, p.hardenTransform,
                                      p.force)
            self.startJob(run, "slices", lambda run: self.showResult(nodes, self.logic.addResults(run, nodes),
                                                                     run.summary), onEnd=run.close)

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
        self.ui.applyButton.text = "Cancel"
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Starting..."
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
        self.ui.applyButton.text = "Apply"
        self.ui.progressBar.hide()
        if job.cancelled or job.error is not None:
            self.onJobEnd()
            self.ui.statusLabel.text = "Cancelled; the scene is as it was." if job.cancelled else "Failed."
            if not job.cancelled:
                slicer.util.errorDisplay(f"CDMSegment failed: {job.error}")
            return
        with slicer.util.tryWithErrorDisplay("Could not show the result."):
            self.onJobDone(job)

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
        slicer.util.setSliceViewerLayers(background=inputNodes[0], foreground=heatmapNode,
                                     foregroundOpacity=mrml.HEATMAP_OPACITY)
        self.ui.statusLabel.text = result_text(summary)

    def onThresholdChanged(self, value):
        p = self.parameterNode
        if p.heatmapVolume is None or p.segmentation is None or self.job is not None:
            return
        p.threshold = value
        with slicer.util.tryWithErrorDisplay("Could not re-make the segment."):
            p.segmentation = self.logic.remakeSegment(p.heatmapVolume, p.segmentation, value)

    def openSegmentEditor(self):
        p = self.parameterNode
        if p.segmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.segmentation)
        editor.setSourceVolumeNode(p.inputVolume)
        editor.setCurrentSegmentID(p.segmentation.GetSegmentation().GetNthSegmentID(0))


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
        """The Dice of the bundled model on the bundled sample against the sample's own segmentation."""
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
