"""segment-cohort: the cases shared out over two gloo CPU processes under torchrun give the same files as one process."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CDMSegmentLib.cli.cohort import read_cases
from CDMSegmentLib.cli.main import main
from CDMSegmentLib.core.errors import CDMSegmentError
from conftest import phantom
from test_train import free_port

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "CDMSegment"
DETERMINISTIC = ("case", "inputs", "slices_total", "slices_run", "voxels_segmented", "volume_ml", "error")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three small cases (so one rank takes two, the other one) and a file listing them."""
    folder = tmp_path_factory.mktemp("cohort")
    paths = []
    for n in range(3):
        image = sitk.GetImageFromArray(phantom((5, 14, 18), seed=n))
        image.SetSpacing((2.0, 1.1, 1.0))
        paths.append(folder / f"case{n}.nrrd")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def run_cohort(cases, out: Path, model: Path, processes: int) -> subprocess.CompletedProcess:
    """The command as a user types it: torchrun with ``processes`` ranks, one thread each, gloo on loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(PACKAGE_DIR)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "CDMSegmentLib.cli.main",
               "segment-cohort", *map(str, cases), "-o", str(out), "--model", str(model), "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def rows(out: Path) -> list:
    with open(out / "cohort_summary.csv") as f:
        return list(csv.DictReader(f))


def test_two_processes_write_the_same_files_and_summary_as_one(cohort, tiny_model_path, tmp_path):
    one = run_cohort(cohort, tmp_path / "one", tiny_model_path, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cohort(cohort, tmp_path / "two", tiny_model_path, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "3 of 3 cases segmented on 2 processes" in two.stdout
    assert two.stdout.count("cases segmented") == 1  # one summary, from rank 0
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(files) == 1 + 2 * len(cohort)  # summary, heatmap and segmentation per case
    for name in files:
        if name.endswith(".nrrd"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "two" / name)))
            assert np.array_equal(a, b), name  # noise comes from (seed, slice), never from the rank
    single, shared = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["case"] for r in shared] == ["case0", "case1", "case2"]
    assert [r["rank"] for r in shared] == ["0", "1", "0"]
    assert [[r[k] for k in DETERMINISTIC] for r in single] == [[r[k] for k in DETERMINISTIC] for r in shared]
    assert all(int(r["slices_run"]) == 5 and not r["error"] for r in shared)


def test_a_failing_case_is_a_row_with_its_error_and_the_exit_status_is_1(cohort, tiny_model_path, tmp_path, capsys):
    broken = tmp_path / "broken.nrrd"
    broken.write_text("not an image")
    status = main(["segment-cohort", str(cohort[0]), str(broken), "-o", str(tmp_path / "out"),
                   "--model", str(tiny_model_path), "--device", "cpu"])
    assert status == 1
    table = rows(tmp_path / "out")
    assert [r["case"] for r in table] == ["case0", "broken"]
    assert table[0]["error"] == "" and table[1]["error"] != ""
    assert "1 case(s) failed, first broken" in capsys.readouterr().err
    assert not (tmp_path / "out" / "broken_heatmap.nrrd").exists()


def test_cases_that_would_write_the_same_outputs_and_an_empty_cohort_are_refused(tmp_path):
    with pytest.raises(CDMSegmentError, match="two cases would write the same outputs"):
        read_cases(["a/flair.nii.gz", "b/flair.nii.gz"])
    with pytest.raises(CDMSegmentError, match="no cases given"):
        read_cases([])
    listed = tmp_path / "cases.txt"
    listed.write_text("x_flair.nii.gz,x_t1.nii.gz\n\ny_flair.nii.gz\n")
    assert read_cases([], listed) == [["x_flair.nii.gz", "x_t1.nii.gz"], ["y_flair.nii.gz"]]
