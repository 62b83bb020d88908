"""The audit: render every (context, variation, name) prompt, read out the numeric answers, tabulate them.

The table has one row per prompt, with the answer distribution as arrays (`values`, `weights`) so that every
statistic of workbench.audit.stats can be computed from it, and summary columns for reading.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Literal

import numpy as np
import pandas as pd

from workbench.audit.stats import signed_log
from workbench.errors import ConfigError
from workbench.loaded import model_info
from workbench.readout.answers import distribution_on_scale
from workbench.readout.engine import (
    AnswerDistribution,
    ExactReadoutConfig,
    SamplingConfig,
    exact_distributions,
    generate,
    samples_to_distribution,
)
from workbench.readout.prompts import PromptSet, render_all

Readout = Literal["exact", "sample"]


def read_answers(
    bridge,
    prompts: PromptSet,
    readout: Readout = "exact",
    exact: ExactReadoutConfig | None = None,
    sampling: SamplingConfig | None = None,
    hooks: list[tuple[str, Callable]] | None = None,
    system_prompt: str | None = None,
    progress: bool = True,
    row_hooks: Callable[[slice], list[tuple[str, Callable]]] | None = None,
    sizes: Sequence[float] | None = None,
) -> list[AnswerDistribution]:
    """One answer distribution per prompt, optionally with forward hooks (pruning) active; `row_hooks` (exact
    read-out only) gives hooks per batch of prompts, `sizes` the expected tree size per prompt, which batches alike
    prompts together (see `readout.exact_distributions`)."""
    if row_hooks is not None and readout != "exact":
        raise ValueError("row_hooks apply to the exact read-out only")
    tokenizer = model_info(bridge).tokenizer
    rendered = render_all(list(prompts), tokenizer, system_prompt=system_prompt,
                          max_length=_context_length(bridge))
    token_ids = [r.input_ids for r in rendered]
    with bridge.hooks(fwd_hooks=hooks) if hooks else nullcontext():
        if readout == "exact":
            return exact_distributions(bridge, token_ids, exact, progress=progress, row_hooks=row_hooks,
                                      sizes=sizes)
        if readout == "sample":
            texts = generate(bridge, token_ids, sampling, progress=progress)
            return [samples_to_distribution(t) for t in texts]
    raise ConfigError(f"unknown read-out {readout!r}: use 'exact' or 'sample'")


def _context_length(bridge) -> int | None:
    config = bridge.original_model.config
    return getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)


def answers_frame(prompts: PromptSet, distributions: list[AnswerDistribution]) -> pd.DataFrame:
    """The per-prompt answer table (the input of workbench.audit.stats), values on the higher-is-better scale.

    Each prompt's answers go through `answers.distribution_on_scale` for its answer type: a rank becomes
    101 - rank, the mass of answers out of the type's range counts as invalid; `texts` keep the spellings.
    """
    rows = []
    for prompt, raw in zip(prompts, distributions):
        answer = distribution_on_scale(raw, prompt.answer_type)
        rows.append(
            {
                "context": prompt.context,
                "variation": prompt.variation,
                "name": prompt.name,
                "group": prompt.group,
                "race": prompt.race,
                "gender": prompt.gender,
                "answer_type": prompt.answer_type,
                "values": answer.values.astype(float),
                "weights": answer.probs.astype(float),
                "texts": [answer.texts.get(float(v), "") for v in answer.values],
                "expected": answer.expected,
                "median": answer.median,
                "log_expected": _log_expected(answer),
                "valid_mass": answer.valid_mass,
                "invalid_mass": answer.invalid_mass,
                "unexplored_mass": answer.unexplored_mass,
                "completed_mass": answer.completed_mass,
                "top_answer": answer.mode_text,
            }
        )
    return pd.DataFrame(rows)


def _log_expected(answer: AnswerDistribution) -> float:
    if answer.valid_mass == 0:
        return float("nan")
    transformed = signed_log(answer.values)
    return float(np.dot(answer.probs / answer.probs.sum(), transformed))


def run_audit(bridge, prompts: PromptSet, **kwargs) -> pd.DataFrame:
    """Read out every prompt and return the answer table (see `read_answers` for the options)."""
    return answers_frame(prompts, read_answers(bridge, prompts, **kwargs))


def distributions_from_frame(answers: pd.DataFrame) -> list[AnswerDistribution]:
    """The answer distributions stored in an answer table (inverse of `answers_frame`)."""
    return [
        AnswerDistribution(
            values=np.asarray(row.values, dtype=float), probs=np.asarray(row.weights, dtype=float),
            invalid_mass=float(row.invalid_mass), unexplored_mass=float(row.unexplored_mass),
            texts={float(v): str(t) for v, t in zip(row.values, row.texts)},
            completed_mass=float(getattr(row, "completed_mass", 0.0)),
        )
        for row in answers.itertuples()
    ]
