"""Static checks of the panel: every widget the module's code uses exists in the .ui with the expected
class, and every widget bound to the parameter node names a parameter of a matching type.
A renamed widget fails here instead of in a user's Slicer."""

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent / "CDMSegment"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CDMSegment.ui"
SOURCE = MODULE_DIR / "CDMSegment.py"

EXPECTED_CLASSES = {
    "applyButton": "QPushButton", "loadModelButton": "QPushButton", "segmentEditorButton": "QPushButton",
    "modelSelector": "QComboBox", "targetClassSelector": "QComboBox", "methodSelector": "QComboBox",
    "deviceSelector": "QComboBox", "axisSelector": "QComboBox", "modelInfoLabel": "QLabel",
    "deviceInfoLabel": "QLabel", "firstInputLabel": "QLabel", "statusLabel": "QLabel",
    "noiseLevelSpinBox": "QDoubleSpinBox", "tauSpinBox": "QDoubleSpinBox", "stepsSpinBox": "QSpinBox",
    "batchSizeSpinBox": "QSpinBox", "progressBar": "QProgressBar", "thresholdSlider": "ctkSliderWidget",
    "extraInputsWidget": "QWidget", "inputVolumeSelector": "qMRMLNodeComboBox",
    "hardenTransformCheckBox": "QCheckBox", "advancedCollapsibleButton": "ctkCollapsibleButton",
    "guidanceScaleSpinBox": "QDoubleSpinBox",
}
# Widget class -> the parameter types Slicer's parameterNodeWrapper (guiConnection.py) binds it to.
BINDABLE = {"QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "QSpinBox": {"int"},
            "QComboBox": {"str", "int", "float", "bool"}, "QCheckBox": {"bool"},
            "qMRMLNodeComboBox": {"slicer.vtkMRMLScalarVolumeNode"}}
SPIN_BOXES = {"QSpinBox": "number", "QDoubleSpinBox": "double"}


def _widgets():
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _used_names():
    tree = ast.parse(SOURCE.read_text())
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def _parameters():
    """{name: (type, {annotation: its arguments}, default)} of CDMSegmentParameterNode, read from the source:
    'Annotated[float, WithinRange(0.0, 1.0)] = 0.5' -> ('float', {'WithinRange': [0.0, 1.0]}, 0.5)."""
    tree = ast.parse(SOURCE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CDMSegmentParameterNode")
    parameters = {}
    for statement in cls.body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        annotation, extras = statement.annotation, {}
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            annotation, *calls = annotation.slice.elts
            extras = {ast.unparse(c.func): [ast.literal_eval(a) for a in c.args] for c in calls}
        default = ast.literal_eval(statement.value) if statement.value is not None else None
        parameters[statement.target.id] = (ast.unparse(annotation), extras, default)
    return parameters


def _bound_widgets():
    """{parameter name: its widget element} for every widget with a SlicerParameterName."""
    bound = {}
    for widget in _widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    return bound


def _ui_number(widget, name):
    prop = next((p for p in widget.findall("property") if p.get("name") == name), None)
    return None if prop is None else float(prop.find(SPIN_BOXES[widget.get("class")]).text)


def test_every_widget_the_code_uses_exists_with_the_expected_class():
    widgets = _widgets()
    used = _used_names()
    assert used, "no self.ui.<name> found: the parser or the module changed"
    for name in sorted(used):
        assert name in widgets, f"CDMSegment.py uses self.ui.{name}, which CDMSegment.ui lacks"
        assert name in EXPECTED_CLASSES, f"add self.ui.{name} to EXPECTED_CLASSES"
        assert widgets[name].get("class") == EXPECTED_CLASSES[name], name


def test_bound_widgets_name_parameters_of_a_matching_type():
    parameters = _parameters()
    bound = _bound_widgets()
    assert {"inputVolume", "noiseLevel", "steps", "tau", "noiseDraws", "guidanceScale", "axis", "batchSize", "device",
            "method", "hardenTransform", "force"} <= set(bound)
    for parameter, widget in bound.items():
        assert parameter in parameters, f"{widget.get('name')} is bound to unknown parameter {parameter}"
        assert parameters[parameter][0] in BINDABLE[widget.get("class")], (parameter, widget.get("class"))


def test_bindings_follow_slicers_connector_rules():
    """connectGui raises for a combo box without a Choice and for a ctkSliderWidget without bounds, and
    sets an unbounded spin box's range to -inf..inf: each bound parameter must say its choices or range."""
    parameters = _parameters()
    for parameter, widget in _bound_widgets().items():
        kind, extras, default = parameters[parameter]
        cls = widget.get("class")
        if cls == "QComboBox":
            assert "Choice" in extras, f"{parameter}: a combo box needs Annotated[..., Choice([...])]"
            assert default in extras["Choice"][0], parameter
        if cls in SPIN_BOXES or cls == "ctkSliderWidget":
            assert "WithinRange" in extras, f"{parameter}: a {cls} needs Annotated[..., WithinRange(lo, hi)]"
            low, high = extras["WithinRange"]
            assert low <= default <= high, parameter
        if cls in SPIN_BOXES:  # what Qt Designer shows is what Slicer will set
            assert (_ui_number(widget, "minimum"), _ui_number(widget, "maximum")) == (low, high), parameter


def test_the_code_leaves_choice_bound_combo_boxes_to_slicer():
    """Slicer fills a Choice-bound combo box itself; items added, removed or cleared by the code would
    no longer match the choices it reads back by index."""
    source = SOURCE.read_text()
    combo_boxes = [w.get("name") for w in _bound_widgets().values() if w.get("class") == "QComboBox"]
    assert combo_boxes
    for name in combo_boxes:
        for call in ("addItem", "addItems", "clear()", "removeItem", "insertItem"):
            assert f"self.ui.{name}.{call}" not in source, f"self.ui.{name}.{call}"


def test_the_ui_declares_its_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared
