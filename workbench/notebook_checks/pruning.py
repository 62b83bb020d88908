"""The checks of notebooks/04_pruning_and_anomalies.ipynb: the known answers (the planted model's head and neuron
rank first and pruning them removes the bias, random pruning does not; the spike-in is found and removed), the
invariants (hooks equal weight edits, every read-out accounts for all of its mass, the unpruned model against
its own range) and the numbers the notebook's text quotes (`QUOTED`, at the precision the text gives them)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.notebook_checks.patching import _rounded, quoted_numbers
from workbench.prune.generalize import random_prunings

QUOTED: dict[str, float | str] = {
    'tiny_neuron_pct': 90.0,
    'tiny_head_pct': 93.0,
    'tiny_random_max_pct': 0.2,
    'sign': 1.0,
    'bias_before': 0.024,
    'bias_low': -0.005,
    'bias_high': 0.058,
    'plant_kl': 0.033,
    'planted': 2.95,
    'planted_low': 1.45,
    'planted_high': 4.45,
    'truth_removed': 1.51,
    'spike_removed': 1.52,
    'spike_removed_low': 0.4,
    'spike_removed_high': 3.06,
    'spike_random_mean': 0.13,
    'spike_random_max': 0.24,
    'spike_difference': 1.4,
    'spike_difference_low': 0.17,
    'spike_difference_high': 2.38,
    'removed': 0.024,
    'removed_low': -0.005,
    'removed_high': 0.059,
    'mdr': 0.05,
    'random_1': 0.001,
    'random_2': -0.004,
    'difference': 0.026,
    'difference_low': -0.012,
    'difference_high': 0.069,
    'p_rank': 0.33,
    'rank': 0.0,
    'heads_removed': -0.73,
    'heads_low': -1.21,
    'heads_high': -0.31,
    'sd_before': 0.5,
    'heads_sd_after': 3.39,
    'anomaly_unpruned': 0.094,
    'anomaly_neurons': 0.02,
    'anomaly_heads': 0.69,
    'anomaly_random_1': 0.121,
    'anomaly_random_2': 0.086,
    'kl_neurons': 0.179,
    'kl_heads': 0.337,
    'kl_random_1': 0.008,
    'kl_random_2': 0.005,
    'ppl_unpruned': 137.5,
    'ppl_neurons': 117.5,
    'ppl_heads': 173.8,
    'tiny_bias_before': 1.64,
    'n_layer0': 15.0,
    'plant_left': 0.0,
    'plant_left_low': 0.0,
    'plant_left_high': 0.0,
}
"""The numbers the notebook's text quotes, as the text rounds them."""


