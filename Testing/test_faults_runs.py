"""The fault suite, continued (test_faults.py holds inputs and outputs): settings outside their meaning, model
files that are not what they claim, and every way a run can end (signals at any moment, a run killed outright,
memory running out). Each ends in one line, a non-zero exit, no traceback and no partial file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from CDMSegmentLib.cli.segment_command import STOP_SIGNALS
from CDMSegmentLib.core.modelfile import load_model
from test_cli import assert_one_error_line, run_cli, write_case
from test_faults import PACKAGE_DIR, case

ENV = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR), "OMP_NUM_THREADS": "1"}


def broken_model(tmp: Path, source: Path, change) -> Path:
    """A copy of ``source`` whose metadata is ``change(metadata)``, written past save_model's checks."""
    model = load_model(source)
    path = tmp / "broken.pt"
    torch.jit.save(model.network, str(path), _extra_files={"metadata.json": json.dumps(change(dict(model.metadata)))})
    return path


MODEL_FAULTS = {
    "threshold 'high'": (lambda m: {**m, "defaults": {**m["defaults"], "threshold": "high"}},
                         "broken.pt: metadata field 'defaults.threshold' must be a finite number >= 0, got 'high'"),
    "expects as a string": (lambda m: {**m, "expects": "FLAIR"},
                            "broken.pt: metadata field 'expects' must be an object ({...}), got 'FLAIR'"),
    "training as a string": (lambda m: {**m, "training": "phantoms"},
                             "broken.pt: metadata field 'training' must be an object ({...}), got 'phantoms'"),
    "one class": (lambda m: {**m, "class_names": ["normal"]},
                  "broken.pt: metadata field 'class_names' must hold at least 2 class names"),
    "num_timesteps 0": (lambda m: {**m, "num_timesteps": 0},
                        "broken.pt: metadata field 'num_timesteps' must be a whole number in [2, 100000], got 0"),
    "noise draws 0": (lambda m: {**m, "defaults": {**m["defaults"], "noise_draws": 0}},
                      "broken.pt: metadata field 'defaults.noise_draws' must be a whole number in [1, 1000], got 0"),
    "heatmap sign 0": (lambda m: {**m, "heatmap_sign": 0}, "broken.pt: metadata field 'heatmap_sign' must be one of"),
}


@pytest.mark.parametrize("command", ["info", "segment"])
@pytest.mark.parametrize("name", MODEL_FAULTS)
def test_a_model_file_with_broken_metadata_is_one_line_naming_the_file_and_the_field(name, command, tmp_path,
                                                                                    tiny_model_path, capfd):
    change, words = MODEL_FAULTS[name]
    model = broken_model(tmp_path, tiny_model_path, change)
    argv = ["info", model] if command == "info" else ["segment", case(tmp_path), "-o", tmp_path / "out", "--model",
                                                      model, "--device", "cpu"]
    code, out, err = run_cli(argv, capfd)
    assert code == 1 and out == ""
    assert_one_error_line(err)
    assert words in err, err
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_a_model_says_it_is_a_folder(tmp_path, capfd):
    code, _, err = run_cli(["info", tmp_path], capfd)
    assert code == 1
    assert err == f"cdmsegment info: error: {tmp_path} is a folder, not a model file; give the model's .pt file\n"


SETTING_FAULTS = {
    "--threshold -1": ["--threshold", "-1"],
    "--min-component-ml nan": ["--min-component-ml", "nan"],
    "--noise-draws 0": ["--noise-draws", "0"],
    "--steps 0": ["--steps", "0"],
    "--tau 1": ["--tau", "1"],
    "--noise-level 0": ["--noise-level", "0"],
    "--guidance-scale inf": ["--guidance-scale", "inf"],
    "--batch-size 0": ["--batch-size", "0"],
    "--seed -1": ["--seed=-1"],
    "--target-class 0": ["--target-class", "0"],
}


@pytest.mark.parametrize("name", SETTING_FAULTS)
def test_a_setting_outside_its_meaning_is_one_usage_line_before_anything_runs(name, tmp_path, tiny_model_path, capfd):
    code, out, err = run_cli(["segment", case(tmp_path), "-o", tmp_path / "out", "--model", tiny_model_path,
                              *SETTING_FAULTS[name]], capfd)
    assert code == 2 and out == ""
    assert_one_error_line(err)
    assert "must be" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, said", [(["--axis", "diagonal"], "unknown slice axis 'diagonal'; use auto, axial"),
                                           (["--axis", "3"], "unknown slice axis '3'"),
                                           (["--method", "cdn"], "invalid choice: 'cdn' (choose from 'cdm', 'cg-cdm'")])
def test_an_unknown_axis_or_method_is_one_usage_line_before_the_model_loads(option, said, tmp_path, capfd):
    # a model path that does not exist: the parser must stop the run before anything looks for it
    code, out, err = run_cli(["segment", case(tmp_path), "-o", tmp_path / "out", "--model", tmp_path / "none.pt",
                              *option], capfd)
    assert code == 2 and out == "" and said in err
    assert_one_error_line(err)
    assert not (tmp_path / "out").exists()


def _segment(source: Path, out: Path, model: Path, *options, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "CDMSegmentLib.cli.main", "segment", str(source), "-o", str(out),
                             "--model", str(model), "--device", "cpu", "--engine", "torch", *options],
                            stdout=subprocess.PIPE, stderr=popen.pop("stderr", subprocess.PIPE), text=True, env=ENV,
                            **popen)


def _wait_for(condition, run: subprocess.Popen, timeout_s: float = 120) -> None:
    start = time.monotonic()
    while not condition():
        assert run.poll() is None, run.communicate()
        assert time.monotonic() - start < timeout_s
        time.sleep(0.002)


def test_ctrl_c_while_torch_is_importing_is_one_line(tmp_path, tiny_model_path):
    """The parser needs no torch: the command imports it under the same handling as the run itself."""
    run = _segment(case(tmp_path), tmp_path / "out", tiny_model_path)
    _wait_for(lambda: "libtorch" in Path(f"/proc/{run.pid}/maps").read_text(), run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert err == "cdmsegment segment: interrupted; no partial output was kept\n"


def test_the_parser_imports_nothing_heavy():
    code = ("import sys; from CDMSegmentLib.cli.main import build_parser; build_parser(); "
            "print(sorted({'torch', 'numpy', 'SimpleITK', 'scipy'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV).stdout == "[]\n"


def big_case(tmp: Path) -> Path:
    """Few slices (the tiny model runs them in a moment) of many voxels (their outputs take a while to write)."""
    noise = np.random.default_rng(0).integers(100, 1000, (4, 768, 768)).astype(np.int16)
    return write_case(tmp / "big.nii.gz", noise)


def partials(folder: Path) -> list:
    return sorted(folder.glob(".partial-*")) if folder.exists() else []


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT),
                                     (signal.SIGHUP,)])
def test_signals_during_the_write_leave_one_line_and_no_partial_file(signals, tmp_path, tiny_model_path):
    """stderr is a terminal, so tqdm draws its bar (whose destructor a second Ctrl-C used to interrupt).
    Two signals that arrive while one C call writes the output are both pending when it returns, and Python then
    runs their handlers in signal-number order, not in the order they came: either may be the one the run
    reports, but it reports exactly one of them, with its exit code and its word."""
    import pty

    out = tmp_path / "out"
    terminal, child_side = pty.openpty()
    run = _segment(big_case(tmp_path), out, tiny_model_path, stderr=child_side)
    os.close(child_side)
    _wait_for(lambda: partials(out), run)
    for s in signals:
        run.send_signal(s)
        time.sleep(0.01)
    err = b""
    with pytest.raises(OSError):  # EIO once the child has closed its side
        while chunk := os.read(terminal, 1 << 16):
            err += chunk
    os.close(terminal)
    run.wait(timeout=60)
    lines = [line for line in err.decode().replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode(), err.decode()
    if run.returncode == 0:  # the write finished before the signal: a whole result, nothing half-written
        assert sorted(p.name for p in out.iterdir()) == ["big.seg.nrrd", "big_heatmap.nrrd"]
        return
    reported = {128 + s: STOP_SIGNALS[s] for s in signals}
    assert run.returncode in reported, (run.returncode, lines)
    assert lines[-1].endswith(f"{reported[run.returncode]}; no partial output was kept"), lines
    assert list(out.iterdir()) == []


def test_partial_files_of_a_killed_run_are_removed_by_the_next_run_into_the_folder(tmp_path, tiny_model_path):
    out = tmp_path / "out"
    source = big_case(tmp_path)
    run = _segment(source, out, tiny_model_path)
    _wait_for(lambda: partials(out), run)
    run.kill()  # SIGKILL: no clean-up runs
    run.wait()
    left = partials(out)
    assert left and all(f".partial-{run.pid}-" in p.name for p in left)  # recognisably ours, and whose
    older = out / ".partial-k2j4x9ab-big.seg.nrrd"  # an older version's name: no process to ask
    older.write_bytes(b"half a file")
    again = _segment(source, out, tiny_model_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"removed {len(left)} partial output file(s) that a run killed before its clean-up left in {out}" in err
    assert f"1 partial output file(s) of another run are in {out} (first: {older.name}); delete them" in err
    assert partials(out) == [older]


def test_running_out_of_memory_on_the_cpu_says_what_ran_out_and_what_to_do(tmp_path, tiny_model_path):
    """An address-space limit a little above what the program needs before reading the image (measured here,
    as it differs between torch builds), and a volume that needs far more."""
    code = ("from CDMSegmentLib.cli import segment_files; "
            "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])")
    needed_kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV).stdout)
    limit = (needed_kib << 10) + (300 << 20)
    volume = np.zeros((60, 768, 768), np.int16)
    volume[:, 100:600, 100:600] = np.arange(500, dtype=np.int16)[None, None] + 100  # compresses: written quickly
    source = write_case(tmp_path / "large.nii.gz", volume)

    def limited():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    run = _segment(source, tmp_path / "out", tiny_model_path, preexec_fn=limited)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 1, err
    assert_one_error_line(err)
    assert "out of memory (RAM)" in err and "fewer slices per batch (--batch-size 1), crop the volume" in err
    assert partials(tmp_path / "out") == [] and not list((tmp_path / "out").glob("*.nrrd"))


