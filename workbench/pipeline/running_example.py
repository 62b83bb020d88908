"""The notebooks' running example: the default study's design (configs/study.toml), so that every notebook works
on the same names, jobs, read-out and statistics as the study whose report it teaches.

The bias: the 2024 audit's hiring scenario with its numeric anchor ("hiring:numeric": the security guard and the
software developer), the paper's names 9-16 of each race x gender group, the paper's sampler read out exactly,
mixture SMD on the log scale. Ranking, everywhere: by signed score, each variation's scores oriented toward its
bias on the names that choose the components (`workbench.localize.pairs.PairInputs.oriented`), so the top of the
ranking is what carries the bias the removal is measured in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workbench.audit.table import run_audit
from workbench.config import StudyConfig, load_config
from workbench.pipeline.study import audit_prompts, exact_settings, held_out_folds, stats_options
from workbench.readout.engine import ExactReadoutConfig
from workbench.readout.prompts import PromptSet

STUDY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "study.toml"


@dataclass(frozen=True)
class RunningExample:
    config: StudyConfig
    prompts: PromptSet
    """Every name of the study in both jobs."""
    readout: ExactReadoutConfig
    """The study's exact read-out of the paper's sampler."""
    stats: dict
    """The study's statistics options (scale, SMD method, bootstrap) for `workbench.audit.stats`."""
    folds: list
    """The study's (selection, evaluation) halves of the names: components are chosen on one, measured on the
    other."""


    def answers(self, bridge, prompts: PromptSet | None = None) -> pd.DataFrame:
        """The unpruned model's answer table for `prompts` (default: all of the example's), in their order.

        Every notebook reads the example's prompts in one and the same call, so that the read-out cache
        (`workbench.readout.cache`) computes them once for all the notebooks; a subset is taken from that table."""
        table = run_audit(bridge, self.prompts, exact=self.readout, progress=False)
        if prompts is None:
            return table
        index = table.set_index(["context", "variation", "name"]).index
        wanted = [(p.context, p.variation, p.name) for p in prompts]
        rows = index.get_indexer(wanted)
        if (rows < 0).any():
            raise ValueError(f"not prompts of the running example: {[w for w, r in zip(wanted, rows) if r < 0][:3]}")
        return table.iloc[rows].reset_index(drop=True)


def running_example(config_path: Path = STUDY_CONFIG) -> RunningExample:
    """The running example of the notebooks, read from the default study's config."""
    config = load_config(config_path)
    prompts = audit_prompts(config)
    return RunningExample(config, prompts, exact_settings(config), stats_options(config),
                          held_out_folds(config, prompts))
