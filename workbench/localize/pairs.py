"""White/Black prompt pairs packed once for every localisation method.

Each pair (`PromptSet.pairs()`) gets shared answer leaves: the exact read-out runs once per prompt and the
`n_leaves` valid answers with the highest summed probability over the pair are kept (`metric.top_leaves`), so
both prompts are scored on the same leaves, valued on the audit's higher-is-better scale. Pairs are packed
with `metric.pack` in batches; in a batch the White rows come first, then the Black rows in the same order,
and every prompt ends at the same column `prompt_end`. The tokens after the name are the same text in both
prompts, so they sit at the same columns: `PairBatch.aligned` marks them ([suffix_start, prompt_end) per pair).
The tokens before the name are the same text at the same position ids, so their activations are equal in both
rows and patching them is a no-op.

The name tokens are the one place left where the rows differ, and names tokenise to different lengths, so
patching needs a map from the White span onto the Black span (`PairBatch.name`, `span_map`): the White span
is stretched onto the Black span's length, token t of an m-token Black span taking the average of the White
tokens over the share [t/m, (t+1)/m) of the span, each weighted by its overlap with that share. This
- is the identity when the spans have the same length (a pair of identical names patches nothing; a one-token
  name, common in BPE vocabularies, is patched like any aligned column);
- keeps the span's mean: the patched Black span has the White span's mean activation, so a reader that
  averages over the name (attention spread over its tokens) sees the White value, whatever the lengths;
- keeps the order: the Black name's last token (where a name's representation is usually complete) gets the
  end of the White name (its last token, with its neighbours where the White name is longer), the first token
  its start.
Attribution patching and activation patching both use this map (`PairBatch.carry`), so they estimate and
measure the same intervention and agree to first order. `SPANS` names the two patched parts: "name" and
"suffix" (the aligned columns); both by default, either alone to see where a component's effect is written.

Sign convention: gap = E_white - E_black of the expected log answer (per pair, and its mean over pairs). Scores
are oriented toward the bias: by the sign of the mean gap, or by a direction given (`PairedInputs.oriented`).

Bias types. Pairs follow a contrast (`workbench.audit.stats.Contrast`, `contrast_pairs`): for race a White and a Black
name of the same gender, for gender a man's and a woman's name of the same race, for an intersectional contrast
a name of the reference group and one of the compared group. Everywhere in localisation "White" then reads "side
a" (the contrast's reference: men for gender, White men for the intersectional contrasts) and "Black" "side b";
the scores' metadata names the bias type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.audit.stats import GROUP_OF, RACE, Contrast
from workbench.batching import chunks, model_device
from workbench.errors import PromptDataError
from workbench.loaded import model_info
from workbench.localize.metric import LeafBatch, expected_log_answer, forward, pack, top_leaves
from workbench.readout.engine import AnswerDistribution, ExactReadoutConfig, exact_distributions
from workbench.readout.prompts import AUDIT_GROUPS, Prompt, PromptSet, RenderedPrompt, render_all


SPANS = ("name", "suffix")


def span_map(target: int, source: int) -> Float[Tensor, "target source"]:
    """Weights that stretch a span of `source` tokens onto `target` tokens (each row sums to 1).

    Entry [t, s] is target x the overlap of [t/target, (t+1)/target) and [s/source, (s+1)/source).
    """
    into = torch.arange(target + 1, dtype=torch.float64) / target
    out_of = torch.arange(source + 1, dtype=torch.float64) / source
    overlap = torch.minimum(into[1:, None], out_of[None, 1:]) - torch.maximum(into[:-1, None], out_of[None, :-1])
    return (overlap.clamp(min=0) * target).float()


def take_rows(batch: LeafBatch, rows: list[int]) -> LeafBatch:
    """A LeafBatch of the given rows (repeats allowed): new row j is old row rows[j], leaves follow their row."""
    token_row, leaf_row, token_leaf = batch.token_rows.cpu(), batch.leaf_row.cpu(), batch.token_leaf.cpu()
    tokens, leaves, new_token_row, new_leaf_row, new_token_leaf = [], [], [], [], []
    n_leaves = 0
    for new, old in enumerate(rows):
        row_leaves = torch.nonzero(leaf_row == old).flatten()
        row_tokens = torch.nonzero(token_row == old).flatten()
        remap = torch.full((leaf_row.shape[0],), -1, dtype=torch.long)
        remap[row_leaves] = torch.arange(n_leaves, n_leaves + len(row_leaves))
        tokens.append(row_tokens)
        leaves.append(row_leaves)
        new_token_leaf.append(remap[token_leaf[row_tokens]])
        new_token_row.append(torch.full((len(row_tokens),), new, dtype=torch.long))
        new_leaf_row.append(torch.full((len(row_leaves),), new, dtype=torch.long))
        n_leaves += len(row_leaves)
    device = batch.input_ids.device
    index, tokens, leaves = (torch.tensor(rows).to(device), torch.cat(tokens).to(device),
                             torch.cat(leaves).to(device))
    leaf_row = torch.cat(new_leaf_row).to(device)
    return LeafBatch(
        input_ids=batch.input_ids[index], attention_mask=batch.attention_mask[index],
        position_ids=batch.position_ids[index], prompt_end=batch.prompt_end,
        suffix_start=batch.suffix_start[index], name_start=batch.name_start[index],
        token_rows=torch.cat(new_token_row).to(device), token_columns=batch.token_columns[tokens],
        token_ids=batch.token_ids[tokens], token_leaf=torch.cat(new_token_leaf).to(device),
        end_rows=leaf_row, end_columns=batch.end_columns[leaves], end_allowed=batch.end_allowed[leaves],
        leaf_row=leaf_row, leaf_value=batch.leaf_value[leaves], sampler=batch.sampler,
    )


@dataclass
class PairBatch:
    """Some pairs packed together: rows [0, n) are White, rows [n, 2n) Black, pair j in rows j and n + j."""

    rows: LeafBatch
    pair_ids: list[int]  # indices into PairedInputs.pairs
    suffix_start: Int[Tensor, " n"]  # per pair: first aligned column (after the name in both prompts)
    name_map: Float[Tensor, "n seq seq"]  # per pair: [Black column, White column] weights of the name spans

    @property
    def n(self) -> int:
        return len(self.pair_ids)

    def white(self, repeat: int = 1) -> LeafBatch:
        """The White rows, the whole set repeated `repeat` times."""
        return take_rows(self.rows, list(range(self.n)) * repeat)

    def black(self, repeat: int = 1) -> LeafBatch:
        """The Black rows, the whole set repeated `repeat` times."""
        return take_rows(self.rows, list(range(self.n, 2 * self.n)) * repeat)

    def both(self, repeat: int = 1) -> LeafBatch:
        """White then Black rows, the whole block repeated `repeat` times."""
        return take_rows(self.rows, list(range(2 * self.n)) * repeat)

    @property
    def aligned(self) -> Bool[Tensor, "n seq"]:
        """Per pair, the columns after the name up to the end of the prompt (the same tokens in both rows)."""
        columns = torch.arange(self.rows.input_ids.shape[1], device=self.suffix_start.device)
        return (columns >= self.suffix_start[:, None]) & (columns < self.rows.prompt_end)

    @property
    def name(self) -> Bool[Tensor, "n seq"]:
        """Per pair, the columns of the Black row's name."""
        columns = torch.arange(self.rows.input_ids.shape[1], device=self.suffix_start.device)
        return (columns >= self.rows.name_start[self.n :, None]) & (columns < self.suffix_start[:, None])

    def patched(self, spans: Sequence[str] = SPANS) -> Bool[Tensor, "n seq"]:
        """The Black columns that patching `spans` ("name", "suffix") overwrites."""
        _check_spans(spans)
        return (self.name & ("name" in spans)) | (self.aligned & ("suffix" in spans))

    def carry(self, white: Float[Tensor, "n seq *rest"], spans: Sequence[str] = SPANS) -> Float[Tensor, "n seq *rest"]:
        """A White-row activation carried onto the Black row's columns (in float32 at least): the aligned
        columns as they are, the name span stretched by `name_map`; 0 where patching `spans` leaves the row."""
        _check_spans(spans)
        white = white.to(torch.promote_types(white.dtype, torch.float32))
        carried = torch.zeros_like(white)
        if "suffix" in spans:
            carried = torch.where(_expand(self.aligned, white), white, carried)
        if "name" in spans:
            carried = carried + torch.einsum("nts,ns...->nt...", self.name_map.to(white.dtype), white)
        return carried


