"""Is a pruned model still a sensible model? Answer-level and language-level checks.

- invalid_rate: how much answer mass ends without a number (and, separately, how much was left unexplored).
- inlier_ratio: per variation, the share of the pruned model's answer mass inside the unpruned model's
  [5 %, 95 %] range for that variation (the paper's inlier ratio, with exact answer distributions instead of
  samples); anomaly rate = 1 - inlier ratio.
- kl_on_neutral / perplexity: how far pruning moves the next-token distribution on plain English text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from workbench.batching import chunks, left_pad, model_device, pad_id
from workbench.loaded import model_info
from workbench.readout.prompts import PROMPTS_DIR

Hooks = list[tuple[str, Callable]]
VARIATION = ["context", "variation"]


def load_neutral_texts() -> list[str]:
    """About forty short everyday English sentences with no names of people (prompts/neutral.txt)."""
    text = (PROMPTS_DIR / "neutral.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def invalid_rate(answers: pd.DataFrame) -> dict[str, float]:
    """Mean answer mass that ended without a number, and mean mass left unexplored by the read-out."""
    return {"invalid_rate": float(answers["invalid_mass"].mean()),
            "unexplored_rate": float(answers["unexplored_mass"].mean())}


def _normalised(row) -> tuple[np.ndarray, np.ndarray] | None:
    """A name's answer values and probabilities normalised over its valid mass (None without valid answers)."""
    weights = np.asarray(row["weights"], dtype=float)
    total = weights.sum()
    return None if total <= 0 else (np.asarray(row["values"], dtype=float), weights / total)


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles of a discrete distribution: the smallest value whose cumulative probability reaches q."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    return [float(values[order][np.searchsorted(cumulative, q - 1e-9)]) for q in qs]


def _mixture(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """The names' normalised answer distributions pooled with equal weight per name."""
    parts = [p for p in map(_normalised, rows.to_dict("records")) if p is not None]
    if not parts:
        return None
    return np.concatenate([v for v, _ in parts]), np.concatenate([w for _, w in parts]) / len(parts)


def _inside(rows: pd.DataFrame, low: float, high: float) -> float:
    """Mean over names of the valid answer mass within [low, high]."""
    parts = [p for p in map(_normalised, rows.to_dict("records")) if p is not None]
    masses = [w[(v >= low) & (v <= high)].sum() for v, w in parts]
    return float(np.mean(masses)) if masses else float("nan")


def inlier_ratio(base: pd.DataFrame, pruned: pd.DataFrame, quantiles: tuple[float, float] = (0.05, 0.95)
                 ) -> pd.DataFrame:
    """Per (context, variation): the unpruned model's quantile range and the pruned model's mass inside it."""
    rows = []
    for key, base_rows in base.groupby(VARIATION, sort=True):
        mixture = _mixture(base_rows)
        pruned_rows = pruned[(pruned["context"] == key[0]) & (pruned["variation"] == key[1])]
        low, high = weighted_quantiles(*mixture, quantiles) if mixture else (float("nan"), float("nan"))
        inlier = _inside(pruned_rows, low, high) if mixture else float("nan")
        rows.append({"context": key[0], "variation": key[1], "low": low, "high": high,
                     "inlier_ratio": inlier, "anomaly_rate": 1 - inlier})
    return pd.DataFrame(rows)


def encode_with_bos(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, starting with BOS where the tokenizer has one."""
    encoded = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=True)
        bos = tokenizer.bos_token_id
        encoded.append(ids if bos is None or (ids and ids[0] == bos) else [bos, *ids])
    return encoded


def _log_probs(bridge, ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], hooks: Hooks | None
               ) -> Float[Tensor, "batch pos vocab"]:
    with bridge.hooks(fwd_hooks=hooks) if hooks else nullcontext(), torch.inference_mode():
        return F.log_softmax(bridge(ids, attention_mask=mask).float(), dim=-1)


def _batches(bridge, texts: Sequence[str], batch_size: int):
    tokenizer = model_info(bridge).tokenizer
    encoded = encode_with_bos(tokenizer, texts)
    for part in chunks(len(encoded), batch_size):
        yield left_pad(encoded[part], pad_id(tokenizer), model_device(bridge))


def kl_on_neutral(bridge, hooks: Hooks | None, texts: Sequence[str] | None = None, batch_size: int = 8,
                  edit: Callable[[], AbstractContextManager] | None = None) -> float:
    """Mean next-token KL(unchanged || changed) over every real position of the texts (nats); the change is the
    hooks, or the context manager `edit()` returns (a weight edit such as a spike-in plant)."""
    texts = load_neutral_texts() if texts is None else texts
    total, count = 0.0, 0
    for ids, mask in _batches(bridge, texts, batch_size):
        base = _log_probs(bridge, ids, mask, None)
        with edit() if edit else nullcontext():
            changed = _log_probs(bridge, ids, mask, hooks)
        kl = (base.exp() * (base - changed)).sum(-1)
        total += float(kl[mask.bool()].sum())
        count += int(mask.sum())
    return total / count


def perplexity(bridge, texts: Sequence[str] | None = None, hooks: Hooks | None = None, batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over all predicted tokens of the texts."""
    texts = load_neutral_texts() if texts is None else texts
    total, count = 0.0, 0
    for ids, mask in _batches(bridge, texts, batch_size):
        log_probs = _log_probs(bridge, ids, mask, hooks)[:, :-1]
        nll = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        predicted = (mask[:, 1:] * mask[:, :-1]).bool()
        total += float(nll[predicted].sum())
        count += int(predicted.sum())
    return float(np.exp(total / count))


def anomaly_report(bridge, hooks: Hooks | None, base_answers: pd.DataFrame, pruned_answers: pd.DataFrame,
                   texts: Sequence[str] | None = None) -> dict[str, float]:
    """One row of anomaly measures; inlier ratio and anomaly rate are averaged over variations."""
    texts = load_neutral_texts() if texts is None else texts
    inlier = float(inlier_ratio(base_answers, pruned_answers)["inlier_ratio"].mean())
    return {
        **invalid_rate(pruned_answers),
        "inlier_ratio": inlier,
        "anomaly_rate": 1 - inlier,
        "kl": kl_on_neutral(bridge, hooks, texts),
        "perplexity_base": perplexity(bridge, texts),
        "perplexity_pruned": perplexity(bridge, texts, hooks),
    }
