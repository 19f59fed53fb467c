"""The panel as Qt builds it: CDMSegment.ui loaded by Qt's own loader (PySide6's QUiLoader, the .ui parser
of the Qt inside Slicer), every widget the module's code uses present with the class the module expects,
and every widget bound to the parameter node naming a parameter Slicer's connectors accept.

Slicer's and CTK's classes (qMRMLNodeComboBox, ctkSliderWidget...) are not in PySide6: the loader builds
them as their declared base, QWidget, and keeps their properties as dynamic properties; the class the .ui
asked for is recorded from the loader's own createWidget calls."""

import ast
import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")

MODULE_DIR = Path(__file__).resolve().parent.parent / "CDMSegment"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CDMSegment.ui"
SOURCE = MODULE_DIR / "CDMSegment.py"

EXPECTED_CLASSES = {
    "applyButton": "QPushButton", "loadModelButton": "QPushButton", "segmentEditorButton": "QPushButton",
    "modelSelector": "QComboBox", "targetClassSelector": "QComboBox", "methodSelector": "QComboBox",
    "deviceSelector": "QComboBox", "axisSelector": "QComboBox", "modelInfoLabel": "QLabel",
    "deviceInfoLabel": "QLabel", "firstInputLabel": "QLabel", "statusLabel": "QLabel",
    "noiseLevelSpinBox": "QDoubleSpinBox", "tauSpinBox": "QDoubleSpinBox", "stepsSpinBox": "QSpinBox",
    "noiseDrawsSpinBox": "QSpinBox", "batchSizeSpinBox": "QSpinBox", "progressBar": "QProgressBar",
    "thresholdSlider": "ctkSliderWidget", "inputVolumeSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox", "inputsCollapsibleButton": "ctkCollapsibleButton",
    "hardenTransformCheckBox": "QCheckBox", "advancedCollapsibleButton": "ctkCollapsibleButton",
    "guidanceScaleSpinBox": "QDoubleSpinBox", "cpuEngineLabel": "QLabel", "installOnnxRuntimeButton": "QPushButton",
}
# Widget class -> the parameter types Slicer's parameterNodeWrapper (guiConnectors.py) binds it to; "enum": an
# enum.Enum class of CDMSegment.py (QComboBoxToEnumConnector, which shows each member's label()).
BINDABLE = {"QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "QSpinBox": {"int"},
            "QComboBox": {"str", "int", "float", "bool", "enum"}, "QCheckBox": {"bool"},
            "qMRMLNodeComboBox": {"slicer.vtkMRMLScalarVolumeNode", "slicer.vtkMRMLSegmentationNode"}}
SPIN_BOXES = ("QSpinBox", "QDoubleSpinBox")


class RecordingLoader(QtUiTools.QUiLoader):
    """QUiLoader that remembers the class the .ui asked for, per widget name, before any fallback."""

    def __init__(self):
        super().__init__()
        self.requested = {}

    def createWidget(self, className, parent=None, name=""):
        self.requested.setdefault(name, className)
        return super().createWidget(className, parent, name)


def load_ui(path: Path):
    """(top widget, {widget name: widget}, {widget name: class named in the .ui}); Qt's error on a bad file."""
    QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = RecordingLoader()
    try:  # PySide6 raises where Qt returns no widget; Qt's own message is in errorString()
        top = loader.load(str(path))
    except RuntimeError:
        top = None
    if top is None:
        raise ValueError(f"Qt could not load {path.name}: {loader.errorString()}")
    widgets = {w.objectName(): w for w in top.findChildren(QtWidgets.QWidget) if w.objectName()}
    widgets[top.objectName()] = top
    return top, widgets, loader.requested


@pytest.fixture(scope="module")
def panel():
    top, widgets, requested = load_ui(UI_FILE)
    yield widgets, requested
    top.deleteLater()


def _class_of(name, widgets, requested):
    """The class Slicer will build: Qt's own for Qt classes, the .ui's for Slicer/CTK ones (built as QWidget here)."""
    built = widgets[name].metaObject().className()
    return built if built == requested[name] else requested[name]


def _used_names():
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def _enums():
    """The enum.Enum classes of CDMSegment.py, read from the source: {name: [member names]}."""
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    return {n.name: [s.targets[0].id for s in n.body if isinstance(s, ast.Assign)] for n in tree.body
            if isinstance(n, ast.ClassDef) and [ast.unparse(b) for b in n.bases] == ["enum.Enum"]}


