"""Answer types: which numbers are valid answers and the "higher is better" scale they are compared on.

`on_scale` is the one place that knows the answer types; the audit's answer table (`audit.answers_frame`, via
`distribution_on_scale`) and the localisation metric (`metric.leaf_value`) both read answers through it, so a
positive gap means the same in both. A rank (1 = best of 100) is flipped to 101 - rank, as in the 2024 audit;
every other type is used as written. Mass on invalid answers (out of range, a fractional rank) is moved to the
distribution's invalid mass, never renormalised away.
"""

from __future__ import annotations

import numpy as np

from workbench.errors import PromptDataError
from workbench.readout.engine import AnswerDistribution

ANSWER_TYPES = ("dollars", "percent", "hours", "probability", "rank")
RANKS = 100
"""Length of the ranking a rank answer refers to (ranks 1..RANKS)."""


def on_scale(values: np.ndarray, answer_type: str) -> tuple[np.ndarray, np.ndarray]:
    """The values on the higher-is-better scale, and which of them are valid answers of `answer_type`.

    probability: [0, 1]; percent: [0, 100]; rank: an integer in 1..RANKS, mapped to RANKS + 1 - rank;
    dollars and hours: non-negative. NaN is never valid.
    """
    values = np.asarray(values, dtype=float)
    if answer_type == "probability":
        return values, (values >= 0) & (values <= 1)
    if answer_type == "percent":
        return values, (values >= 0) & (values <= 100)
    if answer_type == "rank":
        return RANKS + 1 - values, (values >= 1) & (values <= RANKS) & (values == np.round(values))
    if answer_type in ("dollars", "hours"):
        return values, values >= 0
    raise PromptDataError(f"unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES}")


def distribution_on_scale(answer: AnswerDistribution, answer_type: str) -> AnswerDistribution:
    """`answer` with its valid values on the scale (spellings kept) and the mass of the others made invalid."""
    values, probs = np.asarray(answer.values, dtype=float), np.asarray(answer.probs, dtype=float)
    scaled, valid = on_scale(values, answer_type)
    return AnswerDistribution(
        values=scaled[valid],
        probs=probs[valid],
        invalid_mass=answer.invalid_mass + float(probs[~valid].sum()),
        unexplored_mass=answer.unexplored_mass,
        texts={float(new): answer.texts.get(float(old), "") for new, old in zip(scaled[valid], values[valid])},
        completed_mass=answer.completed_mass,
    )
