"""What the panel offers and says (CDMSegmentLib.slicer_adapters.panel_choices): models, defaults and texts, without Qt."""

import importlib.metadata
import importlib.util
import json
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement  # pip's own parser (pytest depends on packaging)

from CDMSegmentLib.core.engine import ONNX_REQUIREMENTS
from CDMSegmentLib.core.model_description import registered_classifier
from CDMSegmentLib.core.modelfile import load_model, read_registry, sha256_of
from CDMSegmentLib.core.settings import CDMSettings
from CDMSegmentLib.slicer_adapters.panel_choices import (ONNX_DOWNLOAD_MB, advanced_defaults, cpu_engine_text,
                                                         metadata_text, model_choices, model_file_of, model_text,
                                                         onnx_install_question, onnx_install_requirements,
                                                         peek_metadata, progress_text, result_text, runs_on_cpu,
                                                         sampler_defaults, settings_from_parameters, slider_range,
                                                         torch_build, torch_version_problem)


def write_registry(tmp_path, entries):
    """A models.json of these entries, each with a SHA256 (a registry entry must have one)."""
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"sha256": "0" * 64, **e} for e in entries]}))
    return path


def test_only_diffusion_models_are_offered_the_default_first(tmp_path):
    registry = write_registry(tmp_path, [
        {"name": "other", "file": "o.pt", "kind": "diffusion"},
        {"name": "guide", "file": "g.pt", "kind": "classifier"},
        {"name": "main", "file": "m.pt", "kind": "diffusion", "default": True}])
    assert model_choices(registry) == ["main", "other"]


def test_the_bundled_model_is_offered_with_cgcdm_through_its_registered_classifier():
    bundled = [e for e in read_registry() if e["kind"] == "diffusion"]
    assert model_choices()[0] == next(e["name"] for e in bundled if e.get("default"))
    guide = registered_classifier(load_model(model_choices()[0]))
    assert guide is not None and load_model(guide, kind="classifier").kind == "classifier"


def test_the_classifier_is_found_by_the_model_file_not_its_name(tmp_path, tiny_model_path, tiny_model):
    sha = sha256_of(tiny_model_path)
    entry = {"name": "tiny", "file": "tiny.pt", "kind": "diffusion", "sha256": sha}
    guide = {"name": "guide", "file": "g.pt", "kind": "classifier", "sha256": "0" * 64}
    assert registered_classifier(tiny_model, write_registry(tmp_path, [{**entry, "classifier": "guide"}, guide])) == "guide"
    for entries in ([{**entry, "classifier": "nowhere"}, guide],  # names no registered classifier
                    [{**entry, "classifier": "tiny"}],  # names a diffusion model
                    [entry, guide],  # names none
                    [{**entry, "sha256": "1" * 64, "classifier": "guide"}, guide]):  # another file
        assert registered_classifier(tiny_model, write_registry(tmp_path, entries)) is None


def test_the_advanced_section_starts_from_the_measured_defaults():
    model = load_model()
    guide = load_model(registered_classifier(model), kind="classifier")
    values = advanced_defaults(model, guide)
    d = model.defaults
    assert (values["noiseLevel"], values["steps"], values["tau"], values["noiseDraws"]) == (
        d["noise_level"], d["steps"], d["tau"], d["noise_draws"])
    assert values["guidanceScale"] == guide.defaults["guidance_scale"] != 100.0  # measured, not the paper's s
    assert advanced_defaults(model)["guidanceScale"] == 100.0  # no classifier: the paper's s
    assert values["minComponentMl"] == d.get("min_component_ml", 0.0)  # its speck removal, in ml
    assert advanced_defaults(load_model("brain-flair-cpu"))["minComponentMl"] == 0.05  # chosen by calibrate-refinement


def test_choosing_cg_cdm_gives_the_advanced_section_its_classifiers_calibrated_settings():
    """brain-flair-cpu 4 was calibrated at alpha_bar 0.95, its classifier's scale and threshold at 0.8: CG-CDM from
    the panel runs where its threshold was measured, CDM where the model's was; the refinement is the model's."""
    model = load_model("brain-flair-cpu")
    guide = load_model(registered_classifier(model), kind="classifier")
    measured_at = guide.defaults["calibration"]["cdm_settings"]
    cdm, guided = advanced_defaults(model, guide, "cdm"), advanced_defaults(model, guide, "cg-cdm")
    assert cdm["noiseLevel"] == model.defaults["noise_level"] == 0.95
    assert guided["noiseLevel"] == measured_at["noise_level"] == 0.8
    assert (guided["steps"], guided["tau"], guided["noiseDraws"]) == (
        measured_at["steps"], measured_at["tau"], measured_at["noise_draws"])
    assert guided["guidanceScale"] == cdm["guidanceScale"] == guide.defaults["guidance_scale"]
    assert guided["lesionIntensity"] == cdm["lesionIntensity"] == model.defaults["lesion_intensity"]
    assert sampler_defaults(model, guide, "cg-cdm") == {k: v for k, v in guided.items()
                                                        if k not in ("lesionIntensity", "minComponentMl")}


def test_progress_reads_slices_done_of_total_with_the_time_left():
    assert progress_text(12, 155, "slices", 40.4, "on cuda") == "12 of 155 slices, about 40 s left\non cuda"
    assert progress_text(12, 155, "slices", 600, "") == "12 of 155 slices, about 10 min left"
    assert progress_text(155, 155, "slices", 0.0) == "155 of 155 slices"
    assert progress_text(3e6, 10e6, "MB", None) == "3 of 10 MB"
    assert progress_text(0, 0, "slices", None) == "Starting..."


def test_the_threshold_slider_spans_the_heatmap_in_200_steps_it_can_show():
    assert slider_range(2.0) == (2.0, 0.01, 3)
    assert slider_range(0.0) == (1.0, 0.005, 4)  # an all-zero heatmap still gives a usable slider
    top, step, decimals = slider_range(0.00178)  # the bundled model's heatmap on the sample
    assert round(step, decimals) == pytest.approx(step, rel=0.1)  # Qt keeps a step within 10%
    assert round(0.0001997, decimals) == pytest.approx(0.0001997, rel=0.01)  # and the calibrated threshold


def test_the_status_texts_name_the_model_and_the_result():
    model = load_model()
    text = model_text(model)
    assert model.metadata["name"] in text and f"{model.image_size} px" in text
    assert all(c in text for c in model.class_names[1:]) and model.class_names[0] not in text
    summary = {"slices_run": 3, "slices_total": 4, "seconds": 12.4, "device": "cpu", "voxels_segmented": 16,
               "volume_ml": 0.032, "thresholds": [0.0002]}
    assert result_text(summary) == "3 of 4 slices in 12 s on cpu; 16 voxels (0.0 ml) segmented at threshold 0.0002"
    assert result_text({**summary, "engine": "torch"}) == result_text(summary)
    assert result_text({**summary, "engine": "onnxruntime"}) == (
        "3 of 4 slices in 12 s on cpu with ONNX Runtime; 16 voxels (0.0 ml) segmented at threshold 0.0002")
    assert result_text({**summary, "refinement": {"lesion_intensity": 0.7}}) == (
        "3 of 4 slices in 12 s on cpu; 16 voxels (0.0 ml) segmented at threshold 0.0002, delineated by the "
        "lesion's intensity")
    assert result_text({**summary, "voxels_segmented": 0, "refinement": {"lesion_intensity": 0.7}}) == (
        "3 of 4 slices in 12 s on cpu; 0 voxels (0.0 ml) segmented at threshold 0.0002")
    supported = {"lesion_intensity": 0.7, "heatmap_support": 1.25, "heatmap_floor": 1.2}
    assert result_text({**summary, "refinement": supported, "supported_voxels": 5}) == (
        "3 of 4 slices in 12 s on cpu; 16 voxels (0.0 ml) segmented at threshold 0.0002, delineated by the "
        "lesion's intensity, with the bright regions its heatmap supports")
    # the support was on but added nothing: not said
    assert result_text({**summary, "refinement": supported, "supported_voxels": 0}) == result_text(
        {**summary, "refinement": {"lesion_intensity": 0.7}})
    assert result_text({**summary, "refinement": None}) == result_text(summary)  # a run without refinement


def _installed(monkeypatch, missing=()):
    """find_spec as if the packages in ``missing`` were not installed (the others as they are)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in missing else find_spec(name, *args))


def test_the_cpu_engine_line_names_onnxruntime_when_both_its_packages_are_installed(monkeypatch):
    _installed(monkeypatch)
    assert cpu_engine_text() == ("CPU engine: ONNX Runtime", False)


@pytest.mark.parametrize("missing", [("onnxruntime",), ("onnx",), ("onnx", "onnxruntime")])
def test_the_cpu_engine_line_offers_the_install_while_torch_runs_the_cpu(monkeypatch, missing):
    """The exporter needs onnx and the run onnxruntime: with either missing, auto takes torch on the CPU."""
    _installed(monkeypatch, missing)
    assert cpu_engine_text() == ("CPU engine: torch (ONNX Runtime is about 1.3x faster on a CPU)", True)


def test_the_install_question_says_what_how_big_and_that_torch_stays():
    question = onnx_install_question()
    assert "onnx>=1.14 and onnxruntime>=1.16" in question and f"about {ONNX_DOWNLOAD_MB} MB" in question
    assert "PyTorch stays installed and remains the fallback" in question and "numpy is left as it is" in question


def test_the_install_installs_the_engines_requirements_and_holds_numpy():
    """pip's arguments: the requirements pyproject's fast extra names, and numpy pinned at the installed version
    (pip then chooses onnx releases for it instead of replacing Slicer's numpy). This environment satisfies them."""
    arguments = onnx_install_requirements()
    assert isinstance(arguments, list)  # Slicer 5.6's pip_install takes a str or a list, not a tuple
    requirements = [Requirement(a) for a in arguments]
    assert [str(r) for r in requirements[:-1]] == list(ONNX_REQUIREMENTS)
    numpy = requirements[-1]
    assert numpy.name == "numpy" and str(numpy.specifier) == f"=={importlib.metadata.version('numpy')}"
    for requirement in requirements:
        assert requirement.specifier.contains(importlib.metadata.version(requirement.name)), requirement


def test_the_parameter_node_gives_one_settings_object_with_the_panel_values():
    panel = SimpleNamespace(noiseLevel=0.8, steps=3, tau=0.5, noiseDraws=2, guidanceScale=7.0, lesionIntensity=0.6,
                            minComponentMl=0.25)
    settings = settings_from_parameters(panel)
    assert settings == CDMSettings(noise_level=0.8, steps=3, tau=0.5, noise_draws=2, guidance_scale=7.0,
                                   lesion_intensity=0.6, min_component_ml=0.25)
    assert settings.command_line() == ["--noise-level", "0.8", "--steps", "3", "--tau", "0.5", "--noise-draws", "2",
                                       "--guidance-scale", "7.0", "--min-component-ml", "0.25",
                                       "--lesion-intensity", "0.6"]
    off = settings_from_parameters(SimpleNamespace(**{**vars(panel), "lesionIntensity": 0.0, "minComponentMl": 0.0}))
    assert off.command_line()[-4:] == ["--min-component-ml", "0.0", "--lesion-intensity", "0.0"]  # off, not the model's


@pytest.mark.parametrize("installed, ok", [("2.1.0", True), ("2.13.0+cpu", True), ("2.0.1+cu118", False),
                                           ("1.13.1", False), ("2.1.0a0+git1234", True), ("10.0", True)])
def test_an_old_torch_is_named_with_what_to_do(installed, ok):
    problem = torch_version_problem(installed, "2.1")
    assert (problem is None) == ok
    if not ok:
        assert installed in problem and "2.1 or newer" in problem


def test_a_model_is_described_from_its_file_without_torch(tmp_path, tiny_model_path):
    """peek_metadata reads what load_model reads, from the archive alone, in a process where torch is blocked:
    the panel fills the target class and the input rows before PyTorch is installed."""
    import subprocess
    import sys

    code = ("import sys, json; sys.modules['torch'] = None\n"
            "from CDMSegmentLib.slicer_adapters.panel_choices import model_file_of, peek_metadata, metadata_text\n"
            "bundled = peek_metadata(model_file_of('brain-flair-phantom'))\n"
            f"given = peek_metadata(model_file_of({str(tiny_model_path)!r}))\n"
            "print(json.dumps([bundled['class_names'], given['class_names'], given['modalities'], metadata_text(given)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    bundled_classes, classes, modalities, text = json.loads(done.stdout)
    model = load_model(tiny_model_path)
    assert [classes, modalities, text] == [model.class_names, model.modalities, model_text(model)]
    assert bundled_classes == ["normal", "tumour"]
    (tmp_path / "not-a-model.pt").write_bytes(b"not a zip")
    assert peek_metadata(tmp_path / "not-a-model.pt") is None and peek_metadata(None) is None
    assert model_file_of(str(tmp_path / "missing.pt")) is None


def test_a_registered_model_not_downloaded_yet_has_no_file(tmp_path):
    registry = write_registry(tmp_path, [{"name": "remote", "file": "remote.pt", "kind": "diffusion",
                                          "url": "https://example.org/remote.pt"}])
    assert model_file_of("remote", tmp_path / "cache", registry) is None
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "remote.pt").write_bytes(b"")
    assert model_file_of("remote", tmp_path / "cache", registry) == tmp_path / "cache" / "remote.pt"


def test_the_cpu_engine_line_is_for_runs_on_the_cpu():
    assert runs_on_cpu("cpu", "cuda") and not runs_on_cpu("cuda", "cpu")
    assert runs_on_cpu("auto", "cpu") and not runs_on_cpu("auto", "cuda") and not runs_on_cpu("auto", "rocm")
    assert runs_on_cpu("auto", "cuda", last_run_device="cpu") and not runs_on_cpu("auto", "cpu", "cuda:0")


def test_the_torch_build_is_read_from_its_package_without_importing_it():
    """The test environment's torch is the CPU build pinned in the Makefile (torch==2.13.0, +cpu or plain)."""
    distribution = importlib.metadata.distribution("torch")
    expected = "cuda" if ("+cu" in distribution.version or any(
        r.startswith("nvidia-") for r in distribution.requires or [])) else "cpu"
    assert torch_build() == expected
