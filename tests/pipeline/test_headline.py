"""The report's answers-first section and its tables that fit the page, on tables with known contents."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workbench.pipeline import report
from workbench.pipeline.headline import bias_answer, bias_types_answer, removal_answers
from workbench.testing.browser import horizontal_overflow

needs_browser = pytest.mark.skipif(report.find_browser() is None, reason="no Chrome/Chromium (apt-get install chromium)")


def contexts(significant: list[bool], signed_low: float) -> pd.DataFrame:
    n = len(significant)
    return pd.DataFrame({"context": [f"c{i}" for i in range(n)], "mean_abs_smd": [0.2] * n, "null_mean": [0.05] * n,
                         "p_perm": [0.01] * n, "p_adjusted": np.linspace(0.01, 0.5, n), "significant": significant,
                         "signed_bias": [0.1] * n, "signed_ci_low": [signed_low] * n, "signed_ci_high": [0.3] * n})


def test_bias_answer_says_yes_only_after_correction_and_flags_an_unstable_sign():
    yes = bias_answer(contexts([True, False], signed_low=-0.1), "holm")
    assert "**Yes, in 1 of 2 context(s)**" in yes and "held-out signed bias 0.100 [-0.100, 0.300]" in yes
    assert "interval covers 0" in yes
    assert "covers 0" not in bias_answer(contexts([True, False], signed_low=0.05), "holm")
    assert "**No context's bias is above its noise floor** after holm over 2" in bias_answer(
        contexts([False, False], signed_low=-0.1), "holm")


def cell(regime: str, kind: str, removed: float, difference_low: float, source="each variation", target="c0",
         better=pd.NA, bias_to_remove=True) -> dict:
    return {"regime": regime, "kind": kind, "source": source, "target": target, "budget": 64, "n_pruned_mean": 64.0,
            "bias_before": 0.2, "removed": removed, "removed_low": removed - 0.1, "removed_high": removed + 0.1,
            "reduction_pct": 100 * removed / 0.2, "ci_low": 100 * (removed - 0.05) / 0.2,
            "ci_high": 100 * (removed + 0.05) / 0.2, "n_random": 4, "random_mean": 10.0,
            "removed_minus_random": removed - 0.02, "difference_low": difference_low, "difference_high": 0.3,
            "better_than_random": better, "bias_to_remove": bias_to_remove}


def test_removal_answers_order_the_regimes_and_name_what_beats_random():
    matrix = pd.DataFrame([cell("leave_one_out", "mlp_neuron", 0.05, -0.1), cell("prompt", "mlp_neuron", 0.15, 0.02),
                           cell("cross_context", "mlp_neuron", 0.9, 0.5, source="c0", target="c0"),  # diagonal
                           cell("cross_context", "mlp_neuron", 0.01, -0.2, source="c1", target="c0"),
                           cell("prompt", "mlp_neuron", 0.7, 0.5, target="c1", bias_to_remove=False)])
    [line] = removal_answers(matrix)
    assert line.startswith("Pruning the top 64 neurons removes in-prompt 0.150 [0.050, 0.250] (75 [50, 100] %); "
                           "leave-one-out 0.050 [-0.050, 0.150]")
    assert "cross-context 0.010" in line and "0.900" not in line and "0.700" not in line  # off-diagonal, with a bias
    assert line.index("in-prompt") < line.index("leave-one-out") < line.index("cross-context")
    assert "no rank test below 19 draws): in-prompt." in line  # only the prompt's difference lies above 0
    assert "No removal below 0.14 could be told from none" in line  # +-0.1 intervals: SE 0.051, 2.8 SE


def test_removal_answers_use_the_rank_test_where_there_is_one_and_fold_one_fit():
    ranked = pd.DataFrame([cell("prompt", "attn_head", 0.15, 0.02, better=False),
                           cell("leave_one_out", "attn_head", 0.12, -0.1, better=True)])
    assert "better than random (rank test against the draws, Holm): leave-one-out." in removal_answers(ranked)[0]
    one_fit = pd.DataFrame([cell(r, "ace:mean_difference@synthetic", 0.1, -0.1)
                            for r in ("prompt", "leave_one_out", "cross_context")])
    [line] = removal_answers(one_fit)
    assert line.startswith("The ace:mean_difference@synthetic edit removes 0.100 [0.000, 0.200] (50 [25, 75] %) in "
                           "every regime (one fit)")


def test_bias_types_answer_names_the_family_and_race_in_it():
    types = pd.DataFrame({"bias_type": ["race", "gender"], "side_a": ["white", "men"], "side_b": ["black", "women"],
                          "context": ["c0", "c0"], "mean_abs_smd": [0.1, 0.3], "p_adjusted": [0.12, 0.01],
                          "significant": [False, True], "correction": "holm", "family": "all 2 tests"})
    assert bias_types_answer(types) == ("Bias types, holm over all 2 tests: significant: gender (men minus women) in "
                                        "c0, mean |SMD| 0.300, p 0.010 (race's own test in this family: p 0.120).")


def test_html_tables_fold_intervals_into_their_estimate():
    table = pd.DataFrame({"smd": [0.5], "ci_low": [0.2], "ci_high": [0.8], "removed": [0.1], "removed_low": [np.nan],
                          "removed_high": [np.nan], "bias_before": [0.3], "bias_ci_low": [0.1], "bias_ci_high": [0.4]})
    merged = report.merge_intervals(table)
    assert list(merged.columns) == ["smd", "removed", "bias_before"]
    assert merged.iloc[0].tolist() == ["0.5 [0.2, 0.8]", "0.1", "0.3 [0.1, 0.4]"]
    pct = report.merge_intervals(table.assign(reduction_pct=[40.0]))  # ci_low/ci_high are the reduction's then
    assert pct.reduction_pct.iloc[0] == "40 [0.2, 0.8]" and pct.smd.iloc[0] == 0.5


@needs_browser
def test_a_report_with_a_wide_table_fits_1280_px(tmp_path):
    columns = {f"a_rather_long_column_name_{i}": np.random.default_rng(i).normal(size=3) for i in range(30)}
    wide = pd.DataFrame(columns).assign(**{"estimate": [0.1, 0.2, 0.3], "estimate_low": 0.0, "estimate_high": 1.0})
    page, _ = report.write_report(tmp_path, "Wide", [{"heading": "Answers", "text": "- one **bold** answer",
                                                      "tables": [("thirty columns", wide)]}])
    measured = horizontal_overflow(page, width=1280)
    assert measured["page_width"] <= measured["width"] and measured["clipped"] == []
    assert "<strong>bold</strong>" in page.read_text()
