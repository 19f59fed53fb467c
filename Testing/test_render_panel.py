"""The catalog screenshot's panel (tools/render_panel.py): CDMSegment.ui built by Qt's own loader, filled as the
module fills it after a run, grabbed at the size asked for, and put to the left of the views' picture."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtGui = pytest.importorskip("PySide6.QtGui")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import render_panel  # noqa: E402

from CDMSegmentLib.slicer_adapters.panel_choices import result_text  # noqa: E402

# A run's summary line as `cdmsegment segment --progress-lines` writes it (the sample with the default model).
SUMMARY = {"event": "summary", "class_names": ["tumour"], "thresholds": [0.0002658], "min_component_voxels": 47,
           "slices_total": 82, "slices_run": 66, "voxels_segmented": 13345, "volume_ml": 70.76, "seconds": 6.2,
           "device": "cpu", "model": "brain-flair-cpu 2", "warnings": [], "engine": "onnxruntime",
           "refinement": {"lesion_intensity": 0.7, "lesion_intensity_floor": 1.4, "lesion_support": 0.1,
                          "brain_median": 538.0}}


def test_the_panel_shows_the_run_in_the_widgets_the_ui_declares():
    top, ui = render_panel.load_panel()
    try:
        render_panel.fill_after_run(ui, SUMMARY, 0.0123, "CDMSegmentSample_flair")
        assert isinstance(ui["thresholdSlider"], render_panel.SliderWidget)
        assert isinstance(ui["advancedCollapsibleButton"], render_panel.CollapsibleSection)
        assert ui["inputVolumeSelector"].currentText() == "CDMSegmentSample_flair"
        assert ui["outputSegmentationSelector"].currentText() == "CDMSegmentSample_flair segmentation"
        assert ui["statusLabel"].text() == result_text(SUMMARY)
        from CDMSegmentLib.core.modelfile import load_model

        assert ui["modelInfoLabel"].text().startswith(f"brain-flair-cpu {load_model().metadata['version']}: ")
        assert ui["targetClassSelector"].currentText() == "tumour" and ui["methodSelector"].currentText() == "CDM"
        shown = ui["thresholdSlider"].spin_box
        assert shown.value() == pytest.approx(round(0.0002658, shown.decimals()))  # Qt rounds to the decimals
        assert ui["thresholdSlider"].spin_box.maximum() == pytest.approx(0.0123)
        assert ui["stepsSpinBox"].isHidden() and not ui["statusLabel"].isHidden()  # Advanced is collapsed
    finally:
        top.deleteLater()


def test_the_panel_is_grabbed_at_the_size_asked_and_holds_drawn_widgets():
    image = render_panel.render_panel(SUMMARY, 0.0123, "CDMSegmentSample_flair", 470, 900)
    assert (image.width(), image.height()) == (470, 900)
    background = image.pixelColor(image.width() - 1, image.height() - 1)
    drawn = sum(image.pixelColor(x, y) != background for x in range(0, 470, 2) for y in range(0, 450, 2))
    dark = sum(image.pixelColor(x, y).lightness() < 80 for x in range(0, 470, 2) for y in range(0, 450, 2))
    assert drawn > 0.2 * 235 * 225 and dark > 500, (drawn, dark)  # frames, fields and text, not a blank page


def test_the_views_are_placed_right_of_the_panel_unchanged():
    panel = QtGui.QImage(30, 20, QtGui.QImage.Format_RGB32)
    panel.fill(QtGui.QColor(200, 200, 200))
    views = QtGui.QImage(50, 40, QtGui.QImage.Format_RGB32)
    views.fill(QtGui.QColor(10, 20, 30))
    views.setPixelColor(0, 39, QtGui.QColor(255, 0, 0))
    canvas = render_panel.compose(panel, views)
    assert (canvas.width(), canvas.height()) == (80, 40)
    assert canvas.copy(30, 0, 50, 40) == views.convertToFormat(canvas.format())
    assert canvas.pixelColor(0, 0) == canvas.pixelColor(0, 39) == QtGui.QColor(200, 200, 200)