@pytest.mark.parametrize("argv", [["info", "--json"], ["info"]])
def test_a_reader_that_went_away_ends_the_command_quietly(argv, tiny_model_path):
    """'cdmsegment info | head -1', or a parent that died: no BrokenPipeError traceback, SIGPIPE's exit status."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    run = subprocess.run([sys.executable, "-m", "CDMSegmentLib.cli.main", *argv, str(tiny_model_path)],
                         stdout=write_end, stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
    os.close(write_end)
    assert (run.returncode, run.stderr) == (141, "")


def test_a_broken_model_registry_is_one_line(tmp_path):
    from CDMSegmentLib.core.errors import ModelFileError

    registry = tmp_path / "models.json"
    for content in ('{"models": [{"name": "x"}]}', '{"models": 3}', '[]'):
        registry.write_text(content)
        with pytest.raises(ModelFileError, match="is not a valid model registry"):
            load_model("x", registry=registry)


@pytest.mark.parametrize("target_class", ["1", 1.5, 0, True])
def test_a_target_class_that_is_not_a_class_number_is_refused_by_the_python_api(target_class, tiny_model):
    from CDMSegmentLib.core.errors import CDMSegmentError

    with pytest.raises(CDMSegmentError, match="^target_class must be a whole number >= 1"):
        tiny_model.target_classes(target_class)


def test_a_stop_inside_the_creation_of_a_temporary_output_leaves_no_file(tmp_path, monkeypatch):
    """The signal lands after the file system made the second temporary file and before its name came back: the
    name was recorded first, so the clean-up removes it (with tempfile.mkstemp the file stayed)."""
    from CDMSegmentLib.cli import writers

    real_open, calls = os.open, []

    def open_then_stop(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        calls.append(path)
        if len(calls) == 2:
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(writers.os, "open", open_then_stop)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with writers.atomic_outputs([out / "a_heatmap.nrrd", out / "a.seg.nrrd"]):
            pass
    assert len(calls) == 2 and list(out.iterdir()) == []


def test_a_stopped_training_run_says_that_its_checkpoint_is_kept_and_the_same_command_resumes(tmp_path):
    """Not "no partial output was kept": a training run's last checkpoint stays, and the rerun starts from it."""
    from CDMSegmentLib.data.slicesets import SliceDataset, save_slices

    x = torch.full((8, 1, 16, 16), -1.0)
    x[:4, :, 4:12, 4:12] = 0.5
    save_slices(tmp_path / "train.npz", SliceDataset(x, torch.tensor([1] * 4 + [0] * 4), list("aabbccdd")))
    command = [sys.executable, "-m", "CDMSegmentLib.cli.main", "train", str(tmp_path / "train.npz"), "-o",
               str(tmp_path / "run"), "--steps", "100000", "--batch-size", "2", "--base-channels", "8",
               "--channel-mults", "1,2", "--attention-levels", "", "--checkpoint-every", "2", "--precision", "fp32"]
    # tqdm's bar draws blocks in UTF-8 whatever the locale (CI's is ASCII): read both runs' output as UTF-8
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", env=ENV)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    _wait_for(checkpoint.exists, run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("cdmsegment train: interrupted; the run folder keeps the last checkpoint "
                                            "written, if any: the same command resumes from it")
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert step >= 2 and step % 2 == 0
    steps = command.index("100000")
    resumed = subprocess.run([*command[:steps], str(step + 2), *command[steps + 1:]], capture_output=True,
                             encoding="utf-8", env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout + resumed.stderr
    assert torch.load(checkpoint, weights_only=False)["step"] == step + 2
