"""The power analysis against known answers: the shipped answer model's variance components, and the minimum
detectable SMD against the permutation test's simulated power (workbench/testing/answer_model.py)."""

import numpy as np
import pandas as pd
import pytest

from workbench.audit.power import (allocation, context_power, minimum_detectable_reduction, normal_mde,
                                   variance_components)
from workbench.audit.stats import permutation_test
from workbench.testing.answer_model import BASE, CONCENTRATION, POPULATION_SD, SUPPORT, TAU_SHARED, TAU_VARIATION, \
    simulate_answers

BASE_VAR = BASE @ SUPPORT**2 - (BASE @ SUPPORT) ** 2


def test_variance_components_are_the_answer_models():
    """Between names: the offsets' variance plus the Dirichlet mean's (Var_BASE / (concentration + 1)); the
    mixture SD is the model's population SD."""
    pilot = simulate_answers(0, 1, 400, [0.0, 0.0])
    components = variance_components(pilot, scale="raw")
    between = TAU_SHARED**2 + TAU_VARIATION**2 + BASE_VAR / (CONCENTRATION + 1)
    assert components.between_var.to_numpy() == pytest.approx([between, between], rel=0.08)
    assert components.sd.to_numpy() == pytest.approx([POPULATION_SD, POPULATION_SD], rel=0.03)
    assert components.per_group.tolist() == [400, 400]


@pytest.mark.parametrize("per_group, n_variations, n_tests", [(8, 2, 1), (8, 1, 1), (16, 3, 3)])
def test_the_minimum_detectable_smd_has_80_percent_simulated_power(per_group, n_variations, n_tests):
    """The permutation test of mean |SMD| (the study's context test), at level 0.05 over n_tests contexts, finds a
    bias of the computed MDE in 80 % +- 5 of 1000 simulated audits; its size at no bias stays at most the level."""
    pilot = simulate_answers(1, 1, 100, [0.0] * n_variations)
    row = context_power(pilot, per_group=per_group, n_context_tests=n_tests, scale="raw").iloc[0]
    level = 0.05 / n_tests
    simulated = simulate_answers(2, 1000, per_group, [row.mde_mean_abs] * n_variations)
    p = permutation_test(simulated, "raw", n_perm=199, seed=3).contexts.p_perm
    assert (p <= level).mean() == pytest.approx(0.8, abs=0.05)
    assert row.mde_signed <= row.mde_mean_abs  # |.| and the null's race-mixed spread cost a little
    assert row["power_at_0.2"] < row["power_at_0.4"]


def test_more_names_shrink_the_mde_by_root_n():
    pilot = simulate_answers(1, 1, 100, [0.0])
    small, large = (context_power(pilot, per_group=n, scale="raw").iloc[0] for n in (4, 16))
    assert large.se_mean_smd == pytest.approx(small.se_mean_smd / 2, rel=1e-6)
    assert large.mde_variation == pytest.approx(small.mde_variation / 2, rel=1e-6)


def test_a_reductions_mde_is_its_intervals_se_times_z():
    """A 95 % interval of width 2 * 1.96 has SE 1: the MDE at level 0.05 and 80 % power is 1.96 + 0.84."""
    assert minimum_detectable_reduction(-1.959964, 1.959964) == pytest.approx(2.8016, abs=1e-3)
    assert normal_mde(1.0, 0.05) == pytest.approx(2.8016, abs=1e-3)


def test_allocation_buys_names_with_the_budget_and_counts_monte_carlo_noise():
    """Two settings: the current (1 s, Monte Carlo variance 0.5 of a between-name variance 1.5, so the true one is
    1) and a cheap noisy one (0.25 s, variance 3): 4 x the names at 4 x the noise of the truth's (1 + 3) / (1 + 0.5)."""
    components = pd.DataFrame({"between_var": [1.5], "sd": [2.0]})
    settings = pd.DataFrame({"setting": ["current", "cheap"], "seconds_per_prompt": [1.0, 0.25],
                             "mc_var": [0.5, 3.0], "current": [True, False]})
    table = allocation(components, settings, budget_seconds=4 * 10 * 8, max_per_group=48, n_variations=10,
                       alpha=0.05).set_index("setting")
    assert table.per_group.to_dict() == {"current": 8, "cheap": 32}
    assert table.se_smd["current"] == pytest.approx(np.sqrt(1.5 / (4 * 8)))
    assert table.se_smd["cheap"] == pytest.approx(np.sqrt(4.0 / (4 * 32)))
    assert table.index[0] == "cheap"  # the smaller SE first
    capped = allocation(components, settings, 1e6, max_per_group=48, n_variations=10, alpha=0.05)
    assert capped.per_group.max() == 48


def test_a_variation_without_spread_is_left_out_of_the_power_analysis():
    """Every name answering the same number (the model copying the prompt's anchor) has SD 0 and no SMD: the
    power analysis leaves that variation out, as the audit leaves it out of the context's mean |SMD|."""
    pilot = simulate_answers(1, 1, 100, [0.0, 0.0])
    anchored = pilot[pilot.variation == pilot.variation.iloc[0]].assign(
        variation="anchored", values=[np.array([42000.0])] * (pilot.variation == pilot.variation.iloc[0]).sum(),
        weights=[np.array([1.0])] * (pilot.variation == pilot.variation.iloc[0]).sum())
    with_anchor = pd.concat([pilot, anchored], ignore_index=True)
    components = variance_components(with_anchor, scale="raw").set_index("variation")
    assert components.loc["anchored", "sd"] == 0 and np.isnan(components.loc["anchored", "se_smd"])
    alone = context_power(pilot, per_group=8, scale="raw").drop(columns="n_tests")
    assert context_power(with_anchor, per_group=8, scale="raw").drop(columns="n_tests").equals(alone)


def test_a_bias_types_power_is_the_race_tests_at_its_sides_sizes():
    """Race as a contrast is the race test; White men vs Black women (one group a side, not two) has sqrt(2) times
    its SE, since the answer model gives every group the same between-name variance."""
    from workbench.audit.bias_types import WHITE_MEN_MINUS_BLACK_WOMEN
    from workbench.audit.power import contrast_power
    from workbench.audit.stats import RACE

    pilot = simulate_answers(1, 1, 200, [0.0, 0.0])
    race = context_power(pilot, scale="raw")
    assert contrast_power(pilot, RACE, scale="raw").drop(columns="bias_type").equals(race)
    pair = contrast_power(pilot, WHITE_MEN_MINUS_BLACK_WOMEN, scale="raw").iloc[0]
    assert pair.se_mean_smd / race.se_mean_smd.iloc[0] == pytest.approx(np.sqrt(2), rel=0.12)
    assert pair.per_group == 200 and pair.mde_mean_abs > race.mde_mean_abs.iloc[0]


def test_a_design_too_small_to_detect_any_bias_says_so():
    """One name a side (White men vs Black women at 1 per group): the shuffled null spreads with the bias as fast
    as the bias grows, so no bias reaches 80 % power at alpha 0.05 / 6; the MDE is infinite, not a hang."""
    from workbench.audit.bias_types import WHITE_MEN_MINUS_BLACK_WOMEN
    from workbench.audit.power import contrast_power

    pilot = simulate_answers(1, 1, 2, [0.0, 0.0])
    row = contrast_power(pilot, WHITE_MEN_MINUS_BLACK_WOMEN, n_context_tests=6, scale="raw").iloc[0]
    assert np.isinf(row.mde_mean_abs) and row["power_at_0.4"] < 0.8