def _parameters():
    """{name: (type, {annotation: its arguments}, default)} of CDMSegmentParameterNode, read from the source:
    'Annotated[float, WithinRange(0.0, 1.0)] = 0.5' -> ('float', {'WithinRange': [0.0, 1.0]}, 0.5);
    'Method = Method.cdm' -> ('enum', {'Enum': ['cdm', 'cg_cdm']}, 'cdm')."""
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    enums = _enums()
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CDMSegmentParameterNode")
    parameters = {}
    for statement in cls.body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        annotation, extras = statement.annotation, {}
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            annotation, *calls = annotation.slice.elts
            extras = {ast.unparse(c.func): [ast.literal_eval(a) for a in c.args] for c in calls}
        kind = ast.unparse(annotation)
        if kind in enums:
            assert ast.unparse(statement.value).startswith(f"{kind}."), statement.target.id
            kind, extras, default = "enum", {"Enum": enums[kind]}, statement.value.attr
        else:
            default = ast.literal_eval(statement.value) if statement.value is not None else None
        parameters[statement.target.id] = (kind, extras, default)
    return parameters


def _bound_widgets(widgets):
    """{parameter name: widget name} for every widget with Slicer's SlicerParameterName dynamic property."""
    return {w.property("SlicerParameterName"): name for name, w in widgets.items()
            if w.property("SlicerParameterName")}


def test_qt_refuses_a_widget_inside_a_string(tmp_path):
    """The defect this file guards against: Qt's loader stops at markup inside a <string>."""
    broken = UI_FILE.read_text(encoding="utf-8").replace(
        "<string>Input volume:</string>", '<string><widget class="QLabel" name="inner"/></string>', 1)
    assert broken != UI_FILE.read_text(encoding="utf-8")
    (tmp_path / "broken.ui").write_text(broken)
    with pytest.raises(ValueError, match="Unexpected element widget"):
        load_ui(tmp_path / "broken.ui")


def test_every_widget_the_code_uses_is_built_with_the_expected_class(panel):
    widgets, requested = panel
    used = _used_names()
    assert used, "no self.ui.<name> found: the parser or the module changed"
    for name in sorted(used):
        assert name in widgets, f"CDMSegment.py uses self.ui.{name}, which Qt did not build from CDMSegment.ui"
        assert name in EXPECTED_CLASSES, f"add self.ui.{name} to EXPECTED_CLASSES"
        assert _class_of(name, widgets, requested) == EXPECTED_CLASSES[name], name
    assert requested["CDMSegment"] == "qMRMLWidget"  # setMRMLScene is called on it


def test_bound_widgets_name_parameters_of_a_matching_type(panel):
    widgets, requested = panel
    parameters = _parameters()
    bound = _bound_widgets(widgets)
    assert {"inputVolume", "noiseLevel", "steps", "tau", "noiseDraws", "guidanceScale", "axis", "batchSize", "device",
            "method", "hardenTransform", "force", "outputSegmentation"} <= set(bound)
    for parameter, name in bound.items():
        assert parameter in parameters, f"{name} is bound to unknown parameter {parameter}"
        assert parameters[parameter][0] in BINDABLE[_class_of(name, widgets, requested)], (parameter, name)


def test_bindings_follow_slicers_connector_rules(panel):
    """connectGui raises for a combo box without a Choice and for a ctkSliderWidget without bounds, and
    sets an unbounded spin box's range to -inf..inf: each bound parameter must say its choices or range."""
    widgets, requested = panel
    parameters = _parameters()
    for parameter, name in _bound_widgets(widgets).items():
        kind, extras, default = parameters[parameter]
        cls = _class_of(name, widgets, requested)
        if cls == "QComboBox" and kind == "enum":
            assert default in extras["Enum"], parameter
        elif cls == "QComboBox":
            assert "Choice" in extras, f"{parameter}: a combo box needs an enum or Annotated[..., Choice([...])]"
            assert default in extras["Choice"][0], parameter
        if cls in SPIN_BOXES or cls == "ctkSliderWidget":
            assert "WithinRange" in extras, f"{parameter}: a {cls} needs Annotated[..., WithinRange(lo, hi)]"
            low, high = extras["WithinRange"]
            assert low <= default <= high, parameter
        if cls in SPIN_BOXES:  # what Qt Designer shows is what Slicer will set
            spin_box = widgets[name]
            assert (spin_box.minimum(), spin_box.maximum()) == pytest.approx((low, high)), parameter


def test_the_batch_size_is_automatic_by_default_and_the_spin_box_says_so(panel):
    """0 is "automatic" (the per-device batch size of core.runner.default_batch_size): the parameter's default,
    the spin box's minimum, shown as "auto" (specialValueText, in Qt 5 as in Qt 6)."""
    widgets, requested = panel
    kind, extras, default = _parameters()["batchSize"]
    spin_box = widgets[_bound_widgets(widgets)["batchSize"]]
    assert default == extras["WithinRange"][0] == spin_box.minimum() == 0
    spin_box.setValue(0)
    assert spin_box.text() == "auto"
    spin_box.setValue(16)
    assert spin_box.text() == "16"


def test_the_lesion_intensity_spans_its_range_and_zero_reads_off(panel):
    """0 turns the lesion-intensity refinement off (core/runner.refine_mask): the spin box says so; its range is
    the option's (0 to 1), the one the command line accepts."""
    widgets, requested = panel
    kind, extras, default = _parameters()["lesionIntensity"]
    spin_box = widgets[_bound_widgets(widgets)["lesionIntensity"]]
    assert kind == "float" and extras["WithinRange"] == [spin_box.minimum(), spin_box.maximum()] == [0.0, 1.0]
    spin_box.setValue(0.0)
    assert spin_box.text() == "off"
    spin_box.setValue(0.7)
    assert spin_box.text() == "0.70"


def test_the_speck_removal_is_in_ml_spans_its_range_and_zero_keeps_every_island(panel):
    """The speck removal (min_component_ml, core/threshold.voxels_for_ml) is a volume, so it means the same at any
    spacing: the spin box shows ml, 0 keeps every island, and its range is the parameter's."""
    widgets, requested = panel
    kind, extras, default = _parameters()["minComponentMl"]
    spin_box = widgets[_bound_widgets(widgets)["minComponentMl"]]
    assert kind == "float" and extras["WithinRange"] == [spin_box.minimum(), spin_box.maximum()] == [0.0, 100.0]
    spin_box.setValue(0.0)
    assert spin_box.text() == "keep all"
    spin_box.setValue(0.1)
    assert spin_box.text() == "0.10 ml"


def test_the_code_leaves_choice_bound_combo_boxes_to_slicer(panel):
    """Slicer fills a Choice-bound combo box itself; items added, removed or cleared by the code would
    no longer match the choices it reads back by index."""
    widgets, requested = panel
    source = SOURCE.read_text(encoding="utf-8")
    combo_boxes = [n for n in _bound_widgets(widgets).values() if _class_of(n, widgets, requested) == "QComboBox"]
    assert combo_boxes
    for name in combo_boxes:
        for call in ("addItem", "addItems", "clear()", "removeItem", "insertItem"):
            assert f"self.ui.{name}.{call}" not in source, f"self.ui.{name}.{call}"


def test_volume_selectors_offer_scalar_volumes_only(panel):
    """Labelmap, vector (RGB) and diffusion volumes derive from the scalar volume node: the selector hides
    child classes, so they are never offered instead of being refused after Apply."""
    widgets, requested = panel
    selectors = [n for n in widgets if requested.get(n) == "qMRMLNodeComboBox"
                 and "vtkMRMLSegmentationNode" not in widgets[n].property("nodeTypes")]
    assert selectors == ["inputVolumeSelector"]
    for name in selectors:
        assert widgets[name].property("nodeTypes") == ["vtkMRMLScalarVolumeNode"]
        assert widgets[name].property("showChildNodeTypes") is False
    source = SOURCE.read_text(encoding="utf-8")  # the extra selector made per further modality in CDMSegment.py
    assert 'nodeTypes = ["vtkMRMLScalarVolumeNode"]' in source and "showChildNodeTypes = False" in source


def _form_row(form, widget):
    """The row of a QFormLayout whose field is ``widget`` or a layout holding it."""
    for row in range(form.rowCount()):
        field = form.itemAt(row, QtWidgets.QFormLayout.FieldRole)
        if field is not None and (field.widget() is widget or (field.layout() and field.layout().indexOf(widget) >= 0)):
            return row
    raise AssertionError(f"{widget.objectName()} is in no row of {form.objectName()}")


