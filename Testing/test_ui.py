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
# Parameter type -> widget classes parameterNodeWrapper's connectGui can bind it to.
BINDABLE = {"float": {"QDoubleSpinBox", "ctkSliderWidget"}, "int": {"QSpinBox"}, "str": {"QComboBox"},
            "bool": {"QCheckBox"}, "slicer.vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}}


def _widgets():
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _used_names():
    tree = ast.parse(SOURCE.read_text())
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def _parameter_types():
    tree = ast.parse(SOURCE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CDMSegmentParameterNode")
    return {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_every_widget_the_code_uses_exists_with_the_expected_class():
    widgets = _widgets()
    used = _used_names()
    assert used, "no self.ui.<name> found: the parser or the module changed"
    for name in sorted(used):
        assert name in widgets, f"CDMSegment.py uses self.ui.{name}, which CDMSegment.ui lacks"
        assert name in EXPECTED_CLASSES, f"add self.ui.{name} to EXPECTED_CLASSES"
        assert widgets[name].get("class") == EXPECTED_CLASSES[name], name


def test_bound_widgets_name_parameters_of_a_matching_type():
    types = _parameter_types()
    bound = {}
    for name, widget in _widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    assert {"inputVolume", "noiseLevel", "steps", "tau", "noiseDraws", "guidanceScale", "axis", "batchSize", "device",
            "method", "hardenTransform", "threshold"} <= set(bound)
    for parameter, widget in bound.items():
        assert parameter in types, f"{widget.get('name')} is bound to unknown parameter {parameter}"
        assert widget.get("class") in BINDABLE[types[parameter]], (parameter, widget.get("class"))


def test_the_ui_declares_its_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared
