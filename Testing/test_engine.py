"""The ONNX Runtime engine gives torch's answer: the network's output, the CDM heatmap and the mask,
with the graph exported once per model into the cache, and torch whenever ONNX Runtime cannot run."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from CDMSegmentLib.core import engine as engine_module
from CDMSegmentLib.core.engine import OnnxNetwork, choose_engine, onnx_file, with_engine
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.files import new_file_mode
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.modelfile import MODELS_DIR, load_model
from CDMSegmentLib.core.registry import default_model_name
from CDMSegmentLib.core.reading import read_volume
from CDMSegmentLib.core.runner import segment_volume
from CDMSegmentLib.evaluation.metrics import dice
from conftest import make_tiny_model_file

SAMPLE = MODELS_DIR.parent / "Sample"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def bundled():
    return load_model()


@pytest.fixture(scope="module")
def onnx_bundled(bundled, tmp_path_factory):
    model, engine = with_engine(bundled, "onnxruntime", tmp_path_factory.mktemp("cache"), log=lambda m: None)
    assert engine == "onnxruntime"
    return model


def test_auto_takes_onnxruntime_on_a_cpu_in_fp32_and_torch_elsewhere():
    assert choose_engine("auto", CPU) == "onnxruntime"
    assert choose_engine("auto", CPU, "fp32") == "onnxruntime"
    assert choose_engine("auto", CPU, "bf16") == "torch"
    assert choose_engine("auto", CUDA) == "torch"
    assert choose_engine("torch", CPU) == "torch"


def test_auto_takes_torch_when_onnxruntime_is_missing_and_asking_for_it_says_what_to_install(monkeypatch):
    monkeypatch.setattr(engine_module.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else object())
    assert choose_engine("auto", CPU) == "torch"
    with pytest.raises(CDMSegmentError, match="pip install onnx onnxruntime, or use --engine torch"):
        choose_engine("onnxruntime", CPU)


@pytest.mark.parametrize("device, precision", [(CUDA, "auto"), (CPU, "fp16")])
def test_onnxruntime_on_a_gpu_or_in_reduced_precision_is_refused(device, precision):
    with pytest.raises(CDMSegmentError, match="CPU in fp32 only"):
        choose_engine("onnxruntime", device, precision)


@pytest.mark.parametrize("options, message", [({"engine": "onnxruntime", "precision": "fp16"}, "CPU in fp32 only"),
                                              ({"batch_size": 0}, "batch_size must be a whole number in \\[1, 65536\\], got 0")])
def test_conflicting_choices_are_refused_before_the_image_is_scored(bundled, options, message):
    """A noise volume the plausibility checks would refuse: the choices' own error comes first."""
    noise = np.random.default_rng(0).integers(1, 1000, (4, 64, 64)).astype(np.int16)
    with pytest.raises(CDMSegmentError, match=message):
        segment_volume(bundled, [Volume(noise, spacing_mm=(1.0, 1.0, 1.0))], device="cpu", log=lambda m: None,
                       **options)


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(CDMSegmentError, match="unknown engine 'tensorrt'; use auto, torch, onnxruntime"):
        choose_engine("tensorrt", CPU)


@pytest.mark.parametrize("shape", [(8, 1, 128, 128), (4, 1, 96, 112), (2, 1, 64, 128)])
def test_the_onnx_network_gives_the_torchscript_networks_output_and_class_difference(bundled, onnx_bundled, shape):
    torch.manual_seed(0)
    b = shape[0] // 2
    x = torch.randn(b, *shape[1:]).repeat(2, 1, 1, 1)
    t = torch.full((shape[0],), 300)
    emb = bundled.network.class_embedding(torch.tensor([1] * b + [0] * b)).detach()
    assert isinstance(onnx_bundled.network, OnnxNetwork)
    with torch.no_grad():
        expected, got = bundled.network(x, t, emb), onnx_bundled.network(x, t, emb)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    difference, expected_difference = got[:b] - got[b:], expected[:b] - expected[b:]
    assert float((difference - expected_difference).abs().max()) < 1e-3 * float(expected_difference.abs().max())
    assert torch.equal(onnx_bundled.network.class_embedding(torch.tensor([1, 0])),
                       bundled.network.class_embedding(torch.tensor([1, 0])))


def test_a_window_off_the_unets_grid_goes_to_torch_and_gives_torchs_output_exactly(bundled, onnx_bundled):
    x, t = torch.randn(2, 1, 100, 100), torch.full((2,), 300)
    emb = bundled.network.class_embedding(torch.tensor([1, 0]))
    with torch.no_grad():
        assert torch.equal(onnx_bundled.network(x, t, emb), bundled.network(x, t, emb))


def test_the_runner_on_onnxruntime_gives_torchs_heatmap_and_mask_on_the_sample(bundled):
    flair = read_volume(SAMPLE / "CDMSegmentSample_flair.nrrd")
    # six slices through the lesion's widest part: enough for a mask, short enough for a test
    volume = Volume(np.ascontiguousarray(flair.array[54:60]), flair.spacing_mm, flair.origin_mm, flair.direction)
    runs = {e: segment_volume(bundled, [volume], device="cpu", engine=e, force=True, log=lambda m: None)
            for e in ("torch", "onnxruntime")}
    assert [r.engine for r in runs.values()] == ["torch", "onnxruntime"]
    a, b = runs["torch"].heatmap, runs["onnxruntime"].heatmap
    assert a.max() > 0 and runs["torch"].mask.sum() > 100
    assert np.abs(a - b).max() < 1e-3 * a.max()
    assert dice(runs["torch"].mask > 0, runs["onnxruntime"].mask > 0) > 0.999


def test_the_graph_is_exported_once_per_model_into_the_cache_with_the_mode_of_any_new_file(bundled, tmp_path):
    first = onnx_file(bundled, tmp_path)
    assert first.parent == tmp_path / "onnx" and bundled.sha256[:32] in first.name
    assert stat.S_IMODE(first.stat().st_mode) == new_file_mode()
    mtime = first.stat().st_mtime_ns
    assert onnx_file(bundled, tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary file left


@pytest.mark.parametrize("damage", ["not a graph", "another model's graph"])
def test_a_cached_graph_that_does_not_reproduce_the_model_is_exported_again_and_said(bundled, tmp_path, damage):
    graph = onnx_file(bundled, tmp_path)
    size = graph.stat().st_size
    if damage == "not a graph":
        graph.write_bytes(b"not an onnx graph")
    else:  # a valid graph with the right inputs, of a model with other weights
        make_tiny_model_file(tmp_path / "other.pt", image_size=bundled.image_size)
        other = load_model(tmp_path / "other.pt")
        graph.write_bytes(onnx_file(other, tmp_path / "other-cache").read_bytes())
    said = []
    model, engine = with_engine(bundled, "onnxruntime", tmp_path, log=said.append)
    assert engine == "onnxruntime"
    assert said == [f"the cached ONNX graph {graph} did not reproduce the model's output; exporting it again"]
    assert graph.stat().st_size == size
    x, t = torch.randn(2, 1, 128, 128), torch.full((2,), 300)
    emb = bundled.network.class_embedding(torch.tensor([1, 0]))
    with torch.no_grad():
        assert torch.allclose(model.network(x, t, emb), bundled.network(x, t, emb), atol=1e-4)


def test_a_graph_that_never_agrees_leaves_the_run_on_torch_and_says_so_unless_it_was_asked_for(bundled, tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setattr(engine_module, "_agrees", lambda network, probe, expected: False)
    said = []
    model, engine = with_engine(bundled, "onnxruntime", tmp_path, log=said.append)
    assert (model, engine) == (bundled, "torch")
    assert len(said) == 2 and said[0].endswith("exporting it again")
    assert said[1] == "ONNX Runtime not used: its graph's output did not reproduce the model's; this run uses torch"
    with pytest.raises(CDMSegmentError, match=r"^the onnxruntime engine cannot run: its graph's output did not "
                                              r"reproduce the model's \(--engine torch runs without it\)$"):
        with_engine(bundled, "onnxruntime", tmp_path, log=said.append, required=True)


def test_a_model_whose_own_output_is_not_finite_stays_on_torch_silently(tmp_path):
    make_tiny_model_file(tmp_path / "nan.pt")
    model = load_model(tmp_path / "nan.pt")
    with torch.no_grad():
        for p in model.network.parameters():
            p.fill_(float("nan"))
    said = []
    assert with_engine(model, "onnxruntime", tmp_path, log=said.append) == (model, "torch")
    assert said == [] and not (tmp_path / "onnx").exists()


def test_an_unwritable_cache_leaves_the_run_on_torch_in_one_line_or_is_the_error_when_asked_for(bundled, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    said = []
    assert with_engine(bundled, "onnxruntime", blocker, log=said.append) == (bundled, "torch")
    assert said == [f"ONNX Runtime not used: cannot write the ONNX graph to {blocker / 'onnx'} (Not a directory); set "
                    "CDMSEGMENT_CACHE to a writable folder (default ~/.cache/CDMSegment/models); this run uses torch"]
    with pytest.raises(CDMSegmentError, match=r"cannot write the ONNX graph to .*CDMSEGMENT_CACHE.* \(--engine torch"):
        with_engine(bundled, "onnxruntime", blocker, log=said.append, required=True)


def test_the_cli_names_the_engine_in_its_summary_and_refuses_an_unknown_one(tmp_path):
    env = {**os.environ, "CDMSEGMENT_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).parents[1] / "CDMSegment")}
    flair = read_volume(SAMPLE / "CDMSegmentSample_flair.nrrd")
    import SimpleITK as sitk

    small = Volume(np.ascontiguousarray(flair.array[55:58]), flair.spacing_mm, flair.origin_mm, flair.direction)
    sitk.WriteImage(small.to_sitk(), str(tmp_path / "small.nrrd"))
    command = [sys.executable, "-m", "CDMSegmentLib.cli.main", "segment", str(tmp_path / "small.nrrd"),
               "-o", str(tmp_path / "out"), "--force"]
    done = subprocess.run(command + ["--engine", "onnxruntime"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"s on cpu (onnxruntime) with model {default_model_name()} " in done.stdout
    on_torch = subprocess.run(command + ["--engine", "torch", "--overwrite"], capture_output=True, text=True, env=env)
    assert on_torch.returncode == 0 and f"s on cpu (torch) with model {default_model_name()} " in on_torch.stdout
    refused = subprocess.run(command + ["--engine", "tensorrt"], capture_output=True, text=True, env=env)
    assert refused.returncode != 0
    assert "invalid choice: 'tensorrt'" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_an_onnxruntime_that_fails_to_import_leaves_the_run_on_torch_and_says_so(bundled, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import that fails looks like
    said = []
    assert with_engine(bundled, "onnxruntime", tmp_path, log=said.append) == (bundled, "torch")
    assert len(said) == 1 and said[0].startswith("ONNX Runtime not used: onnxruntime could not be loaded (")
    assert said[0].endswith("; this run uses torch")
