"""CDMSegment: weakly supervised segmentation with a conditional diffusion model (Hu et al., MICCAI 2023).

Thin Slicer layer over CDMSegmentLib: the Widget owns Qt, the Logic owns MRML through
CDMSegmentLib.slicer_adapters.mrml, the core does the rest. Model and torch imports happen inside methods,
after the dependency check, so the module loads in a Slicer without torch.
"""

# Annotations stay strings until Slicer's parameterNodeWrapper resolves them (typing.get_type_hints):
# under slicer-core, which has no parameterNodeWrapper, the Logic is imported without them.
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import slicer
from slicer.util import VTKObservationMixin

from CDMSegmentLib.slicer_adapters import mrml

try:  # the Slicer application; slicer-core (pytest) has MRML but no Qt and no scripted-module base classes
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:
    ScriptedLoadableModule = ScriptedLoadableModuleWidget = ScriptedLoadableModuleTest = object
    ScriptedLoadableModuleLogic = object

    def parameterNodeWrapper(cls):
        return cls

MINIMUM_TORCH_VERSION = "2.1"
RESOURCES = Path(__file__).resolve().parent / "Resources"
# The sample ships with the module: {"file_name", "sha256", "segmentation_file_name", "segmentation_sha256"}
SAMPLE_DESCRIPTION = RESOURCES / "Sample" / "CDMSegmentSample.json"
SAMPLE_DICE_FLOOR = 0.75  # the sample's Dice was 0.87 (make demo); pytest asserts the same floor
# While a job runs, the panel polls it every POLL_MS and then waits up to YIELD_S for it. The worker's
# torch calls run without the GIL, but between them its Python code needs it, and Slicer's main thread
# keeps the GIL while it idles in the Qt event loop (its Python manager does not turn on PythonQt's
# thread support). The wait hands the GIL over for most of each period and leaves the event loop a
# gap that keeps the GUI responsive.
POLL_MS = 40
YIELD_S = 0.03


class CDMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CDMSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CDMSegment developers"]
        self.parent.helpText = ("Segments a lesion class from image-level training labels only, with the conditional "
                                "diffusion model of Hu et al. (MICCAI 2023): a heatmap and an editable segment. "
                                "Research use only; not a medical device.")
        self.parent.acknowledgementText = "Method: Hu, Chen, Ho, Shi, arXiv 2306.03878."
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
    batchSize: Annotated[int, WithinRange(1, 1024)] = 16
    hardenTransform: bool = False
    force: bool = False
    threshold: float = 0.0
    heatmapVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode


class CDMSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console without it (CDMSegmentLib.slicer_adapters.run_on_nodes).

    ``process`` runs on the calling thread; the widget calls its three steps separately
    (prepareInputs and addResultNodes on the main thread, runModel on a worker thread).
    The core is imported inside the methods: it needs torch, which may not be installed yet.
    """

    def __init__(self, cacheDir=None, registry=None):
        """cacheDir: where downloaded models go; registry: a models.json other than the bundled one."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.cacheDir = Path(cacheDir) if cacheDir else None
        self.registry = Path(registry) if registry else None

    def getParameterNode(self):
        return CDMSegmentParameterNode(super().getParameterNode())

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

    @staticmethod
    def prepareInputs(inputVolumeNodes, model, hardenTransform=False):
        """Main thread: checked copies of the inputs as Volumes, and the world IJK-to-RAS of the first."""
        from CDMSegmentLib.slicer_adapters.run_on_nodes import prepare_inputs
        return prepare_inputs(inputVolumeNodes, model, hardenTransform)

    @staticmethod
    def runModel(model, volumes, classes, progress=None, cancel=None, log=logging.info, **options):
        """Any thread, no MRML: {class name: SegmentationResult}; progress counts slices over all classes."""
        from CDMSegmentLib.slicer_adapters.run_on_nodes import run_model
        return run_model(model, volumes, classes, progress=progress, cancel=cancel, log=log, **options)

    @staticmethod
    def addResultNodes(referenceNode, ijkToRAS, results, name=None):
        """Main thread: new heatmap volume(s) and a segmentation beside the input; returns them."""
        from CDMSegmentLib.slicer_adapters.run_on_nodes import add_results
        return add_results(referenceNode, ijkToRAS, results, name)

    def process(self, inputVolumeNodes, model=None, targetClass=None, method="cdm", device="auto", preset="model",
                noiseLevel=None, steps=None, tau=None, noiseDraws=None, guidanceScale=None, axis="auto", batchSize=16,
                threshold=None, classifier=None, hardenTransform=False, force=False, progress=None, cancel=None):
        """Segment and add result nodes to the inputs' scene: [heatmap volume(s)..., segmentation].

        inputVolumeNodes: one scalar volume node per model modality (or a single node);
        model / classifier: a registered name, a file path or a loaded model (method 'cg-cdm' needs the
        classifier; by default the one registered with the model). None settings are the model's
        measured defaults. force: run on an image that does not look like what the model takes (a mismatch
        is otherwise refused). The inputs are never modified.
        """
        from CDMSegmentLib.core.modelfile import LoadedModel
        from CDMSegmentLib.slicer_adapters.run_on_nodes import segment_nodes

        nodes = list(inputVolumeNodes) if isinstance(inputVolumeNodes, (list, tuple)) else [inputVolumeNodes]
        model = model if isinstance(model, LoadedModel) else self.loadModel(model)
        if method == "cg-cdm" and classifier is None:
            classifier = self.classifierFor(model)
        if classifier is not None and not isinstance(classifier, LoadedModel):
            classifier = self.loadModel(classifier, kind="classifier")
        return segment_nodes(nodes, model, target_class=targetClass, preset=preset, noise_level=noiseLevel,
                             steps=steps, tau=tau, noise_draws=noiseDraws, guidance_scale=guidanceScale,
                             harden=hardenTransform, progress=progress, cancel=cancel,
                             log=lambda message: logging.info(f"CDMSegment: {message}"), method=method,
                             classifier=classifier, device=device, axis=axis, batch_size=batchSize,
                             threshold=threshold, force=force)

    @staticmethod
    def remakeSegment(heatmapNode, segmentationNode, threshold, minComponentVoxels=0):
        """Re-make the segment from the kept heatmap at ``threshold`` without running the model; returns the
        segmentation written: a new one when the user edited the segment, which is never overwritten."""
        return mrml.remake_segment(heatmapNode, segmentationNode, threshold, minComponentVoxels)


