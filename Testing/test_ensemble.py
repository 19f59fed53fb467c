"""An ensemble model file: its networks' eps averaged as one network, the CDM's noise draws taking turns on them
(the same heatmap as each member at its own draw), written by `cdmsegment ensemble` from members of one recipe
only, and the same on ONNX Runtime as on torch."""

import re

import numpy as np
import pytest
import torch

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.core.cdm import cdm_heatmap
from CDMSegmentLib.core.engine import OnnxEnsemble, with_engine
from CDMSegmentLib.core.ensemble import UNetEnsemble, ensemble_members
from CDMSegmentLib.core.model_metadata import ENSEMBLE_TYPE
from CDMSegmentLib.core.errors import CDMSegmentError, ModelFileError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.methods import build_method, draw_noise
from CDMSegmentLib.core.modelfile import check_network, load_model
from CDMSegmentLib.core.runner import segment_volume
from CDMSegmentLib.core.settings import CDMParams
from CDMSegmentLib.core.unet import ConditionalUNet
from conftest import TINY_UNET, make_tiny_classifier_file, make_tiny_model_file


def run_cli(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def members(tmp_path):
    paths = [tmp_path / f"seed{s}.pt" for s in (0, 1)]
    for seed, path in enumerate(paths):
        make_tiny_model_file(path, seed=seed, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 2,
                                                        "threshold": 0.01})
    return paths


@pytest.fixture
def ensemble(members, tmp_path, capsys):
    code, out, err = run_cli(["ensemble", *members, "-o", tmp_path / "ensemble.pt", "--name", "tiny-ensemble",
                              "--version", "2"], capsys)
    assert code == 0, err
    assert "2 networks, 2 noise draws" in out and "--noise-draws 2" in out and "calibrate-refinement" in out
    return tmp_path / "ensemble.pt"


def test_the_ensemble_network_averages_its_members_eps_each_on_its_own_class_embedding():
    torch.manual_seed(0)
    nets = [ConditionalUNet(TINY_UNET).eval() for _ in range(3)]
    for net in nets:
        torch.nn.init.normal_(net.head[-1].weight, std=0.1)
    both = UNetEnsemble(nets).eval()
    y = torch.tensor([1, 0])
    emb = both.class_embedding(y)
    assert emb.shape == (2, 3 * nets[0].emb_dim)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([200, 200])
    mixed = 0.3 * emb[:1] + 0.7 * emb[1:]  # the CDM's tau-interpolation reaches each member as its own
    with torch.no_grad():
        expected = sum(n(x[:1], t[:1], 0.3 * n.class_embedding(y)[:1] + 0.7 * n.class_embedding(y)[1:]) for n in nets) / 3
        assert torch.allclose(both(x[:1], t[:1], mixed), expected, atol=1e-6)
    assert ensemble_members(both) == nets and ensemble_members(nets[0]) == [nets[0]]
    with pytest.raises(ValueError, match="two or more"):
        UNetEnsemble(nets[:1])


def test_the_ensemble_file_records_its_members_and_drops_what_must_be_measured_again(members, ensemble, capsys):
    model = load_model(ensemble)
    first = load_model(members[0])
    m = model.metadata
    assert m["name"] == "tiny-ensemble" and m["version"] == "2"
    assert m["architecture"] == {**first.metadata["architecture"], "type": ENSEMBLE_TYPE, "members": 2}
    assert "threshold" not in model.defaults and model.defaults["noise_draws"] == 2
    assert "calibration" not in model.defaults and "refinement_calibration" not in model.defaults
    assert "ood" not in m
    assert [r["sha256"] for r in m["training"]["members"]] == [first.sha256, load_model(members[1]).sha256]
    assert len(ensemble_members(model.network)) == 2
    code, out, _ = run_cli(["info", ensemble], capsys)
    assert code == 0 and "2 networks of this recipe" in out


def test_noise_draw_d_runs_through_member_d_mod_k(members, ensemble):
    model = load_model(ensemble)
    singles = [load_model(p) for p in members]
    params = CDMParams(noise_level=0.9, steps=1, tau=0.0, noise_draws=4)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    ids = torch.arange(3)
    noise = draw_noise(ids, x.shape[1:], 0, params)
    t_start = model.check_noise_level(0.9)
    with torch.no_grad():
        got = build_method("cdm", model, params)(x, ids, noise)
        per_draw = [cdm_heatmap(singles[d % 2].network, model.schedule(), x, t_start=t_start, steps=1, tau=0.0,
                                noise=noise[d]) for d in range(4)]
    expected = sum(per_draw) / 4
    assert got.abs().max() > 0
    assert torch.allclose(got, expected, atol=1e-6 * float(expected.abs().max()) + 1e-9)


def test_noise_draws_that_would_leave_a_member_out_are_refused(ensemble):
    with pytest.raises(CDMSegmentError, match="an ensemble of 2 networks .* multiple of 2 \\(--noise-draws 2\\), not 3"):
        build_method("cdm", load_model(ensemble), CDMParams(noise_level=0.9, steps=1, tau=0.0, noise_draws=3))


def test_the_ensemble_runs_on_onnxruntime_member_by_member_with_torchs_heatmap(ensemble, tmp_path):
    pytest.importorskip("onnxruntime")
    model = load_model(ensemble)
    onnx_model, engine = with_engine(model, "onnxruntime", tmp_path / "cache", log=lambda m: None)
    assert engine == "onnxruntime" and isinstance(onnx_model.network, OnnxEnsemble)
    # the members' sessions run in turn, so none spins its threads waiting for work (README, bench_speed)
    assert [m.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            for m in onnx_model.network.members] == ["0", "0"]
    graphs = sorted(p.name for p in (tmp_path / "cache" / "onnx").iterdir())
    assert len(graphs) == 2 and [g.split("-")[1] for g in graphs] == ["member0", "member1"]
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([300, 300])
    emb = model.network.class_embedding(torch.tensor([1, 0]))
    with torch.no_grad():
        expected = model.network(x, t, emb)
        assert float((onnx_model.network(x, t, emb) - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    volume = Volume(np.random.default_rng(0).integers(100, 1000, (3, 32, 32)).astype(np.float32),
                    spacing_mm=(1.0, 1.0, 1.0))
    runs = [segment_volume(model, [volume], device="cpu", engine=e, force=True, log=lambda m: None,
                           threshold=0.01) for e in ("torch", "onnxruntime")]
    assert [r.engine for r in runs] == ["torch", "onnxruntime"]
    assert np.abs(runs[0].heatmap).max() > 0
    assert np.abs(runs[0].heatmap - runs[1].heatmap).max() < 1e-3 * np.abs(runs[0].heatmap).max()


def test_a_member_whose_weights_disagree_with_the_metadata_is_refused(ensemble):
    model = load_model(ensemble)
    with pytest.raises(ModelFileError, match="its network has 1 input channels where its metadata says 2"):
        check_network(model.network, {**model.metadata, "in_channels": 2}, "ensemble.pt")


@pytest.mark.parametrize("case, message", [
    ("one", "an ensemble needs two or more model files"),
    ("image size", "seed1.pt differs from seed0.pt in its image_size \\(48 against 32\\)"),
    ("classifier", "classifier"),
    ("design", "brain-flair-phantom.pt differs from brain-flair-cpu.pt in its architecture.base_channels \\(32 against 16\\)"),
    ("nested", "ensemble.pt is not one ConditionalUNet \\(an ensemble already\\?\\)"),
])
def test_members_of_different_recipes_are_refused_in_one_line_and_nothing_is_written(members, ensemble, tmp_path,
                                                                                     capsys, case, message):
    if case == "image size":
        make_tiny_model_file(members[1], image_size=48, seed=1)
    if case == "classifier":
        make_tiny_classifier_file(tmp_path / "classifier.pt")
    inputs = {"one": members[:1], "image size": members, "nested": [members[0], ensemble],
              "classifier": [members[0], tmp_path / "classifier.pt"],
              "design": ["brain-flair-cpu", "brain-flair-phantom"]}[case]
    code, _, err = run_cli(["ensemble", *inputs, "-o", tmp_path / "out.pt", "--name", "x"], capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out.pt").exists()


def test_the_panels_noise_draws_step_by_the_ensembles_size_read_without_torch(ensemble, tiny_model_path):
    """Slicer's process describes a model without torch: the spin box steps by K for an ensemble of K, by 1 else."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from types import SimpleNamespace\n"
            "from CDMSegmentLib.slicer_adapters.panel_choices import noise_draws_step, peek_metadata\n"
            f"print(noise_draws_step(SimpleNamespace(metadata=peek_metadata({str(ensemble)!r}))),\n"
            f"      noise_draws_step(SimpleNamespace(metadata=peek_metadata({str(tiny_model_path)!r}))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "1"]


def test_three_networks_default_to_three_noise_draws_and_run_on_them(members, tmp_path, capsys):
    third = tmp_path / "seed2.pt"
    make_tiny_model_file(third, seed=2, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 2})
    code, out, err = run_cli(["ensemble", *members, third, "-o", tmp_path / "three.pt", "--name", "three"], capsys)
    assert code == 0, err
    model = load_model(tmp_path / "three.pt")
    assert model.defaults["noise_draws"] == 3 and "--noise-draws 3" in out
    volume = Volume(np.random.default_rng(0).integers(100, 1000, (2, 32, 32)).astype(np.float32),
                    spacing_mm=(1.0, 1.0, 1.0))
    run = segment_volume(model, [volume], device="cpu", engine="torch", force=True, log=lambda m: None, threshold=0.01)
    assert run.heatmap.shape == (2, 32, 32)


@pytest.mark.parametrize("case", ["copies", "registered name", "existing file", "folder"])
def test_what_the_ensemble_would_write_badly_is_refused_before_any_file(members, tmp_path, capsys, case):
    out = tmp_path / "out.pt"
    args = ["ensemble", *members, "-o", out, "--name", "x"]
    if case == "copies":
        args = ["ensemble", members[0], members[1], members[0], "-o", out, "--name", "x"]
        message = "seed0.pt is seed0.pt again: copies of one network make no ensemble"
    elif case == "registered name":
        version = load_model("brain-flair-cpu").metadata["version"]
        args = ["ensemble", *members, "-o", out, "--name", "brain-flair-cpu", "--version", version]
        message = (f"{out} not written: it would call itself brain-flair-cpu {version}, a registered model, without "
                   "its weights; give it a name or version of its own")
    elif case == "existing file":
        out.write_bytes(b"an earlier file")
        message = f"{out} already exists; choose another output file or pass --overwrite"
    else:
        out.mkdir()
        message = f"{out} is a folder; give the model file's own name"
    code, _, err = run_cli(args, capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and message in err, err
    assert out.is_dir() if case == "folder" else (out.read_bytes() == b"an earlier file" if case == "existing file"
                                                  else not out.exists())
    assert not list(tmp_path.glob("*.partial"))


def test_a_missing_output_folder_is_made_and_overwrite_replaces(members, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "e.pt"
    assert run_cli(["ensemble", *members, "-o", out, "--name", "x"], capsys)[0] == 0
    first = out.read_bytes()
    assert run_cli(["ensemble", *members, "-o", out, "--name", "x", "--version", "2", "--overwrite"], capsys)[0] == 0
    assert out.read_bytes() != first and load_model(out).metadata["version"] == "2"


def test_a_run_without_a_calibrated_threshold_says_it_cuts_at_otsu(ensemble):
    """Said beside the result (the summary line, Slicer's result text), as the input's findings are."""
    volume = Volume(np.random.default_rng(0).integers(100, 1000, (2, 32, 32)).astype(np.float32),
                    spacing_mm=(1.0, 1.0, 1.0))
    run = segment_volume(load_model(ensemble), [volume], device="cpu", engine="torch", force=True, log=lambda m: None)
    assert run.warnings[-1].startswith("tiny-ensemble stores no calibrated threshold for cdm, so the heatmap is cut "
                                       "at Otsu's threshold of this volume")
    given = segment_volume(load_model(ensemble), [volume], device="cpu", engine="torch", force=True, threshold=0.01,
                           log=lambda m: None)
    assert not any("calibrated threshold" in w for w in given.warnings)
