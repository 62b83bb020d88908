"""The simulated answer model of the statistics tests (tests/audit/test_stats_inference.py, test_bias_types.py).

Each name's answer distribution is a skewed discrete distribution on SUPPORT (shifted by the name's offset and
its group's shift) with weights drawn from Dirichlet(CONCENTRATION * BASE): names differ in their means and in
their within-name variances. Over the population of names the weights average to BASE, so a group's mixture
has variance Var_BASE(SUPPORT) + TAU_SHARED^2 + TAU_VARIATION^2 = POPULATION_SD^2 (the offset is independent of
the weights), the same for every group; between two groups shifted by d_a and d_b POPULATION_SDs the true
mixture SMD is d_a - d_b.
"""

import numpy as np
import pandas as pd

SUPPORT = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
BASE = np.array([0.3, 0.3, 0.2, 0.15, 0.05])
CONCENTRATION = 5.0
TAU_SHARED, TAU_VARIATION = 0.8, 0.8  # a name's offset: shared by its variations + its own per variation
POPULATION_SD = np.sqrt(BASE @ SUPPORT**2 - (BASE @ SUPPORT) ** 2 + TAU_SHARED**2 + TAU_VARIATION**2)


def draw_names(rng: np.random.Generator, n_sets: int, n_names: int, n_variations: int,
               shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values [n_sets, n_names, n_variations, support] and weights of the same shape; `shift` (broadcast to
    [n_names, n_variations]) moves each name's answers by that many POPULATION_SDs."""
    shape = (n_sets, n_names, n_variations)
    offsets = rng.normal(0, TAU_SHARED, shape[:2])[:, :, None] + rng.normal(0, TAU_VARIATION, shape)
    offsets += np.broadcast_to(shift, shape[1:])[None] * POPULATION_SD
    weights = rng.dirichlet(CONCENTRATION * BASE, size=shape)
    return SUPPORT + offsets[..., None], weights


def simulate_answers(seed: int, n_sets: int, per_group: int, true_smd) -> pd.DataFrame:
    """An answer table of n_sets independent data sets (contexts s0000, ...), per_group names per race x gender
    group, one variation v{k} per entry of true_smd (the true mixture SMD of that variation, White minus Black)."""
    rng = np.random.default_rng(seed)
    true_smd = np.atleast_1d(np.asarray(true_smd, dtype=float))
    n_names = 4 * per_group
    races = np.repeat(["white", "black"], 2 * per_group)
    genders = np.tile(np.repeat(["man", "woman"], per_group), 2)
    values, weights = draw_names(rng, n_sets, n_names, true_smd.size,
                                 np.where(races == "white", 1.0, 0.0)[:, None] * true_smd)
    rows = [
        (f"s{s:04d}", f"v{k}", f"{races[i]}-{genders[i]}-{i}", races[i], genders[i], values[s, i, k],
         weights[s, i, k])
        for s in range(n_sets) for i in range(n_names) for k in range(true_smd.size)
    ]
    return pd.DataFrame(rows, columns=["context", "variation", "name", "race", "gender", "values", "weights"])
