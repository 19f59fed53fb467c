"""Render the CDMSegment panel as it looks after a run and put it to the left of the views' picture.

Qt's own loader (PySide6's QUiLoader, as Testing/test_ui.py) builds CDMSegment/Resources/UI/CDMSegment.ui
offscreen. PySide6 lacks Slicer's and CTK's widgets, so each is built as the plain Qt widgets it shows: a node
selector as a combo box holding the node's name, a collapsible section as a group box (its contents hidden when
collapsed), the slider widget as a slider beside a spin box. The panel is then filled as CDMSegmentWidget fills
it, from the same functions: the run's model described from its file, the input volume, the classes and the
Advanced defaults, the device line and the status line from the run's summary (``cdmsegment segment
--progress-lines``), the threshold slider over the heatmap's range at the run's threshold.

Usage:
    python tools/render_panel.py SAMPLE RUN.jsonl HEATMAP VIEWS.png OUT.png [--width 470]

Dependencies: PySide6-Essentials, SimpleITK, slicer-core (CDMSegment.py imports slicer); no torch.
"""

import argparse
import os
import sys
from pathlib import Path

import SimpleITK as sitk

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402

MODULE = Path(__file__).resolve().parent.parent / "CDMSegment"
sys.path.insert(0, str(MODULE))
import CDMSegment  # noqa: E402  (the panel's own labels and lines)
from CDMSegmentLib.core.model_description import describe_model, registered_classifier  # noqa: E402
from CDMSegmentLib.core.run_events import SUMMARY, read_event  # noqa: E402
from CDMSegmentLib.slicer_adapters import panel_choices  # noqa: E402

UI_FILE = MODULE / "Resources" / "UI" / "CDMSegment.ui"


class CollapsibleSection(QtWidgets.QGroupBox):
    """ctkCollapsibleButton's stand-in: a titled box whose contents are hidden when collapsed."""

    def show_state(self):
        collapsed = bool(self.property("collapsed"))
        self.setTitle(("\u25b8 " if collapsed else "\u25be ") + str(self.property("text")))
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not collapsed)
        if collapsed:  # the title alone, as a collapsed ctkCollapsibleButton
            self.setFlat(True)
            self.setFixedHeight(self.fontMetrics().height() + 4)


class SliderWidget(QtWidgets.QWidget):
    """ctkSliderWidget's stand-in: a slider and a spin box showing one value."""

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Horizontal)
        self.spin_box = QtWidgets.QDoubleSpinBox()
        layout.addWidget(self.slider)
        layout.addWidget(self.spin_box)

    def show_range(self, maximum: float, step: float, decimals: int, value: float):
        self.spin_box.setDecimals(decimals)
        self.spin_box.setRange(0.0, maximum)
        self.spin_box.setSingleStep(step)
        self.spin_box.setValue(value)
        self.slider.setRange(0, round(maximum / step))
        self.slider.setValue(round(value / step))


STAND_INS = {"qMRMLWidget": QtWidgets.QWidget, "qMRMLNodeComboBox": QtWidgets.QComboBox,
             "ctkCollapsibleButton": CollapsibleSection, "ctkSliderWidget": SliderWidget}


class StandInLoader(QtUiTools.QUiLoader):
    def createWidget(self, className, parent=None, name=""):
        if className not in STAND_INS:
            return super().createWidget(className, parent, name)
        widget = STAND_INS[className](parent)
        widget.setObjectName(name)
        return widget


def load_panel():
    """(top widget, {object name: widget}) of CDMSegment.ui, Slicer's widgets built as their stand-ins."""
    QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    # The .ui connects the top widget's mrmlSceneChanged signal to the node selectors: Slicer's, absent here.
    QtCore.QLoggingCategory.setFilterRules("qt.core.qobject.connect=false")
    top = StandInLoader().load(str(UI_FILE))
    if top is None:
        raise SystemExit(f"Qt could not load {UI_FILE}")
    widgets = {w.objectName(): w for w in top.findChildren(QtWidgets.QWidget) if w.objectName()}
    return top, widgets


