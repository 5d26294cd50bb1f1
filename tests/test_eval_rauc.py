import pytest

from mto_ds.eval.rauc import area_under, compare_curves, epochs_to_reach, rauc

EPOCHS = [0, 10, 20, 30, 40]


def test_area_under_a_linear_curve_is_the_triangle():
    assert area_under([0, 40], [0, 80], 0, 40) == pytest.approx(1600.0)
    assert area_under(EPOCHS, [0, 20, 40, 60, 80], 10, 30) == pytest.approx(800.0)


def test_identical_curves_have_rauc_one():
    values = [10, 40, 55, 60, 62]
    assert rauc(EPOCHS, values, EPOCHS, values) == pytest.approx(1.0)


def test_rauc_of_a_curve_twice_as_high_is_two():
    base = [10, 20, 30, 35, 40]
    assert rauc(EPOCHS, base, EPOCHS, [2 * v for v in base]) == pytest.approx(2.0)


def test_rauc_of_linear_curves_matches_the_analytic_ratio():
    # baseline 2e, MTO 3e + 10 over [0, 40]: areas 1600 and 2800 -> 1.75
    assert rauc([0, 40], [0, 80], [0, 20, 40], [10, 70, 130]) == pytest.approx(1.75)


def test_rauc_uses_only_the_common_epoch_range_of_curves_sampled_differently():
    # MTO is evaluated every 5 epochs up to 30, the baseline every 10 up to 40: compare over [0, 30].
    base_e, base_v = [0, 10, 20, 30, 40], [0, 10, 20, 30, 40]         # area over [0, 30]: 450
    mto_e = [0, 5, 10, 15, 20, 25, 30]
    mto_v = [2 * e for e in mto_e]                                   # area over [0, 30]: 900
    assert rauc(base_e, base_v, mto_e, mto_v) == pytest.approx(2.0)


def test_rauc_needs_an_interval_in_common():
    with pytest.raises(ValueError, match="no epoch interval"):
        rauc([0, 10], [1, 2], [10, 20], [3, 4])


def test_epochs_to_reach_interpolates_linearly_between_evaluations():
    assert epochs_to_reach([10, 20, 30], [40, 60, 70], 50) == pytest.approx(15.0)
    assert epochs_to_reach([10, 20, 30], [40, 60, 70], 70) == pytest.approx(30.0)


def test_epochs_to_reach_is_the_first_epoch_when_already_reached_and_none_when_never():
    assert epochs_to_reach([10, 20], [80, 90], 50) == 10.0
    assert epochs_to_reach([10, 20], [40, 45], 50) is None


def test_epochs_to_reach_takes_the_first_crossing_of_a_non_monotone_curve():
    assert epochs_to_reach([0, 10, 20, 30], [0, 60, 40, 80], 50) == pytest.approx(50 / 6)


def test_compare_curves_reports_half_the_epochs_when_mto_learns_twice_as_fast():
    # Baseline a(e) = min(e, 40) at e = 10..80: its final 40 is first reached at epoch 40;
    # MTO a(2e) reaches 40 at epoch 20: half the epochs (the baseline's plateau does not count).
    epochs = [10, 20, 30, 40, 50, 60, 70, 80]
    base = [min(e, 40) for e in epochs]
    mto = [min(2 * e, 40) for e in epochs]
    n = compare_curves(epochs, base, epochs, mto)
    assert n["baseline_final_top1"] == 40 and n["baseline_final_epoch"] == 80
    assert n["mto_epochs_to_baseline"] == pytest.approx(20.0)
    assert n["baseline_epochs_to_final"] == pytest.approx(40.0)
    assert n["epoch_saving"] == pytest.approx(0.5)
    # areas over [10, 80]: baseline 30 * 25 + 40 * 40 = 2350; MTO 10 * 30 + 60 * 40 = 2700
    assert n["rauc"] == pytest.approx(2700 / 2350)


def test_no_epoch_saving_when_both_curves_are_flat_from_the_start():
    n = compare_curves([1, 2, 3], [89.0, 89.0, 89.0], [1, 2, 3], [89.0, 89.0, 89.0])
    assert n["rauc"] == pytest.approx(1.0) and n["epoch_saving"] == pytest.approx(0.0)


def test_compare_curves_says_none_when_mto_never_reaches_the_baseline():
    n = compare_curves([1, 2], [50, 60], [1, 2], [40, 50])
    assert n["mto_epochs_to_baseline"] is None and n["epoch_saving"] is None
    assert n["rauc"] == pytest.approx(90 / 110)


def test_curves_must_have_increasing_epochs():
    with pytest.raises(ValueError, match="increasing"):
        epochs_to_reach([10, 5], [1, 2], 1)


def test_compare_curves_flags_epochs_reached_at_the_first_evaluation_as_bounds():
    # MTO's first evaluation (epoch 10) is already past the baseline's final 40: it got there at 10 or before.
    n = compare_curves([10, 20, 30, 40], [10, 20, 30, 40], [10, 20, 30, 40], [45, 50, 55, 60])
    assert n["mto_epochs_to_baseline"] == 10.0 and n["mto_epochs_to_baseline_is_bound"] is True
    assert n["baseline_epochs_to_final"] == 40.0 and n["baseline_epochs_to_final_is_bound"] is False
    flat = compare_curves([10, 20], [50, 50], [10, 20], [40, 60])
    assert flat["baseline_epochs_to_final_is_bound"] is True and flat["mto_epochs_to_baseline_is_bound"] is False
    # At epoch 0 nothing is trained yet: a curve reaching the target there reaches it at exactly 0.
    assert compare_curves([0, 10], [50, 50], [0, 10], [60, 60])["mto_epochs_to_baseline_is_bound"] is False
    assert compare_curves([1, 2], [50, 60], [1, 2], [40, 50])["mto_epochs_to_baseline_is_bound"] is False  # never


def test_compare_curves_gives_the_paired_final_difference_only_at_equal_final_epochs():
    assert compare_curves([1, 2], [50, 60], [1, 2], [55, 64.5])["mto_minus_baseline_final_top1"] == pytest.approx(4.5)
    assert compare_curves([1, 2, 3], [50, 60, 62], [1, 2], [55, 64.5])["mto_minus_baseline_final_top1"] is None


def test_the_baseline_target_is_its_final_accuracy_not_its_best():
    """A baseline that peaked before its end (70 at epoch 2, 65 at epoch 3): the number MTO must
    reach is the final 65, which the baseline first reached at 1.75 (between 50 and 70)."""
    n = compare_curves([1, 2, 3], [50.0, 70.0, 65.0], [1, 2, 3], [60.0, 68.0, 72.0])
    assert n["baseline_final_top1"] == 65.0
    assert n["baseline_epochs_to_final"] == pytest.approx(1.75)
    assert n["mto_epochs_to_baseline"] == pytest.approx(1.625)  # 60 -> 68 crosses 65 at 1 + 5/8
    assert n["epoch_saving"] == pytest.approx(1 - 1.625 / 1.75)