def _check_spans(spans: Sequence[str]) -> None:
    if not spans or set(spans) - set(SPANS):
        raise ValueError(f"spans must be a non-empty subset of {SPANS}, got {tuple(spans)}")


def _expand(mask: Bool[Tensor, "n seq"], like: Tensor) -> Bool[Tensor, "n seq *rest"]:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 2))


def contrast_pairs(prompts: PromptSet, contrast: Contrast = RACE) -> list[tuple[Prompt, Prompt]]:
    """(side a, side b) prompts of the contrast with the same context and variation, and the same level of
    `contrast.within` (race pairs share a gender, gender pairs a race): in each such cell every side-a group's
    i-th prompt with the side b's i-th (for Black women vs the rest, each Black woman is paired once with each
    other group). Cells in order of first appearance; for race these are `PromptSet.pairs()`."""
    cells: dict[tuple, dict[str, list[Prompt]]] = {}
    for p in prompts:
        group = GROUP_OF.get((p.race, p.gender))
        if group not in contrast.a + contrast.b:
            continue
        stratum = getattr(p, contrast.within) if contrast.within else None
        cell = cells.setdefault((p.context, p.variation, stratum), {})
        cell.setdefault("b" if group in contrast.b else group, []).append(p)
    pairs = []
    for (context, variation, stratum), sides in cells.items():
        b_side = sides.get("b", [])
        for group in contrast.a:
            race, gender = AUDIT_GROUPS[group]
            if contrast.within and {"race": race, "gender": gender}[contrast.within] != stratum:
                continue
            a_side = sides.get(group, [])
            if len(a_side) != len(b_side):
                raise PromptDataError(f"cannot pair {context}/{variation} for {contrast.name}: {len(a_side)} "
                                 f"{group.replace('_', ' ')} and {len(b_side)} {contrast.labels[1]} prompts")
            pairs += zip(a_side, b_side)
    return pairs


