"""Each method paired with the calibrated intensity threshold on the same volumes."""

import numpy as np
import pytest

from CDMSegmentLib.evaluation.paired import paired_difference, paired_table
from CDMSegmentLib.evaluation.volumes import VolumeScore, tables

THRESHOLD = "intensity threshold (calibrated)"


def test_the_paired_difference_counts_wins_and_gives_the_exact_signed_rank_p_value():
    # differences 0.1, 0.2, 0.3, 0.4 and -0.05: the negative one has rank 1 of 5, so W- = 1 and the exact two-sided
    # p-value is 2 x P(W <= 1) = 2 x 2 / 32 (the empty set and {1} of the 2^5 sign patterns)
    r = paired_difference([0.6, 0.7, 0.8, 0.9, 0.45], [0.5, 0.5, 0.5, 0.5, 0.5])
    assert (r.volumes, r.better, r.worse) == (5, 4, 1)
    assert r.mean == pytest.approx(0.19)
    assert r.p_value == pytest.approx(0.125)
    assert -0.05 <= r.low < r.mean < r.high <= 0.4  # a bootstrap mean lies within the differences' range
    assert paired_difference([0.6, 0.7, 0.8, 0.9, 0.45], [0.5] * 5) == r  # seeded: the same interval every run


def test_less_spread_gives_a_narrower_interval_that_excludes_zero():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.3, 0.7, 12)
    noisy = paired_difference(base + 0.1 + rng.normal(0, 0.2, 12), base)
    steady = paired_difference(base + 0.1 + rng.normal(0, 0.02, 12), base)
    assert steady.high - steady.low < (noisy.high - noisy.low) / 4
    assert 0 < steady.low < 0.1 < steady.high and steady.p_value < 0.001  # 12 of 12 higher: 2 / 2^12


def test_no_spread_and_one_volume_say_so_instead_of_failing():
    ties = paired_difference([0.5, 0.2, 0.0], [0.5, 0.2, 0.0])
    assert (ties.mean, ties.low, ties.high, ties.p_value, ties.better, ties.worse) == (0, 0, 0, 1.0, 0, 0)
    shifted = paired_difference([0.6, 0.3], [0.5, 0.2])
    assert shifted.low == shifted.high == pytest.approx(0.1)
    one = paired_difference([0.6], [0.5])
    assert one.mean == pytest.approx(0.1) and np.isnan(one.low) and np.isnan(one.p_value)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([0.5, 0.6], [0.5])
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([], [])


def score(case, method, family, dice_3d, fp=0.0):
    lesion_ml = 0.0 if np.isnan(dice_3d) else 2.0
    return VolumeScore(case, method, lesion_ml, 0.0, dice_3d, dice_3d, fp, 1.0, family, 1.0)


def test_the_table_pairs_volumes_by_case_per_family_and_for_lesion_free_volumes():
    nan = float("nan")
    cdm = {"m1": 0.7, "m2": 0.8, "c1": 0.1, "c2": 0.3}
    threshold = {"m1": 0.5, "m2": 0.6, "c1": 0.5, "c2": 0.5}
    family = {"m": "ms", "c": "cortical"}
    scores = [score(case, "CDM", family[case[0]], dice) for case, dice in cdm.items()]
    # listed in another order than the CDM's rows: pairs go by case, not by position
    scores += [score(case, THRESHOLD, family[case[0]], threshold[case]) for case in reversed(list(threshold))]
    scores += [score("h1", "CDM", "healthy", nan, fp=0.5), score("h1", THRESHOLD, "healthy", nan, fp=2.0),
               score("h2", "CDM", "healthy", nan, fp=1.0), score("h2", THRESHOLD, "healthy", nan, fp=1.5)]
    table = paired_table(scores)
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line and "group" not in line}
    assert set(rows) == {("all", "CDM"), ("cortical", "CDM"), ("healthy", "CDM"), ("ms", "CDM")}  # no baseline row
    # all: differences +0.2, +0.2, -0.4, -0.2 (mean -0.05); lesion-free: -1.5 and -0.5 ml (mean -1.00)
    assert "| all | CDM | 4 | -0.050 (" in rows[("all", "CDM")] and "| 2 / 2 / 0 |" in rows[("all", "CDM")]
    assert rows[("all", "CDM")].endswith("| 2 | -1.00 (-1.50 to -0.50) | 0 / 2 / 0 |")  # two volumes: their range
    assert rows[("ms", "CDM")].startswith("| ms | CDM | 2 | +0.200 (+0.200 to +0.200) | 2 / 0 / 0 |")
    assert rows[("ms", "CDM")].endswith("| 0 | - | - |")
    assert rows[("healthy", "CDM")].startswith("| healthy | CDM | 0 | - | - | - | 2 | -1.00 (")
    assert all(line.count("|") == 10 for line in table.splitlines() if line.startswith("|"))
    assert "nan" not in table
    # without the calibrated threshold there is nothing to pair with, and the tables leave it out
    without = [s for s in scores if s.method != THRESHOLD]
    assert paired_table(without) == "" and "Paired" not in tables(without) and "Paired" in tables(scores)


def test_ties_are_counted_not_dropped():
    table = paired_table([score("a", "CDM", "ms", 0.5), score("a", THRESHOLD, "ms", 0.5),
                          score("b", "CDM", "ms", 0.7), score("b", THRESHOLD, "ms", 0.5)])
    assert "| all | CDM | 2 | +0.100 (" in table and "| 1 / 0 / 1 |" in table


def test_the_smallest_p_the_table_warns_of_is_what_five_volumes_can_reach():
    # all five higher: the exact two-sided p is 2 / 2^5, above 0.06 as the table's heading says; six reach 2 / 2^6
    assert paired_difference([0.6, 0.7, 0.8, 0.9, 1.0], [0.5] * 5).p_value == pytest.approx(0.0625)
    assert paired_difference([0.6, 0.7, 0.8, 0.9, 1.0, 0.55], [0.5] * 6).p_value == pytest.approx(0.03125)
    assert "with 5 volumes or fewer it cannot fall below 0.06" in paired_table(
        [score("a", "CDM", "ms", 0.6), score("a", THRESHOLD, "ms", 0.5)])
