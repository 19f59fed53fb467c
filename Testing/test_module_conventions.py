"""CDMSegment.py follows Slicer's scripted-module conventions, checked as far as slicer-core allows: the Widget's
base-class order under Slicer's own VTKObservationMixin, a panel that opens without torch, a self-test that
returns (never SkipTest) where torch is missing, and what only Slicer's GUI runs, read from the source."""

import ast
import importlib.util
import inspect
import io
import json
import re
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
import slicer
import slicer.util
from slicer.util import VTKObservationMixin

import CDMSegment
from CDMSegment import CDMSegmentWidget, ScriptedLoadableModuleWidget
from CDMSegmentLib.core.registry import default_model_name

ROOT = Path(__file__).resolve().parent.parent
SOURCE = (ROOT / "CDMSegment" / "CDMSegment.py").read_text(encoding="utf-8")


def _method(class_name, name):
    cls = next(n for n in ast.parse(SOURCE).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _self_calls(function):
    return [n.func.attr for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"]


def test_the_widget_bases_are_in_slicers_template_order():
    assert CDMSegmentWidget.__bases__ == (ScriptedLoadableModuleWidget, VTKObservationMixin)
    mro = CDMSegmentWidget.__mro__
    assert mro.index(ScriptedLoadableModuleWidget) < mro.index(VTKObservationMixin)


def test_slicers_mixin_chains_its_init_so_the_order_decides_what_runs_twice():
    """Slicer's VTKObservationMixin.__init__ calls super().__init__() before making its observation table: with
    the mixin first, that super() is ScriptedLoadableModuleWidget.__init__ again, without the parent (in Slicer
    it then builds a floating panel and runs setup() before the table exists)."""
    assert "super().__init__()" in inspect.getsource(slicer.util.VTKObservationMixin.__init__)
    panel = object()
    widget = CDMSegmentWidget(panel)
    assert widget.parent is panel and widget.Observations == []

    class MixinFirst(VTKObservationMixin, ScriptedLoadableModuleWidget):
        __init__ = CDMSegmentWidget.__init__

    assert MixinFirst(panel).parent is None  # the second, parentless run of the widget's __init__


OPEN_PANEL = """
import sys
import CDMSegment
from CDMSegmentLib.slicer_adapters import mrml, panel_choices
import pytest
import slicer
CDMSegment.CDMSegmentWidget(object())
CDMSegment.CDMSegmentLogic()
print(CDMSegment.torchStatusText())
print(panel_choices.registry_text(panel_choices.model_choices()[0]))
print(panel_choices.cpu_engine_text())
mrml.default_input_volume(slicer.vtkMRMLScene())
from CDMSegmentLib.core.registry import default_cache_dir
shown = panel_choices.peek_metadata(panel_choices.model_file_of(panel_choices.model_choices()[0], default_cache_dir()))
panel_choices.metadata_text(shown), panel_choices.runs_on_cpu("auto", panel_choices.torch_build())
CDMSegment.applyProblem(True, [], False)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def _run(code, block_torch=False, extra_args=()):
    prelude = "import sys; sys.modules['torch'] = None\n" if block_torch else ""
    return subprocess.run([sys.executable, "-c", prelude + code, *extra_args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT / "CDMSegment",
                          env={"PYTHONPATH": str(ROOT / "CDMSegment"), "PATH": "/usr/bin"})


def test_opening_the_panel_imports_no_torch():
    """What setup() and enter() reach under slicer-core (the Widget, the Logic, the model list, the PyTorch line,
    the CPU engine line, the default input, the chosen model's description from its file, Apply's check) in a
    fresh interpreter: torch stays unimported, so CUDA is never initialised."""
    done = _run(OPEN_PANEL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "[]"
    assert lines[-3].startswith(f"{default_model_name()}: ") and lines[-3].endswith("at the first Apply.")
    assert lines[-2].startswith("('CPU engine: ")
    setup_calls = set(_self_calls(_method("CDMSegmentWidget", "setup")))
    setup_calls |= {c for name in ("initializeParameterNode", "populateModels", "enter") for c in
                    _self_calls(_method("CDMSegmentWidget", name))}
    assert not setup_calls & {"ensureDependencies", "useModel", "onModelChanged", "fetchChosenModel"}


# What choosing a model and pressing Apply reach in Slicer's process, under slicer-core: the model and its
# classifier checked and described, the Advanced defaults, the input rows and the target class, Apply's check of
# the output segmentation, the inputs checked against the model, the child's arguments, and a run started in its
# child process (then cancelled). The child imports torch; this process must not.
APPLY_IN_THE_PANEL = """
import json, sys
import numpy as np
import CDMSegment
from CDMSegmentLib.slicer_adapters import child_guard, child_process, mrml, panel_choices, result_files, worker_thread
from CDMSegmentLib.slicer_adapters.run_on_nodes import prepare_inputs, segment_arguments
sys.path.insert(0, sys.argv[1])
from scene_fixtures import add_volume, mrml_scene, phantom

logic = CDMSegment.CDMSegmentLogic()
assert logic.downloadNeeded(panel_choices.model_choices()[0]) is None
model = logic.fetchModel(panel_choices.model_choices()[0])
classifier = logic.fetchModel(logic.classifierFor(model), kind="classifier")
defaults = panel_choices.advanced_defaults(model, classifier)
with mrml_scene() as scene:
    node = add_volume(scene, phantom(), np.eye(4))
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert logic.editedSegments(output, node, [model.class_names[1]]) == []
    assert prepare_inputs([node], model)[0].array.shape == phantom().shape
    settings = panel_choices.settings_from_parameters(type("Parameters", (), defaults))
    arguments = segment_arguments(model, classifier=classifier, method="cg-cdm", settings=settings, target_class=1)
    assert arguments[:2] == ["--model", str(model.path)] and str(classifier.path) in arguments, arguments
    run = logic.startRun(node, model.path, 1, "cg-cdm", "cpu", settings)
    run.cancel()
    run.close()
print(json.dumps([panel_choices.model_text(model), defaults,
                  sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))]))
"""


def test_choosing_a_model_and_applying_import_no_torch_in_slicers_process():
    """The issue behind it: every Apply imported torch and initialised CUDA in Slicer's process, which on Windows
    locks torch's files, so the PyTorch extension could not upgrade torch without a restart. In a fresh
    interpreter with torch installed, nothing of it is imported (the run's child process loads the network).
    The newest-slicer environment (make test-newest-slicer) has neither torch nor the download's packages."""
    missing = [name for name in ("torch", "filelock", "requests") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: the panel's Apply and the run's child as a user has them")
    done = _run(APPLY_IN_THE_PANEL, extra_args=[str(ROOT / "Testing")])
    assert done.returncode == 0, done.stderr
    text, defaults, imported = json.loads(done.stdout.splitlines()[-1])
    assert imported == []
    assert text.startswith(f"{default_model_name()} ") and set(defaults) == {"noiseLevel", "steps", "tau", "noiseDraws",
                                                                          "guidanceScale", "lesionIntensity",
                                                                          "minComponentMl"}
    from CDMSegmentLib.core.model_description import describe_model

    assert defaults["lesionIntensity"] == describe_model().defaults["lesion_intensity"] > 0
    assert defaults["minComponentMl"] == describe_model().defaults["min_component_ml"] > 0


# What Slicer's CTest runs for slicer_add_python_unittest: slicer.testing.runUnitTest (Slicer 5.6.2 and main) loads
# the module's tests by name and runs them; runTest is never called, so every test_* method must guard itself.
RUN_UNIT_TEST = """
import sys, unittest
suite = unittest.TestLoader().loadTestsFromName("CDMSegment")
result = unittest.TextTestRunner(verbosity=2).run(suite)
print(result.testsRun, len(result.failures), len(result.errors), result.wasSuccessful())
"""


def test_slicers_ctest_passes_with_a_message_where_torch_is_missing():
    done = _run(RUN_UNIT_TEST, block_torch=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "0", "True"], done.stderr
    assert "test_sampleEndToEnd" in done.stderr
    assert "CDMSegment self-test: PyTorch is not installed" in done.stderr and "nothing was tested" in done.stderr
    assert "skipTest" not in SOURCE and "SkipTest" not in SOURCE.replace("never SkipTest", "")


def test_reload_and_test_returns_with_a_message_where_torch_is_missing():
    done = _run("import CDMSegment\nprint(repr(CDMSegment.CDMSegmentTest().runTest()))", block_torch=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert "CDMSegment self-test: PyTorch is not installed" in done.stderr


def _sample_test_with_dice(score, monkeypatch):
    """CDMSegmentTest.test_sampleEndToEnd as the CTest runs it, where torch and the sample are present, with
    the sample's Dice (which needs Slicer's SampleData and the application's scene) given."""
    monkeypatch.setattr(CDMSegment, "selfTestMissing", lambda: "")
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)

    class GivenDice(CDMSegment.CDMSegmentTest):
        def sampleDice(self):
            return score

    return unittest.TextTestRunner(stream=io.StringIO()).run(
        unittest.TestLoader().loadTestsFromTestCase(GivenDice))


def test_the_self_test_fails_below_the_dice_floor_and_passes_at_it(monkeypatch):
    below = _sample_test_with_dice(CDMSegment.SAMPLE_DICE_FLOOR - 0.01, monkeypatch)
    assert below.testsRun == 1 and len(below.failures) == 1
    assert f"the sample's Dice {CDMSegment.SAMPLE_DICE_FLOOR - 0.01:.3f} is below its floor" in below.failures[0][1]
    at_floor = _sample_test_with_dice(CDMSegment.SAMPLE_DICE_FLOOR, monkeypatch)
    assert at_floor.testsRun == 1 and at_floor.wasSuccessful()


def test_the_category_is_translated_as_slicers_own_modules():
    """Slicer 5.6's modules, e.g. SegmentEditor.py: translate("qSlicerAbstractCoreModule", "Segmentation")."""
    init = ast.unparse(_method("CDMSegment", "__init__"))
    assert "self.parent.categories = [translate('qSlicerAbstractCoreModule', 'Segmentation')]" in init
    assert CDMSegment.translate("qSlicerAbstractCoreModule", "Segmentation") == "Segmentation"  # slicer-core


def test_enter_exit_and_cleanup_follow_the_template():
    assert "initializeParameterNode" in _self_calls(_method("CDMSegmentWidget", "enter"))
    assert "disconnectGui" in ast.unparse(_method("CDMSegmentWidget", "exit"))
    cleanup = _self_calls(_method("CDMSegmentWidget", "cleanup"))
    assert {"cancelRun", "removeObservers"} <= set(cleanup) and "self.timer.stop()" in ast.unparse(
        _method("CDMSegmentWidget", "cleanup"))


def test_the_segment_editor_opens_from_its_button_only():
    calls = [n for n in ast.walk(ast.parse(SOURCE)) if isinstance(n, ast.Call)]
    assert not [c for c in calls if ast.unparse(c.func) == "self.openSegmentEditor"]
    assert 'self.ui.segmentEditorButton.connect("clicked(bool)", self.openSegmentEditor)' in SOURCE


def test_onnx_runtime_is_installed_only_after_consent_and_a_failure_leaves_the_line_true():
    """The install button: confirmOkCancelDisplay first (it returns before any install when refused), pip_install
    (Slicer 5.6 takes a str or a list, test_panel_choices.py) inside tryWithErrorDisplay, which shows a failure,
    and the CPU engine line re-read whatever happened: torch stays in use unless both packages import."""
    assert 'self.ui.installOnnxRuntimeButton.connect("clicked(bool)", self.onInstallOnnxRuntime)' in SOURCE
    install = _method("CDMSegmentWidget", "onInstallOnnxRuntime")
    consent, attempt = install.body[-2:]
    assert isinstance(consent, ast.If) and ast.unparse(consent.test) == (
        "not slicer.util.confirmOkCancelDisplay(onnx_install_question())")
    assert [type(s) for s in consent.body] == [ast.Return]
    assert isinstance(attempt, ast.Try) and not attempt.handlers
    guarded = attempt.body[0]
    assert isinstance(guarded, ast.With) and ast.unparse(guarded.items[0].context_expr).startswith(
        "slicer.util.tryWithErrorDisplay(")
    assert ast.unparse(guarded.body[0]) == "slicer.util.pip_install(onnx_install_requirements())"
    assert {"self.showCpuEngine()", "importlib.invalidate_caches()"} <= {ast.unparse(s) for s in attempt.finalbody}
    assert "showCpuEngine" in _self_calls(_method("CDMSegmentWidget", "updateControls"))
    assert "updateControls" in _self_calls(_method("CDMSegmentWidget", "setParameterNode"))
    # One error dialog: Slicer 5.12 and later show pip's own on a failure, so tryWithErrorDisplay stays quiet there.
    assert [ast.unparse(k) for k in guarded.items[0].context_expr.keywords][0] == "show=not slicerShowsPipErrors()"
    assert SOURCE.count("pip_install(") == 1


def _user_text_calls():
    """(call, its first argument) for every call that shows text to the user in CDMSegment.py: dialogs, the error
    wrapper, and assignments to a widget's text or toolTip."""
    shown = {"errorDisplay", "confirmOkCancelDisplay", "tryWithErrorDisplay", "getOpenFileName"}
    found = []
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.Call) and _called(node) in shown and node.args:
            argument = node.args[2] if _called(node) == "getOpenFileName" else node.args[0]
            found.append((ast.unparse(node.func), argument))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in ("text", "toolTip")
                                                for t in node.targets):
            found.append((ast.unparse(node.targets[0]), node.value))
    return found


def _called(call):
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _literal_text(node) -> bool:
    """Whether an expression holds English text not passed through _(): a string literal or f-string (outside
    a call), also as part of a sum or a conditional."""
    if isinstance(node, ast.Call):
        return False
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and any(c.isalpha() for c in node.value)
    if isinstance(node, ast.JoinedStr):
        return any(_literal_text(v) for v in node.values if isinstance(v, ast.Constant))
    return any(_literal_text(child) for child in ast.iter_child_nodes(node))


def test_the_texts_the_panel_shows_are_translatable():
    """Slicer's lupdate collects _() (slicer.i18n.tr, in Slicer 5.6 and later) and translate(); a bare string in
    a dialog, an error or a label would stay English in every language."""
    calls = _user_text_calls()
    assert len(calls) > 20, "the scan found too little: the source or the scan changed"
    bare = [f"{where}: {ast.unparse(text)}" for where, text in calls if _literal_text(text)]
    allowed = {'self.ui.firstInputLabel.text: f\'{modalities[0]}:\''}  # a model's own modality name
    assert set(bare) <= allowed, sorted(set(bare) - allowed)
    planted = ast.parse('slicer.util.errorDisplay("Could not do it")').body[0].value
    assert _literal_text(planted.args[0])  # the scan sees a bare one


def test_help_links_to_the_documentation_and_contributors_name_who_answers():
    init = ast.unparse(_method("CDMSegment", "__init__"))
    homepage = re.search(r'EXTENSION_HOMEPAGE "([^"]+)"', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert CDMSegment.DOCUMENTATION_URL == homepage and "<a href=" in init and "DOCUMENTATION_URL" in init
    assert "CDMSegment developers" not in SOURCE


def test_the_panel_uses_the_per_user_model_cache_as_the_console_and_the_child():
    """One cache per user: the panel's logic takes no cache folder of its own (the console's CDMSegmentLogic()
    and the command line use core.registry.default_cache_dir), and a logic given one hands it to its runs'
    child process (test_child_process.py checks the child's environment)."""
    setup = _method("CDMSegmentWidget", "setup")
    made = [n for n in ast.walk(setup) if isinstance(n, ast.Call) and _called(n) == "CDMSegmentLogic"]
    assert len(made) == 1 and not made[0].args and not made[0].keywords


def test_a_model_chosen_before_pytorch_is_checked_and_is_the_one_apply_runs():
    """What only Slicer's GUI runs, read from the source: choosing a model (a file among them) describes it and
    checks it whether PyTorch is installed or not (neither imports torch); Apply installs PyTorch, then checks
    the model shown when the checked one is another (never refilling the list, which put the bundled model
    back)."""
    changed = _method("CDMSegmentWidget", "onModelChanged")
    assert "torchInstalled" not in ast.unparse(changed)
    assert ast.unparse(changed.body[-1]) == "self.fetchChosenModel()" and "describeChosenModel" in _self_calls(changed)
    apply = _method("CDMSegmentWidget", "onApplyButton")
    calls = _self_calls(apply)
    assert calls.index("ensureDependencies") < calls.index("fetchChosenModel") and "populateModels" not in calls
    assert "self.modelSource != self.chosenSource()" in ast.unparse(apply)
    fetch = ast.unparse(_method("CDMSegmentWidget", "fetchChosenModel"))
    assert "source = self.chosenSource()" in fetch and "self.useModel(self.logic.fetchModel(source), source)" in fetch
    assert "self.model, self.modelSource, self.classifier = (model, source, None)" in ast.unparse(
        _method("CDMSegmentWidget", "useModel"))