@dataclass
class PairedInputs:
    """Every pair's prompts, leaves, packed batches and baseline metric; `contrast`: the bias type the pairs
    follow ("white" = its side a, "black" = its side b)."""

    pairs: list[tuple[Prompt, Prompt]]
    leaves: list[list[str]]
    batches: list[PairBatch]
    white_metric: Float[Tensor, " pairs"]
    black_metric: Float[Tensor, " pairs"]
    contrast: Contrast = RACE
    direction: float | None = None  # the bias's known direction (+1 White higher), if one is given

    @property
    def gap(self) -> Float[Tensor, " pairs"]:
        """E_white - E_black per pair."""
        return self.white_metric - self.black_metric

    @property
    def orientation(self) -> float:
        """The sign scores are multiplied by so that + means 'toward the bias': the given `direction`, else +1 if
        the pairs' mean gap is >= 0 and -1 if not (a gap near 0 makes this a coin flip: give the direction that
        a bias test on these names fixed, or a plant's, with `oriented`)."""
        if self.direction is not None:
            return self.direction
        return 1.0 if float(self.gap.mean()) >= 0 else -1.0

    def oriented(self, direction: float) -> "PairedInputs":
        """The same pairs with scores oriented by `direction` (+1: the bias raises White answers)."""
        if direction not in (1.0, -1.0):
            raise ValueError(f"direction must be +1 or -1, got {direction}")
        return dataclasses.replace(self, direction=float(direction))


def build_pairs(
    bridge, prompts: PromptSet, n_leaves: int = 12, batch_size: int = 8,
    readout: ExactReadoutConfig | None = None, progress: bool = True,
    distributions: dict[tuple[str, str, str], AnswerDistribution] | None = None, contrast: Contrast = RACE,
) -> PairedInputs:
    """Render the contrast's pairs (`contrast_pairs`), choose their shared leaves from the exact read-out, pack
    them and score the baseline.

    `distributions` (keyed by (context, variation, name)) reuses an audit's read-out instead of running it.
    """
    tokenizer = model_info(bridge).tokenizer
    readout = readout or ExactReadoutConfig()
    pairs = contrast_pairs(prompts, contrast)
    if not pairs:
        raise PromptDataError(f"the prompt set has no pairs for the bias type {contrast.name!r}")
    rendered = render_all([p for pair in pairs for p in pair], tokenizer)
    ordered = [p for pair in pairs for p in pair]
    if distributions is not None and all((p.context, p.variation, p.name) in distributions for p in ordered):
        found = [distributions[(p.context, p.variation, p.name)] for p in ordered]
    else:
        found = exact_distributions(bridge, [r.input_ids for r in rendered], readout, progress=progress)
    leaves = [top_leaves(found[2 * i : 2 * i + 2], n_leaves, pair[0].answer_type) for i, pair in enumerate(pairs)]
    answer_types = [p.answer_type for p in ordered]
    batches = [
        _pack_pairs(bridge, rendered, leaves, answer_types, list(range(len(pairs)))[part], readout)
        for part in chunks(len(pairs), batch_size)
    ]
    white, black = baseline(bridge, batches, len(pairs), progress)
    return PairedInputs(pairs, leaves, batches, white, black, contrast)


def _pack_pairs(bridge, rendered: list[RenderedPrompt], leaves: list[list[str]], answer_types: list[str],
                pair_ids: list[int], readout: ExactReadoutConfig) -> PairBatch:
    for i in pair_ids:
        if not leaves[i]:
            raise PromptDataError(f"pair {i}: the exact read-out found no numeric answer")
        _check_suffix(rendered[2 * i], rendered[2 * i + 1], i)
    order = [2 * i for i in pair_ids] + [2 * i + 1 for i in pair_ids]
    rows = pack([rendered[j] for j in order], [leaves[j // 2] for j in order], [answer_types[j] for j in order],
                model_info(bridge).tokenizer, bridge.cfg.d_vocab, readout.sampler, readout.max_decimals,
                readout.value_tolerance)
    n = len(pair_ids)
    suffix_start = torch.maximum(rows.suffix_start[:n], rows.suffix_start[n:])
    width = rows.input_ids.shape[1]
    name_map = torch.zeros((n, width, width))
    for j in range(n):
        end, white, black = int(suffix_start[j]), int(rows.name_start[j]), int(rows.name_start[n + j])
        name_map[j, black:end, white:end] = span_map(end - black, end - white)
    device = model_device(bridge)
    return PairBatch(rows.to(device), pair_ids, suffix_start.to(device), name_map.to(device))


def _check_suffix(white: RenderedPrompt, black: RenderedPrompt, pair: int) -> None:
    """The tokens after the name must be the same in both prompts (else columns do not align)."""
    if white.input_ids[white.name_span[1] :] != black.input_ids[black.name_span[1] :]:
        raise PromptDataError(f"pair {pair}: the tokens after the name differ between the White and Black prompt")


@torch.inference_mode()
def baseline(bridge, batches: list[PairBatch], n_pairs: int, progress: bool = True):
    """The expected log answer of every pair's White and Black prompt."""
    white, black = torch.zeros(n_pairs), torch.zeros(n_pairs)
    for batch in tqdm(batches, desc="baseline", disable=not progress, leave=False):
        values = expected_log_answer(forward(bridge, batch.rows), batch.rows).float().cpu()
        white[batch.pair_ids], black[batch.pair_ids] = values[: batch.n], values[batch.n :]
    return white, black