# VTKObservationMixin first: under slicer-core the widget base is object, which must come last.
class CDMSegmentWidget(VTKObservationMixin, ScriptedLoadableModuleWidget):
    """The panel. Only this class touches Qt; a run happens on a worker thread polled by a timer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
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
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelFile)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.openSegmentEditor)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.ui.progressBar.hide()
        if self.ensureDependencies(ask=False):
            self.populateModels()

    def cleanup(self):
        self.onSceneStartClose()
        self.removeObservers()

    def onReload(self):
        """Reload and Test: Slicer re-reads this file only; forgetting the core's modules makes it import the
        edited ones too."""
        forgetLibraryModules()
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        """(Re)bind the panel to this scene's parameter node, defaulting the input to the volume in view."""
        if self.guiConnection is not None:
            self.parameterNode.disconnectGui(self.guiConnection)
        self.parameterNode = self.logic.getParameterNode()
        self.guiConnection = self.parameterNode.connectGui(self.ui)
        if not self.parameterNode.inputVolume:
            layer = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetBackgroundLayer()
            self.parameterNode.inputVolume = layer.GetVolumeNode()

    def onSceneStartClose(self, caller=None, event=None):
        """A run's result must not land in the next scene: cancel it (onPoll then tidies up). The panel lets go
        of the parameter node, which the scene is about to delete; onSceneEndClose binds the new one."""
        if self.job is not None:
            self.job.cancel()
        if self.guiConnection is not None:
            self.parameterNode.disconnectGui(self.guiConnection)
            self.guiConnection = None

    def onSceneEndClose(self, caller=None, event=None):
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

    def populateModels(self):
        from CDMSegmentLib.slicer_adapters.panel_choices import model_choices

        self.ui.modelSelector.clear()
        for name in model_choices():
            self.ui.modelSelector.addItem(name, name)

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
            self.startJob(lambda progress, cancel: self.logic.loadModel(source, progress, cancel), "MB",
                          self.useModel)

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
            self.ui.statusLabel.text = "Cancelling after the current batch..."
            return
        if not self.ensureDependencies():
            return
        if self.model is None:
            self.populateModels()
            if self.model is None:
                return
        from CDMSegmentLib.core.methods import CDMParams

        with slicer.util.tryWithErrorDisplay("Could not start CDMSegment.", waitCursor=True):
            p = self.parameterNode
            nodes = [p.inputVolume] + [selector.currentNode() for selector in self.extraInputSelectors]
            volumes, ijkToRAS = self.logic.prepareInputs(nodes, self.model, p.hardenTransform)
            model, classes = self.model, [self.ui.targetClassSelector.currentIndex + 1]
            if p.method == "cg-cdm" and self.classifier is None:
                raise ValueError("CG-CDM needs a classifier registered with this model, and this model has none. "
                                 "Choose CDM, or run CG-CDM from the Python console with classifier=...")
            classifier = self.classifier if p.method == "cg-cdm" else None
            # Read on the main thread: the worker never touches MRML, the parameter node included.
            options = dict(method=p.method, device=p.device, axis=p.axis, batch_size=p.batchSize, classifier=classifier,
                           force=p.force,
                           params=CDMParams.for_model(model, classifier=classifier, noise_level=p.noiseLevel,
                                                      steps=p.steps, tau=p.tau, noise_draws=p.noiseDraws,
                                                      guidance_scale=p.guidanceScale))
            self.startJob(lambda progress, cancel: self.logic.runModel(
                model, volumes, classes, progress, cancel, log=self.workerMessages.append, **options), "slices",
                lambda results: self.showResult(nodes, self.logic.addResultNodes(nodes[0], ijkToRAS, results), results))

    def startJob(self, work, unit, onDone):
        """Run ``work(progress, cancel)`` on a worker thread; Apply becomes Cancel; ``onDone(result)`` runs on the
        main thread when it succeeds. unit: 'slices' or 'MB' (progress reported in bytes)."""
        from CDMSegmentLib.slicer_adapters.worker_thread import BackgroundJob

        self.workerMessages = []  # appended by the worker (atomic), logged and shown by onPoll
        self.lastMessage = ""
        self.job, self.jobUnit, self.onJobDone = BackgroundJob(work), unit, onDone
        self.ui.applyButton.text = "Cancel"
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Starting..."
        self.timer.start()

    def onPoll(self):
        """Main thread: show progress; when the job ends, hand over its result or show its error."""
        from CDMSegmentLib.core.errors import Cancelled
        from CDMSegmentLib.slicer_adapters.panel_choices import progress_text

        finished = self.job.wait(YIELD_S)  # the worker's share of the GIL (see POLL_MS)
        while self.workerMessages:
            self.lastMessage = self.workerMessages.pop(0)
            logging.info(f"CDMSegment: {self.lastMessage}")
        done, total = self.job.progress
        self.ui.progressBar.maximum = 1000
        self.ui.progressBar.value = int(1000 * done / total) if total else 0
        self.ui.statusLabel.text = progress_text(done, total, self.jobUnit, self.job.eta_seconds(), self.lastMessage)
        if not finished:
            return
        self.timer.stop()
        job, self.job = self.job, None
        self.ui.applyButton.text = "Apply"
        self.ui.progressBar.hide()
        if isinstance(job.error, Cancelled):
            self.ui.statusLabel.text = "Cancelled; the scene is as it was."
        elif job.error is not None:
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"CDMSegment failed: {job.error}")
        else:
            with slicer.util.tryWithErrorDisplay("Could not show the result."):
                self.onJobDone(job.result)

    def showResult(self, inputNodes, outputNodes, results):
        from CDMSegmentLib.slicer_adapters.panel_choices import result_text, slider_range

        heatmapNode, segmentationNode = outputNodes[0], outputNodes[-1]
        result = next(iter(results.values()))
        p = self.parameterNode
        p.heatmapVolume = None  # the slider set-up below must not re-make the previous run's segment
        slider = self.ui.thresholdSlider
        top, step, decimals = slider_range(result.heatmap.max())
        slider.decimals = decimals  # first: Qt rounds the range and the step to the decimals
        slider.maximum, slider.singleStep = top, step
        slider.value = p.threshold = result.threshold
        p.heatmapVolume, p.segmentation = heatmapNode, segmentationNode
        slicer.util.setSliceViewerLayers(background=inputNodes[0], foreground=heatmapNode,
                                     foregroundOpacity=mrml.HEATMAP_OPACITY)
        voxelMl = float(np.prod(inputNodes[0].GetSpacing())) / 1000.0
        self.ui.statusLabel.text = result_text(result, voxelMl)
        self.openSegmentEditor()

    def onThresholdChanged(self, value):
        p = self.parameterNode
        if p.heatmapVolume is None or p.segmentation is None or self.job is not None:
            return
        p.threshold = value
        with slicer.util.tryWithErrorDisplay("Could not re-make the segment."):
            p.segmentation = self.logic.remakeSegment(p.heatmapVolume, p.segmentation, value,
                                                      int(self.model.defaults.get("min_component_voxels", 0)))

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
    """Reload and Test / slicer_add_python_unittest: the sample volume end to end on the CPU, Dice floor."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_sampleEndToEnd()

    def test_sampleEndToEnd(self):
        if not SAMPLE_DESCRIPTION.is_file():
            self.skipTest(f"{SAMPLE_DESCRIPTION.name} is not published yet")
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
        score = dice(mask, truth)
        self.delayDisplay(f"Dice {score:.3f} (floor {SAMPLE_DICE_FLOOR})")
        self.assertGreaterEqual(score, SAMPLE_DICE_FLOOR)