def test_the_cpu_engine_line_and_its_install_button_sit_in_advanced(panel):
    """The line on what a CPU run uses (panel_choices.cpu_engine_text) and the button that offers ONNX Runtime are
    one row of the Advanced section (the code shows them only for a run on the CPU); the button says what it
    installs and that PyTorch stays."""
    widgets, requested = panel
    form = widgets["advancedCollapsibleButton"].layout()
    assert _form_row(form, widgets["cpuEngineLabel"]) == _form_row(form, widgets["installOnnxRuntimeButton"])
    assert widgets["cpuEngineLabel"].wordWrap()
    button = widgets["installOnnxRuntimeButton"]
    assert button.text() == "Install ONNX Runtime" and "PyTorch stays installed" in button.toolTip()


def test_choices_are_words_with_the_symbols_in_tooltips(panel):
    """Combo boxes show labels (the enums' label(), Slicer's enum connector), the Advanced labels are words, and
    the paper's symbols are in the tooltips."""
    import CDMSegment

    assert [m.label() for m in CDMSegment.Method] == ["CDM", "CG-CDM (classifier-guided)"]
    assert [m.label() for m in CDMSegment.Device] == ["Automatic", "GPU (CUDA)", "CPU"]
    assert [m.label() for m in CDMSegment.Axis] == ["Automatic (axial)", "Axial", "Coronal", "Sagittal"]
    widgets, requested = panel
    form = widgets["advancedCollapsibleButton"].layout()
    labels = {name: form.labelForField(widgets[name]).text() for name in ("noiseLevelSpinBox", "stepsSpinBox",
                                                                          "tauSpinBox", "guidanceScaleSpinBox")}
    assert labels == {"noiseLevelSpinBox": "Noise level:", "stepsSpinBox": "Denoising steps:",
                      "tauSpinBox": "Condition mix:", "guidanceScaleSpinBox": "Guidance scale (CG-CDM):"}
    for name, symbol in [("noiseLevelSpinBox", "alpha_bar(Q)"), ("stepsSpinBox", "R:"), ("tauSpinBox", "tau:"),
                         ("guidanceScaleSpinBox", "s:")]:
        assert symbol in widgets[name].toolTip(), name
    for text in [w.text() for w in widgets.values() if isinstance(w, QtWidgets.QLabel)]:
        assert not any(symbol in text for symbol in ("alpha_bar", "(R)", "Tau")), text


def test_there_is_no_empty_row_for_further_inputs_and_they_go_under_the_first(panel):
    """A one-modality model shows one input row; CDMSegmentWidget inserts one row per further modality right
    under the first input's (FIRST_INPUT_ROW)."""
    import CDMSegment

    widgets, requested = panel
    form = widgets["inputsCollapsibleButton"].layout()
    assert _form_row(form, widgets["inputVolumeSelector"]) == CDMSegment.CDMSegmentWidget.FIRST_INPUT_ROW
    assert "extraInputsWidget" not in widgets  # the empty container that held a blank row
    for row in range(form.rowCount()):
        field = form.itemAt(row, QtWidgets.QFormLayout.FieldRole)
        assert field is not None and (field.layout() is not None or requested[field.widget().objectName()] != "QWidget")


def test_the_output_segmentation_is_new_or_existing(panel):
    widgets, requested = panel
    selector = widgets["outputSegmentationSelector"]
    assert selector.property("nodeTypes") == ["vtkMRMLSegmentationNode"]
    assert selector.property("noneEnabled") is True and selector.property("noneDisplay") == "Create new segmentation"
    assert selector.property("addEnabled") is False and selector.property("removeEnabled") is False


# A long result: what result_text gives for a run with warnings, as the panel shows it after a run.
LONG_RESULT = ("155 of 155 slices in 103 s on cpu with ONNX Runtime; 10792 voxels (10.8 ml) segmented at threshold "
               "0.0002\nWarning: the image's intensities do not look like the FLAIR the model was trained on "
               "(score 1.73 above 1.50); this model takes skull-stripped brain MRI (FLAIR) (run anyway, as asked)")


def test_a_long_result_does_not_widen_the_panel():
    """Before a run the panel's minimum width is W; the status after a long result keeps it at W (the label
    wraps), where an unwrapped label pushed it from about 500 px to 675 px and the module panel scrolled."""
    top, widgets, requested = load_ui(UI_FILE)
    try:
        before = top.minimumSizeHint().width()
        widgets["statusLabel"].setText(LONG_RESULT)
        after = top.minimumSizeHint().width()
        assert after <= before and before < 560, (before, after)
        widgets["statusLabel"].setWordWrap(False)  # what the panel did before
        assert top.minimumSizeHint().width() > before + 300
    finally:
        top.deleteLater()
