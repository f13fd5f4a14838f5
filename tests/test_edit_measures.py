"""The evaluation's own measures (utils/core/edit_measures.py) on constructed inputs with answers
derived by hand in the comments."""
from __future__ import annotations

import numpy as np
import pytest

from utils.core import edit_measures as em


def test_spread_summarises_the_finite_values_and_counts_the_rest():
    got = em.spread(np.array([1.0, 2.0, 3.0, np.nan]))
    # mean 2; population sd sqrt(((1-2)^2 + 0 + (3-2)^2) / 3); linear-interpolated quartiles 1.5, 2.5
    assert got == pytest.approx({"mean": 2.0, "sd": np.sqrt(2 / 3), "q25": 1.5, "median": 2.0, "q75": 2.5,
                                 "n": 3, "undefined": 1})
    assert np.isnan(em.spread(np.array([np.nan]))["mean"])


def test_target_gain_is_spearmans_rank_correlation():
    targets = np.array([1.0, 2.0, 3.0])
    measured = np.array([[10.0, 20.0, 30.0],   # same order: 1
                         [3.0, 2.0, 1.0],      # reversed: -1
                         [1.0, 3.0, 2.0],      # one swap: 1 - 6 * (0 + 1 + 1) / (3 * (9 - 1)) = 0.5
                         [1.0, 1.0, 2.0],      # a tie: ranks (1.5, 1.5, 3) against (1, 2, 3): 1.5 / sqrt(1.5 * 2)
                         [4.0, 4.0, 4.0]])     # no order: undefined
    got = em.target_gain(measured, targets)
    np.testing.assert_allclose(got[:4], [1.0, -1.0, 0.5, np.sqrt(3) / 2], atol=1e-12)
    assert np.isnan(got[4])


def test_target_gain_on_a_2d_grid_ignores_the_other_axis():
    # 3 x 3 grid, the thick target changes slowly, the slant target fast. A measurement that follows
    # only the slant target has ranks (2, 5, 8) in each thick row: its sum against the centred thick
    # ranks (-3, 0, 3), one per row, is -3 * 15 + 0 + 3 * 15 = 0, so the gain is 0; one that follows
    # the thick target gains 1.
    thick_target = np.repeat([-5.0, -2.5, 0.0], 3)
    slant_target = np.tile([2.0, 0.0, -2.0], 3)
    follows_slant = -slant_target[None] + 0.0
    follows_thick = 3.0 + 0.1 * thick_target[None]
    assert em.target_gain(follows_slant, thick_target)[0] == pytest.approx(0.0, abs=1e-12)
    assert em.target_gain(follows_thick, thick_target)[0] == pytest.approx(1.0)
    assert em.target_gain(follows_slant, slant_target)[0] == pytest.approx(-1.0)  # the slant target falls along the row
    with pytest.raises(ValueError, match="all equal"):
        em.target_gain(follows_thick, np.zeros(9))


def test_leak_is_the_other_attributes_change_per_unit_of_the_moved_one():
    # moved 0, 1, 2: deviations from the mean 1, 0, 1, sum 2, over sigma 0.5 -> 4;
    # other 0, 0.1, 0.2: deviations 0.1, 0, 0.1, sum 0.2, over sigma 0.1 -> 2; leak 2 / 4 = 0.5
    moved = np.array([[[0.0, 1.0, 2.0]]])
    other = np.array([[[0.0, 0.1, 0.2]]])
    assert em.leak(moved, other, 0.5, 0.1)[0] == pytest.approx(0.5)
    assert em.leak(10 * moved, other, 5.0, 0.1)[0] == pytest.approx(0.5)  # units cancel
    assert em.leak(moved, np.full_like(other, 7.0), 0.5, 0.1)[0] == 0.0  # the other did not change
    assert np.isnan(em.leak(np.ones_like(moved), other, 0.5, 0.1)[0])  # the moved one did not change


def test_leak_does_not_count_the_other_attributes_own_target_between_sweeps():
    # Two sweeps of the joint grid, each at its own slant target: slant is constant within each
    # sweep (0 and 5), so nothing leaked, although slant differs by 5 between them.
    moved = np.array([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    other = np.array([[[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    assert em.leak(moved, other, 1.0, 1.0)[0] == 0.0


def test_pooled_leak_weights_images_by_how_much_they_moved():
    # image 0: numerator 2 * 1 = 2 (other 0, 1, 2 -> deviations 1, 0, 1), denominator 2; leak 1.
    # image 1: other constant (0), moved 0, 3, 6 -> deviations 3, 0, 3, denominator 6; leak 0.
    moved = np.array([[[0.0, 1.0, 2.0]], [[0.0, 3.0, 6.0]]])
    other = np.array([[[0.0, 1.0, 2.0]], [[4.0, 4.0, 4.0]]])
    np.testing.assert_allclose(em.leak(moved, other, 1.0, 1.0), [1.0, 0.0])
    assert em.pooled_leak(moved, other, 1.0, 1.0) == pytest.approx(2.0 / 8.0)  # not the mean of 1 and 0
    with pytest.raises(ValueError, match="positive"):
        em.leak(moved, other, 0.0, 1.0)


def test_additivity_error_of_an_additive_and_a_non_additive_edit():
    reference = np.array([[0.2, 0.2, 0.2, 0.2]])
    change_a, change_b = np.array([[1.0, 0.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0, 0.0]])
    additive = em.additivity_error(reference, reference + change_a, reference + change_b,
                                   reference + change_a + change_b)
    assert additive["mean_abs"][0] == pytest.approx(0.0, abs=1e-15)
    assert additive["relative"][0] == pytest.approx(0.0, abs=1e-15)
    # f(a + b) has an extra 0.5 in pixel 2: mean |e| = 0.5 / 4, relative 0.5 / (1 + 1)
    extra = np.array([[0.0, 0.0, 0.5, 0.0]])
    got = em.additivity_error(reference, reference + change_a, reference + change_b,
                              reference + change_a + change_b + extra)
    assert got["mean_abs"][0] == pytest.approx(0.125)
    assert got["relative"][0] == pytest.approx(0.25)
    assert np.isnan(em.additivity_error(reference, reference, reference, reference + extra)["relative"][0])


def test_class_kept_is_the_share_of_edits_in_the_true_class():
    got = em.class_kept(np.array([[1, 1, 2], [3, 3, 3]]), np.array([1, 3]))
    np.testing.assert_allclose(got, [2 / 3, 1.0])