def fill_after_run(ui: dict, summary: dict, heatmap_max: float, input_name: str) -> None:
    """What CDMSegmentWidget shows once the summary's model was chosen (useModel) and a run on ``input_name``
    finished (showResult)."""
    model = describe_model(summary["model"].rsplit(" ", 1)[0])  # "name version"
    classifier = describe_model(registered_classifier(model), kind="classifier")
    ui["modelSelector"].addItems(panel_choices.model_choices())
    ui["modelInfoLabel"].setText(panel_choices.model_text(model))
    ui["firstInputLabel"].setText(f"{model.modalities[0]}:")
    ui["inputVolumeSelector"].addItem(input_name)
    ui["targetClassSelector"].addItems(model.class_names[1:])
    for name, labels in [("methodSelector", CDMSegment.Method), ("deviceSelector", CDMSegment.Device),
                         ("axisSelector", CDMSegment.Axis)]:
        ui[name].addItems([member.label() for member in labels])
    bound = {w.property("SlicerParameterName"): w for w in ui.values() if w.property("SlicerParameterName")}
    for parameter, value in panel_choices.advanced_defaults(model, classifier).items():
        bound[parameter].setValue(value)  # the spin box the .ui binds to that parameter, as Slicer's connectors
    ui["deviceInfoLabel"].setText(CDMSegment.torchStatusText(summary["device"]))
    ui["progressBar"].hide()
    ui["statusLabel"].setText(panel_choices.result_text(summary))
    ui["outputSegmentationSelector"].addItem(f"{input_name} segmentation")
    top, step, decimals = panel_choices.slider_range(heatmap_max)
    ui["thresholdSlider"].show_range(top, step, decimals, summary["thresholds"][0])
    for section in ("inputsCollapsibleButton", "advancedCollapsibleButton", "outputsCollapsibleButton"):
        ui[section].show_state()


def render_panel(summary: dict, heatmap_max: float, input_name: str, width: int, height: int) -> QtGui.QImage:
    """The filled panel, ``width`` x ``height`` pixels (the spacer at its foot takes what it does not use)."""
    top, ui = load_panel()
    try:
        fill_after_run(ui, summary, heatmap_max, input_name)
        top.resize(width, height)
        return top.grab().toImage()
    finally:
        top.deleteLater()


def compose(panel: QtGui.QImage, views: QtGui.QImage) -> QtGui.QImage:
    """The panel at the left, top-aligned, and the views' picture to its right, at the views' height."""
    canvas = QtGui.QImage(panel.width() + views.width(), views.height(), QtGui.QImage.Format_RGB32)
    canvas.fill(panel.pixelColor(panel.width() - 1, panel.height() - 1))
    painter = QtGui.QPainter(canvas)
    painter.drawImage(0, 0, panel)
    painter.drawImage(panel.width(), 0, views)
    painter.end()
    return canvas


def read_summary(path: Path) -> dict:
    """The summary event of a run's JSON lines (``cdmsegment segment --progress-lines``)."""
    events = [read_event(line) for line in path.read_text(encoding="utf-8").splitlines()]
    summary = next((e for e in reversed(events) if e and e["event"] == SUMMARY), None)
    if summary is None:
        raise SystemExit(f"{path} holds no summary line: the run failed or was not made with --progress-lines")
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sample", type=Path, help="the run's input volume (its node name is the file's stem)")
    parser.add_argument("run", type=Path, help="the run's JSON lines (cdmsegment segment --progress-lines)")
    parser.add_argument("heatmap", type=Path, help="the run's heatmap (<stem>_heatmap.nrrd): the slider's range")
    parser.add_argument("views", type=Path, help="the views' picture (tools/render_screenshot.py)")
    parser.add_argument("out", type=Path, help="output PNG")
    parser.add_argument("--width", type=int, default=470, help="panel width in pixels (default 470)")
    args = parser.parse_args()
    views = QtGui.QImage(str(args.views))
    if views.isNull():
        raise SystemExit(f"cannot read {args.views}")
    heatmap_max = float(sitk.GetArrayFromImage(sitk.ReadImage(str(args.heatmap))).max())
    panel = render_panel(read_summary(args.run), heatmap_max, args.sample.name.split(".")[0], args.width,
                         views.height())
    # 256 colours with diffuse dithering keep the picture as it looks and the file under the repository's 500 kB
    # (Testing/test_packaging.py); quality 0: the strongest PNG compression
    picture = compose(panel, views).convertToFormat(QtGui.QImage.Format.Format_Indexed8,
                                                    QtCore.Qt.ImageConversionFlag.DiffuseDither)
    if not picture.save(str(args.out), "PNG", 0):
        raise SystemExit(f"cannot write {args.out}")
    print(f"wrote {args.out} ({panel.width() + views.width()}x{views.height()}), panel {panel.width()} px wide")


if __name__ == "__main__":
    main()
