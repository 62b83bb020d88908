"""`workbench power`: the power of a study's design from its audit, and the read-out setting and number of names
that a compute budget buys (workbench.audit.power holds the statistics)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from workbench.audit.power import allocation, context_power, variance_components
from workbench.audit.stats import name_moments
from workbench.audit.table import run_audit
from workbench.config import StudyConfig
from workbench.errors import ConfigError
from workbench.readout.prompts import PromptSet, max_names_per_group


def readout_settings(config: StudyConfig) -> dict[str, tuple[int, int]]:
    """The read-out settings compared: the config's (max_branches, max_completions) and its neighbours."""
    b, c = config.readout.max_branches, config.readout.max_completions
    candidates = {"current": (b, c), "completions / 4": (b, max(1, c // 4)), "branches / 2": (max(1, b // 2), c),
                  "branches x 2": (2 * b, c), "completions x 2": (b, 2 * c)}
    return {f"{name} ({branches} branches, {completions} completions)": (branches, completions)
            for name, (branches, completions) in candidates.items()}


def readout_noise(bridge, config: StudyConfig, prompts: PromptSet, answers: pd.DataFrame, n_prompts: int = 16
                  ) -> pd.DataFrame:
    """Per read-out setting: seconds per prompt and the Monte Carlo variance of a prompt's expected answer (on the
    study's scale), from n_prompts of the audit's prompts read out again with the next seed. The current
    setting's variance is half that of its difference from the audit; another setting's is its difference's
    variance less the current one's (both read-outs estimate the same exact limit)."""
    keys = ["context", "variation", "name"]
    chosen = np.random.default_rng(config.seed).choice(len(prompts), size=min(n_prompts, len(prompts)),
                                                       replace=False)
    subset = PromptSet([list(prompts)[i] for i in sorted(chosen)])
    scale = config.audit.scale
    audited = name_moments(answers, scale).set_index(keys)["mean"]
    run_audit(bridge, PromptSet(list(subset)[:1]), exact=config.readout, progress=False)  # warm-up, not timed
    records = []
    for setting, (branches, completions) in readout_settings(config).items():
        exact = dataclasses.replace(config.readout, seed=config.seed + 1, max_branches=branches,
                                    max_completions=completions)
        started = time.perf_counter()
        again = run_audit(bridge, subset, exact=exact, system_prompt=config.audit.system_prompt or None)
        seconds = (time.perf_counter() - started) / len(subset)
        difference = name_moments(again, scale).set_index(keys)["mean"] - audited.reindex(
            again.set_index(keys).index)
        records.append({"setting": setting, "seconds_per_prompt": seconds,
                        "difference_var": float(np.nanvar(difference.to_numpy(), ddof=1)),
                        "current": setting.startswith("current")})
    table = pd.DataFrame(records)
    current_var = table.loc[table.current, "difference_var"].iloc[0] / 2
    table["mc_var"] = np.where(table.current, current_var, np.maximum(table.difference_var - current_var, 0.0))
    return table


def power_tables(config: StudyConfig, answers: pd.DataFrame, noise: pd.DataFrame | None, budget_seconds: float,
                 n_context_tests: int | None = None) -> dict[str, pd.DataFrame]:
    """The design's variance components and tests' power at its names (and at 2x and 4x as many, capped at the
    names source's size); with a read-out noise table, the budget's allocation."""
    a = config.audit
    options = dict(scale=a.scale, method=a.method, min_valid_mass=a.min_valid_mass)
    components = variance_components(answers, **options)
    if components.empty:
        raise ConfigError(f"no variation has a name with a valid answer (valid mass >= {a.min_valid_mass}): the "
                          "audit gives the power analysis nothing to size the tests by")
    most = max_names_per_group(config.prompts.folder or None, a.names)
    designs = sorted({n for n in (a.names_per_group, 2 * a.names_per_group, 4 * a.names_per_group) if n <= most}
                     | {a.names_per_group})
    tests = pd.concat([context_power(answers, per_group=n, alpha=a.alpha, n_context_tests=n_context_tests,
                                     **options) for n in designs], ignore_index=True)
    tables = {"variance_components": components, "context_power": tests}
    if noise is not None:
        tested = components[components.se_smd.notna()]  # a variation without spread has no SMD to test
        tables["allocation"] = allocation(tested, noise, budget_seconds, most, len(components),
                                         a.alpha / len(tested))
    return tables