def check(planted, tiny_neurons, tiny_heads, tiny_removal: pd.DataFrame, logit_gaps: dict, mass: pd.DataFrame,
          sign: float, held_out: pd.Series, spike: pd.Series, plant, draws: list, shape, seed: int,
          removal: pd.DataFrame, versus: pd.Series, costs: pd.DataFrame, chosen_neurons: list | None = None) -> str:
    """Assert the notebook's claims; a few lines of rounded key numbers ending "... checks passed"."""
    # the planted model: the planted components rank first, pruning either removes most of the bias (the CI
    # above 0), no random single neuron or head removes a tenth of it
    assert tiny_neurons.top(1) == [planted.neuron] and tiny_heads.top(1) == [planted.head]
    chosen = tiny_removal.loc[["top neuron (attribution)", "top head (attribution)"]]
    assert (chosen.reduction_pct > 80).all() and (chosen.removed_low > 0).all()
    randoms = tiny_removal[tiny_removal.index.str.startswith("random")]
    assert (randoms.reduction_pct.abs() < 10).all()
    # a plan's hooks and its weight edits are the same model; restoring the weights gives the unpruned model back
    assert logit_gaps["hooks vs weight edits"] < 1e-3 and logit_gaps["restored vs unpruned"] == 0.0
    assert logit_gaps["pruned vs unpruned"] > 1e-3
    # every exact read-out accounts for all of its mass
    assert np.allclose(mass.valid_mass + mass.invalid_mass + mass.unexplored_mass, 1.0, atol=1e-4)
    # the spike-in: found first, all of it removed, the removal's and the paired difference's CIs above 0
    assert spike.best_rank == 1 and spike.recall == 1.0
    assert spike.plant_left == 0.0 and spike.plant_removed_pct == 100.0
    assert spike.planted_low > 0 and spike.removed_low > 0 and spike.difference_low > 0
    assert spike.p_rank == 1 / (1 + spike.n_random)  # the smallest p 3 draws can give
    # the random prunings are the study's first draws (same seed, kind and size)
    assert draws == random_prunings(shape, "mlp_neuron", 64, 4, seed)[:len(draws)]
    # the unpruned model against its own 5-95 % range keeps at least 90 % of its mass inside
    assert 0.9 - 1e-9 <= costs.loc["unpruned", "inlier_ratio"] <= 1 + 1e-9
    assert (costs.kl_neutral >= -1e-9).all() and costs.loc["unpruned", "kl_neutral"] == 0
    assert sign == float(np.sign(sign)) and held_out.removed == 0

    neurons, heads_row = removal.loc["64 neurons (attribution)"], removal.loc["8 heads (attribution)"]
    random_rows = removal[removal.index.str.startswith("64 random")]
    numbers = {
        "tiny_bias_before": (tiny_removal.bias_before.iloc[0], 2),
        "tiny_neuron_pct": (tiny_removal.loc["top neuron (attribution)", "reduction_pct"], 0),
        "tiny_head_pct": (tiny_removal.loc["top head (attribution)", "reduction_pct"], 0),
        "tiny_random_max_pct": (randoms.reduction_pct.abs().max(), 1),
        "sign": (sign, 0), "bias_before": (held_out.bias_before, 3), "bias_low": (held_out.bias_ci_low, 3),
        "bias_high": (held_out.bias_ci_high, 3),
        "plant_kl": (plant.kl, 3), "planted": (spike.planted_smd, 2), "planted_low": (spike.planted_low, 2),
        "planted_high": (spike.planted_high, 2), "truth_removed": (spike.truth_removed, 2),
        "plant_left": (spike.plant_left, 2), "plant_left_low": (spike.plant_left_low, 2),
        "plant_left_high": (spike.plant_left_high, 2),
        "spike_removed": (spike.removed, 2), "spike_removed_low": (spike.removed_low, 2),
        "spike_removed_high": (spike.removed_high, 2), "spike_random_mean": (spike.random_mean, 2),
        "spike_random_max": (spike.random_max, 2), "spike_difference": (spike.difference, 2),
        "spike_difference_low": (spike.difference_low, 2), "spike_difference_high": (spike.difference_high, 2),
        "n_layer0": (sum(c.layer == 0 for c in chosen_neurons or []), 0),
        "removed": (neurons.removed, 3), "removed_low": (neurons.removed_low, 3),
        "removed_high": (neurons.removed_high, 3), "mdr": (neurons.mdr, 2),
        "random_1": (random_rows.removed.iloc[0], 3), "random_2": (random_rows.removed.iloc[1], 3),
        "difference": (versus.difference, 3), "difference_low": (versus.difference_low, 3),
        "difference_high": (versus.difference_high, 3), "p_rank": (versus.p_rank, 2), "rank": (versus["rank"], 0),
        "heads_removed": (heads_row.removed, 2), "heads_low": (heads_row.removed_low, 2),
        "heads_high": (heads_row.removed_high, 2), "sd_before": (neurons.sd_before, 2),
        "heads_sd_after": (heads_row.sd_after, 2),
        "anomaly_unpruned": (costs.loc["unpruned", "anomaly_rate"], 3),
        "anomaly_neurons": (costs.loc["64 neurons (attribution)", "anomaly_rate"], 3),
        "anomaly_heads": (costs.loc["8 heads (attribution)", "anomaly_rate"], 2),
        "anomaly_random_1": (costs.loc[random_rows.index[0], "anomaly_rate"], 3),
        "anomaly_random_2": (costs.loc[random_rows.index[1], "anomaly_rate"], 3),
        "kl_neurons": (costs.loc["64 neurons (attribution)", "kl_neutral"], 3),
        "kl_heads": (costs.loc["8 heads (attribution)", "kl_neutral"], 3),
        "kl_random_1": (costs.loc[random_rows.index[0], "kl_neutral"], 3),
        "kl_random_2": (costs.loc[random_rows.index[1], "kl_neutral"], 3),
        "ppl_unpruned": (costs.loc["unpruned", "perplexity"], 1),
        "ppl_neurons": (costs.loc["64 neurons (attribution)", "perplexity"], 1),
        "ppl_heads": (costs.loc["8 heads (attribution)", "perplexity"], 1),
    }
    unquoted = quoted_numbers(numbers, QUOTED)
    lines = [
        "planted model: L1N7 and L0H1 rank first; pruning either removes "
        f"{min(chosen.reduction_pct):.0f}-{max(chosen.reduction_pct):.0f} % of the bias, random ones under 10 %",
        f"spike-in L14N100: rank 1, planted {spike.planted_smd:.2f}, plant left {spike.plant_left:.2f}; "
        f"top 64 minus 3 random draws {spike.difference:+.2f} [{spike.difference_low:+.2f}, {spike.difference_high:+.2f}]",
        f"real bias on held-out names {held_out.bias_before:+.3f}; 64 neurons remove {neurons.removed:+.3f} "
        f"[{neurons.removed_low:+.3f}, {neurons.removed_high:+.3f}] (mdr {neurons.mdr:.2f}), random "
        + ", ".join(f"{x:+.3f}" for x in random_rows.removed) + f"; 8 heads {heads_row.removed:+.2f}",
        "anomaly rate: " + ", ".join(f"{label} {row.anomaly_rate:.3f}" for label, row in costs.iterrows()),
    ]
    if unquoted:
        lines.append("not quoted by the text: " + ", ".join(f"{k}={_rounded(*numbers[k])}" for k in unquoted))
    return "\n".join(lines + ["pruning and anomaly checks passed"])
