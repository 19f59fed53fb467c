"""`make retrain`'s check before any training (Makefile, retrain-check): the OOD reference's minimum, and kept
phantom folders made with another number of cases, each stopped with one line saying what to do."""

import shutil
import subprocess
from pathlib import Path

import pytest

from CDMSegmentLib.core.ood import NOISE_LEVELS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make, as `make test` does")


def retrain_check(run_dir: Path, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "retrain-check",
                           f"RETRAIN_DIR={run_dir}", *variables], capture_output=True, text=True, timeout=60)


def cases_folder(run_dir: Path, name: str, cases: int) -> Path:
    folder = run_dir / name
    folder.mkdir(parents=True)
    (folder / "cases.csv").write_text("case,family\n" + "".join(f"c{i},healthy\n" for i in range(cases)))
    return folder


def test_a_new_run_folder_at_the_recipe_s_sizes_passes(tmp_path):
    result = retrain_check(tmp_path / "run")
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_too_few_ood_volumes_stop_the_recipe_at_the_minimum_the_ood_score_needs(tmp_path):
    needed = 3 * len(NOISE_LEVELS)  # core/ood.check_reference_volumes, which calibrate-ood applies after training
    short = retrain_check(tmp_path / "run", f"OOD_CASES={needed - 1}")
    assert short.returncode == 2
    assert short.stdout.splitlines() == [f"OOD_CASES={needed - 1}: the OOD reference needs at least {needed} held-out "
                                         f"volumes (3 per noise level); use OOD_CASES={needed} or more"]
    assert retrain_check(tmp_path / "run", f"OOD_CASES={needed}").returncode == 0


def test_a_kept_folder_of_another_size_is_named_with_what_to_do(tmp_path):
    run = tmp_path / "run"
    ood = cases_folder(run, "ood", 6)
    cases_folder(run, "val", 48)  # the recipe's VAL_CASES: this one fits
    result = retrain_check(run, "OOD_CASES=9")
    assert result.returncode == 2
    assert result.stdout.splitlines() == [f"{ood} holds 6 cases where 9 are asked for: remove it (rm -r {ood}) and "
                                          "run the same make command again"]
    assert (ood / "cases.csv").exists()  # named, not removed
    assert retrain_check(run, "OOD_CASES=6").returncode == 2  # under the minimum, whatever the folder holds
    shutil.rmtree(ood)
    assert retrain_check(run, "OOD_CASES=9").returncode == 0


def test_the_small_lesion_training_folder_is_checked_like_the_others(tmp_path):
    run = tmp_path / "run"
    small = cases_folder(run, "train_small", 40)
    result = retrain_check(run)
    assert result.returncode == 2
    assert result.stdout.splitlines() == [f"{small} holds 40 cases where 80 are asked for: remove it (rm -r {small}) "
                                          "and run the same make command again"]
    assert retrain_check(run, "SMALL_CASES=40").returncode == 0


def test_the_recipe_pools_both_training_folders_into_one_slice_set(tmp_path):
    plan = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"RETRAIN_DIR={tmp_path}",
                           f"{tmp_path}/train.npz"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.replace("\\\n\t", "").splitlines()  # a recipe line continued with a backslash is one command
    small = next(line for line in lines if f"phantom {tmp_path}/train_small " in line)
    assert "--lesion-ml 0.1,4" in small and "--seed 1200" in small and "--families core-oedema,infiltrative,multifocal" in small
    assert any(f"slices {tmp_path}/train {tmp_path}/train_small --subset all" in line for line in lines)


def test_the_refinement_is_chosen_on_both_validation_folders_the_second_with_small_lesions(tmp_path):
    plan = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"RETRAIN_DIR={tmp_path}",
                           f"{tmp_path}/refined.json"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.replace("\\\n\t", "").splitlines()
    small = next(line for line in lines if f"phantom {tmp_path}/val_small " in line)
    assert "--lesion-ml 0.1,4" in small and "--seed 9200" in small and "--cases 24" in small
    assert "--families core-oedema,infiltrative,multifocal " in small
    assert any(f"calibrate-refinement {tmp_path}/calibrated.pt {tmp_path}/val {tmp_path}/val_small " in line
               for line in lines)
    seeds = [line.split("--seed ")[1].split()[0] for line in lines if "cdmsegment phantom " in line]
    assert len(seeds) == len(set(seeds))  # no folder repeats another's phantoms
    kept = cases_folder(tmp_path, "val_small", 8)
    result = retrain_check(tmp_path)
    assert result.returncode == 2 and str(kept) in result.stdout


def _plan(run_dir: Path, target: str, *variables: str) -> list:
    plan = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"RETRAIN_DIR={run_dir}",
                           *variables, f"{run_dir}/{target}"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    return plan.stdout.replace("\\\n\t", "").splitlines()


def test_one_seed_trains_one_network_in_the_run_folder(tmp_path):
    lines = _plan(tmp_path, "trained.pt")
    trains = [line for line in lines if " train " in line]
    assert len(trains) == 1 and f"-o {tmp_path}/run --seed 0 " in trains[0]
    assert lines[-1] == f"cp {tmp_path}/member_seed0.pt {tmp_path}/trained.pt"
    assert not any(" ensemble " in line for line in lines)


def test_two_seeds_train_two_networks_written_as_one_ensemble(tmp_path):
    lines = _plan(tmp_path, "trained.pt", "SEEDS=0 1")
    trains = [line for line in lines if " train " in line]
    assert [f"-o {tmp_path}/run --seed 0 " in trains[0], f"-o {tmp_path}/run_seed1 --seed 1 " in trains[1]] == [True] * 2
    exports = [line for line in lines if " export " in line]
    assert f"export {tmp_path}/run_seed1/checkpoint.pt -o {tmp_path}/member_seed1.pt " in exports[1]
    assert lines[-1].endswith(f"ensemble {tmp_path}/member_seed0.pt {tmp_path}/member_seed1.pt -o {tmp_path}/trained.pt "
                              "--name brain-flair-retrained --overwrite")  # make rebuilds it: its rules decide


@pytest.mark.parametrize("seeds, draws", [("0", 2), ("0 1", 2), ("0 1 2", 3)])
def test_the_calibration_runs_every_network_of_the_ensemble_alike(tmp_path, seeds, draws):
    """Noise draws take turns on an ensemble's networks and must be a multiple of their number."""
    calibrate = next(line for line in _plan(tmp_path, "defaults.json", f"SEEDS={seeds}") if " calibrate " in line)
    assert f"--noise-draws {draws} " in calibrate
