"""The anomaly measures of a pruning (workbench.prune.anomaly): inlier ratio, invalid rate, KL and perplexity."""

import numpy as np
import pandas as pd
import pytest

from workbench.components import Component
from workbench.prune.anomaly import (
    anomaly_report,
    inlier_ratio,
    invalid_rate,
    kl_on_neutral,
    load_neutral_texts,
    perplexity,
)
from workbench.prune.plan import PruningPlan, hooks_for

PRUNED = [Component(0, "attn_head", 1), Component(1, "attn_head", 3), Component(1, "mlp_neuron", 70)]


@pytest.fixture(scope="module")
def bridge(make_tiny_bridge):
    return make_tiny_bridge()


def answers(variation_values: dict[str, list[tuple[list[float], list[float]]]]) -> pd.DataFrame:
    """An audit-like table: per variation, one (values, weights) row per name."""
    rows = []
    for variation, names in variation_values.items():
        for i, (values, weights) in enumerate(names):
            valid = float(np.sum(weights))
            rows.append({"context": "c", "variation": variation, "name": f"n{i}", "values": np.array(values),
                         "weights": np.array(weights), "valid_mass": valid, "invalid_mass": 1 - valid,
                         "unexplored_mass": 0.0})
    return pd.DataFrame(rows)


def test_inlier_ratio():
    spread = list(map(float, range(100)))
    flat = [0.01] * 100
    base = answers({"a": [(spread, flat), (spread, flat)], "b": [([10.0, 20.0], [0.45, 0.45])]})
    same = inlier_ratio(base, base)
    # An identical model keeps the mass of its own [5 %, 95 %] range: 91 of 100 values, or all of two atoms.
    assert same["inlier_ratio"].tolist() == pytest.approx([0.91, 1.0])
    assert same[["low", "high"]].values.tolist() == [[4.0, 94.0], [10.0, 20.0]]
    shifted = answers({"a": [([v + 50 for v in spread], flat)] * 2, "b": [([10.0, 30.0], [0.3, 0.6])]})
    ratios = inlier_ratio(base, shifted).set_index("variation")
    assert ratios.loc["a", "inlier_ratio"] == pytest.approx(45 / 100)
    assert ratios.loc["b", "inlier_ratio"] == pytest.approx(1 / 3)
    assert ratios.loc["b", "anomaly_rate"] == pytest.approx(2 / 3)
    rates = invalid_rate(shifted)
    assert rates["invalid_rate"] == pytest.approx((0 + 0 + 0.1) / 3)
    assert rates["unexplored_rate"] == 0


def test_kl_and_perplexity(bridge):
    texts = load_neutral_texts()[:4]
    assert len(load_neutral_texts()) >= 30
    assert kl_on_neutral(bridge, [], texts) == pytest.approx(0, abs=1e-6)
    hooks = hooks_for(PruningPlan(model="tiny", model_hash="x", components=PRUNED, method="test",
                                  selection={"rule": "top_k", "k": len(PRUNED)}, ablation="zero"))
    assert kl_on_neutral(bridge, hooks, texts) > 0
    assert np.isfinite(perplexity(bridge, texts)) and perplexity(bridge, texts) > 1
    assert perplexity(bridge, texts, hooks) != perplexity(bridge, texts)
    base = answers({"a": [([1.0, 2.0], [0.5, 0.4])]})
    report = anomaly_report(bridge, hooks, base, base, texts)
    assert report["inlier_ratio"] == 1.0 and report["anomaly_rate"] == 0.0 and report["kl"] > 0
    assert set(report) >= {"invalid_rate", "unexplored_rate", "perplexity_base", "perplexity_pruned"}
