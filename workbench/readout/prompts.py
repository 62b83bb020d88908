"""Prompts of the bias study: names and contexts from TOML, the 2024 audit CSV, and rendering.

A prompt asks for a number (a price, a percentage, hours) and varies only the first name. `PromptSet.build`
crosses contexts, variations and names from a prompts folder (the top-level `prompts/` by default, documented in
its README; a config's `[prompts] folder` selects another one with the same files): the pruning study's contexts
(contexts.toml) and the 2024 audit's scenarios at three levels of detail (scenarios.toml), as contexts named
"<scenario>:<level>" such as "purchase:low" or "public office:numeric". `PromptSet.from_audit_csv` imports the
2024 audit's prompt table under the same context keys. `render` wraps a prompt in the model's chat template
(or a plain question/answer frame for a base model), appends the context's answer prefix so that the next
tokens are the number, and locates the name's tokens from the tokenizer's character offsets (never from
hard-coded token ids).
"""

from __future__ import annotations

import csv
import io
import re
import string
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from importlib.resources import files
from pathlib import Path

import pandas as pd

from workbench.errors import ConfigError, PromptDataError
from workbench.readout.answers import ANSWER_TYPES

NAMES_FILE, CONTEXTS_FILE, SCENARIOS_FILE = "names.toml", "contexts.toml", "scenarios.toml"
NAME_BANK_FILE, PAPER_PROBABILITIES_FILE = "name_bank.csv", "paper_name_probabilities.csv"
NAME_FILES = {"paper": NAMES_FILE, "bank": NAME_BANK_FILE}
"""Where first names come from: the paper's lists (names.toml) or the name bank built from data (name_bank.csv)."""
NAME_SOURCES = tuple(NAME_FILES)
PAPER_NAMES_PER_GROUP = 16
RACE_THRESHOLD, GENDER_THRESHOLD = 0.8, 0.98
"""The name bank's thresholds: P(race | name) and the gender's share of the name's SSA births."""


def bundled_prompts() -> Path:
    """The prompt data shipped with the workbench: the checkout's `prompts/` folder or, in an installed wheel,
    its copy (the package `workbench.prompts`, mapped from `prompts/` by pyproject.toml)."""
    checkout = Path(__file__).parents[2] / "prompts"
    if (checkout / NAMES_FILE).is_file():
        return checkout
    return Path(str(files("workbench.prompts")))


PROMPTS_DIR = bundled_prompts()
NAMES_PATH = PROMPTS_DIR / NAMES_FILE
CONTEXTS_PATH = PROMPTS_DIR / CONTEXTS_FILE
SCENARIOS_PATH = PROMPTS_DIR / SCENARIOS_FILE


def prompt_file(folder: str | Path | None, name: str) -> Path:
    """The file `name` of a prompts folder (None: the bundled one); a missing file is a PromptDataError."""
    path = Path(folder or PROMPTS_DIR) / name
    if not path.is_file():
        raise PromptDataError(f"{path}: no such file; a prompts folder holds {NAMES_FILE}, {CONTEXTS_FILE} and "
                              f"{SCENARIOS_FILE}, and {NAME_BANK_FILE} for names = 'bank' (copy {PROMPTS_DIR} to "
                              "start one)")
    return path


RACES = ("white", "black")
GENDERS = ("man", "woman")
PLACEHOLDERS = ("name", "variation", "article")
LEVELS = ("low", "high", "numeric")
"""The audit's levels of detail: none, qualitative detail, and the detail with a numeric anchor."""

AUDIT_COLUMNS = ("scenario", "variation", "name_group", "name", "context_level", "prompt_text")
AUDIT_GROUPS = {
    "white_men": ("white", "man"),
    "white_women": ("white", "woman"),
    "black_men": ("black", "man"),
    "black_women": ("black", "woman"),
}


@dataclass(frozen=True)
class NameEntry:
    """A first (or full) name and its group."""

    name: str
    group: str
    race: str
    gender: str


@dataclass(frozen=True)
class Context:
    """A prompt template and the variations it is filled with; `details` fill a {detail} placeholder."""

    key: str
    description: str
    template: str
    variations: tuple[str, ...]
    answer_type: str
    answer_prefix: str
    details: dict[str, str] = field(default_factory=dict)  # variation -> {detail} text


@dataclass(frozen=True)
class VariationSet:
    """An alternative list of variations for a context, with held-out items (train is the rest)."""

    key: str
    context: str
    variations: tuple[str, ...]
    held_out: tuple[str, ...]

    @property
    def train(self) -> tuple[str, ...]:
        """The variations that are not held out, in file order."""
        return tuple(v for v in self.variations if v not in self.held_out)


@dataclass(frozen=True)
class Prompt:
    """One user message; `text` is the message, `answer_prefix` starts the assistant's reply."""

    context: str
    variation: str
    name: str
    group: str
    race: str
    gender: str
    text: str
    answer_type: str
    answer_prefix: str


@dataclass(frozen=True)
class RenderedPrompt:
    """Token ids of a rendered prompt; `name_span` is [start, end) in tokens, the answer starts at the end."""

    input_ids: list[int]
    text: str
    name_span: tuple[int, int]
    answer_start: int


def _read_toml(path: Path) -> dict:
    """Parse a TOML file, reporting syntax errors with the file and line."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise PromptDataError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PromptDataError(f"{path}: malformed TOML: {exc}") from exc


def _field(path: Path, table: dict, where: str, key: str, kind: type):
    """`table[key]`, checked to exist and to be of `kind`."""
    if key not in table:
        raise PromptDataError(f"{path}: {where} is missing field '{key}'")
    value = table[key]
    if not isinstance(value, kind):
        raise PromptDataError(f"{path}: {where}.{key} must be a {kind.__name__}, got {value!r}")
    return value


def _strings(path: Path, table: dict, where: str, key: str) -> tuple[str, ...]:
    """A non-empty list of non-empty strings."""
    values = _field(path, table, where, key, list)
    if not values:
        raise PromptDataError(f"{path}: {where}.{key} is empty")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise PromptDataError(f"{path}: {where}.{key} must hold non-empty strings")
    return tuple(values)


def _choice(path: Path, table: dict, where: str, key: str, allowed: tuple[str, ...]) -> str:
    """A string field that must be one of `allowed`."""
    value = _field(path, table, where, key, str)
    if value not in allowed:
        raise PromptDataError(f"{path}: {where}.{key} = {value!r} is unknown; expected one of {allowed}")
    return value


def _tables(path: Path, data: dict, key: str) -> dict[str, dict]:
    """The non-empty table of tables `data[key]`."""
    tables = _field(path, data, "the file", key, dict)
    if not tables:
        raise PromptDataError(f"{path}: [{key}] has no entries")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise PromptDataError(f"{path}: {key}.{name} must be a table")
    return tables


def load_names(path: str | Path | None = None, full_names: bool = False, source: str = "paper") -> list[NameEntry]:
    """The names of every group, in file order; `full_names` gives the 2024 audit's names with surnames.

    `source` "paper" reads a names.toml (`path`, None: the bundled one), "bank" a name_bank.csv (None: the bundled
    one), whose names have no surnames.
    """
    _check_source(source)
    if source == "bank":
        if full_names:
            raise ConfigError("the name bank has first names only (full_names needs the paper's names)")
        return _load_bank(Path(path or PROMPTS_DIR / NAME_BANK_FILE))
    path = Path(path or NAMES_PATH)
    key = "full_names" if full_names else "names"
    entries, seen = [], {}
    for group, table in _tables(path, _read_toml(path), "groups").items():
        where = f"groups.{group}"
        race = _choice(path, table, where, "race", RACES)
        gender = _choice(path, table, where, "gender", GENDERS)
        for name in _strings(path, table, where, key):
            if name in seen:
                raise PromptDataError(f"{path}: {where}.{key}: duplicate name {name!r} (also in groups.{seen[name]})")
            seen[name] = group
            entries.append(NameEntry(name, group, race, gender))
    return entries


BANK_COLUMNS = ("name", "race", "gender", "group", "rank")


def _check_source(source: str) -> None:
    """A names source must be one of NAME_SOURCES."""
    if source not in NAME_SOURCES:
        raise ConfigError(f"names source {source!r} is unknown; expected one of {NAME_SOURCES}")


def _load_bank(path: Path) -> list[NameEntry]:
    """The name bank's entries in file order, checked: known races and genders, one race and gender per group,
    its ranks 1, 2, ... in file order, no name twice."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            missing = [c for c in BANK_COLUMNS if c not in (reader.fieldnames or [])]
            rows = list(reader)
    except FileNotFoundError as exc:
        raise PromptDataError(f"{path}: no such file") from exc
    if missing:
        raise PromptDataError(f"{path}: line 1 (header): missing column(s) {missing}")
    entries: list[NameEntry] = []
    for line, row in enumerate(rows, start=2):
        where = f"{path}: line {line}"
        entry = NameEntry(*(_cell(row, c) for c in ("name", "group", "race", "gender")))
        if entry.race not in RACES or entry.gender not in GENDERS:
            raise PromptDataError(f"{where}: race {entry.race!r} or gender {entry.gender!r} is unknown; "
                                  f"expected one of {RACES} and of {GENDERS}")
        same = [e for e in entries if e.group == entry.group]
        if same and (same[0].race, same[0].gender) != (entry.race, entry.gender):
            raise PromptDataError(f"{where}: group {entry.group!r} has another race or gender on an earlier line")
        if _cell(row, "rank") != str(len(same) + 1):
            raise PromptDataError(f"{where}: rank {_cell(row, 'rank')!r}; a group's ranks are 1, 2, ... in order")
        if not entry.name or any(e.name == entry.name for e in entries):
            raise PromptDataError(f"{where}: name {entry.name!r} is empty or repeated")
        entries.append(entry)
    return entries


def _names_file(folder: str | Path | None, source: str) -> Path:
    """The names file of `source` ("paper" or "bank") in a prompts folder (None: the bundled one)."""
    _check_source(source)
    return prompt_file(folder, NAME_FILES[source])


def _first_names(folder: str | Path | None, source: str) -> list[NameEntry]:
    """The first names of a prompts folder (None: the bundled one) from `source`."""
    return load_names(_names_file(folder, source), source=source)


def _by_group(entries: list[NameEntry]) -> dict[str, list[str]]:
    """Names per group, groups and names in order."""
    groups: dict[str, list[str]] = {}
    for entry in entries:
        groups.setdefault(entry.group, []).append(entry.name)
    return groups


def names_subset(per_group: int, folder: str | Path | None = None, source: str = "paper", offset: int = 0
                 ) -> list[str]:
    """`per_group` names of each race x gender group of a prompts folder (None: the bundled one) after its first
    `offset`, from the paper's lists (names.toml, file order) or the name bank (name_bank.csv, rank order)."""
    if per_group < 1:
        raise ConfigError(f"names_per_group must be at least 1, got {per_group}")
    if offset < 0:
        raise ConfigError(f"names_offset must be at least 0, got {offset}")
    return [name for names in _by_group(_first_names(folder, source)).values()
            for name in names[offset : offset + per_group]]


def names_beyond(per_group: int, folder: str | Path | None = None, source: str = "paper") -> list[str]:
    """The names of each group after its first `per_group` (those a study with that many names never uses), as
    many per group as the smallest group has left."""
    left = _by_group(_first_names(folder, source))
    keep = min(len(names) for names in left.values()) - per_group
    if keep < 1:
        raise ConfigError(f"no names are left beyond the first {per_group} of each group "
                          f"({_names_file(folder, source)})")
    return [name for names in left.values() for name in names[per_group : per_group + keep]]


def max_names_per_group(folder: str | Path | None = None, source: str = "paper") -> int:
    """The most names a study may take per group: PAPER_NAMES_PER_GROUP for the paper's lists, the smallest
    group's size for the name bank."""
    _check_source(source)
    if source == "paper":
        return PAPER_NAMES_PER_GROUP
    return min(len(names) for names in _by_group(_first_names(folder, source)).values())


def paper_name_flags(folder: str | Path | None = None) -> pd.DataFrame:
    """The first names of a prompts folder's names.toml (None: the bundled one) with their P(own race | name),
    gender share and SSA births in the name bank's source data (prompts/paper_name_probabilities.csv; NaN and
    `known` False where it lacks the name or has it in another group; such a name is not flagged), and whether it
    is `weak`: `weak_race` (below RACE_THRESHOLD) or `weak_gender` (below GENDER_THRESHOLD)."""
    names = pd.DataFrame([asdict(e) for e in load_names(prompt_file(folder, NAMES_FILE))])
    columns = ["name", "group", "p_white", "p_black", "share_of_gender", "ssa_count"]
    flags = names.merge(name_probabilities("paper")[columns], on=["name", "group"], how="left",
                        validate="one_to_one")
    flags["known"] = flags.p_white.notna()
    flags["p_race"] = flags.p_white.where(flags.race == "white", flags.p_black)
    flags = flags.drop(columns=["p_white", "p_black"])
    flags["weak_race"] = flags.p_race < RACE_THRESHOLD
    flags["weak_gender"] = flags.share_of_gender < GENDER_THRESHOLD
    flags["weak"] = flags.weak_race | flags.weak_gender
    return flags


NAME_PROBABILITY_COLUMNS = ["p_white", "p_black", "share_of_gender", "ssa_count", "peak_decade"]
"""Per first name, from the name bank's source data: P(White | name), P(Black | name) (voter files), the share of
its SSA births of its gender, its SSA births and the decade of most births."""


def name_probabilities(source: str = "paper", folder: str | Path | None = None) -> pd.DataFrame:
    """NAME_PROBABILITY_COLUMNS per (name, group) of `source`'s names: the name bank's own columns for "bank"
    (its name_bank.csv in `folder`, None: the bundled one), the bundled paper_name_probabilities.csv for "paper"."""
    path = _names_file(folder, source) if source == "bank" else PROMPTS_DIR / PAPER_PROBABILITIES_FILE
    return pd.read_csv(path)[["name", "group", *NAME_PROBABILITY_COLUMNS]]


def _check_template(path: Path, where: str, template: str, allowed: tuple[str, ...] = PLACEHOLDERS) -> None:
    """A template must contain {name} exactly once (localisation aligns the text after the name) and no
    placeholder outside `allowed`; `where` names the template's field."""
    try:
        found = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise PromptDataError(f"{path}: {where} is not a valid format string: {exc}") from exc
    if "name" not in found:
        raise PromptDataError(f"{path}: {where} has no {{name}} placeholder")
    if found.count("name") > 1:
        raise PromptDataError(f"{path}: {where} has {{name}} {found.count('name')} times; it must occur once")
    unknown = sorted(set(found) - set(allowed))
    if unknown:
        raise PromptDataError(f"{path}: {where} has unknown placeholder(s) {unknown}; allowed: {list(allowed)}")


def _context(path: Path, key: str, table: dict) -> Context:
    """One validated [contexts.KEY] table."""
    where = f"contexts.{key}"
    template = _field(path, table, where, "template", str)
    _check_template(path, f"{where}.template", template)
    return Context(
        key=key,
        description=_field(path, table, where, "description", str),
        template=template,
        variations=_strings(path, table, where, "variations"),
        answer_type=_choice(path, table, where, "answer_type", ANSWER_TYPES),
        answer_prefix=_field(path, table, where, "answer_prefix", str),
    )


def load_contexts(path: str | Path | None = None) -> dict[str, Context]:
    """The contexts by key, in file order."""
    path = Path(path or CONTEXTS_PATH)
    tables = _tables(path, _read_toml(path), "contexts")
    return {key: _context(path, key, table) for key, table in tables.items()}


def _scenario_contexts(path: Path, scenario: str, table: dict) -> dict[str, Context]:
    """The three contexts "SCENARIO:LEVEL" of one validated [scenarios.SCENARIO] table."""
    where = f"scenarios.{scenario}"
    answer_type = _choice(path, table, where, "answer_type", ANSWER_TYPES)
    answer_prefix = _field(path, table, where, "answer_prefix", str)
    description = _field(path, table, where, "description", str)
    templates = _field(path, table, where, "templates", dict)
    variations = _field(path, table, where, "variations", dict)
    if not variations:
        raise PromptDataError(f"{path}: {where}.variations has no entries")
    details: dict[str, dict[str, str]] = {"high": {}, "numeric": {}}  # level -> variation -> {detail}
    for variation, texts in variations.items():
        if not isinstance(texts, dict):
            raise PromptDataError(f"{path}: {where}.variations.{variation} must be a table")
        high, numeric = (_field(path, texts, f"{where}.variations.{variation}", level, str).strip()
                         for level in ("high", "numeric"))
        details["high"][variation], details["numeric"][variation] = high, f"{high} {numeric}"
    contexts = {}
    for level in LEVELS:
        template = _field(path, templates, f"{where}.templates", level, str)
        _check_template(path, f"{where}.templates.{level}", template, PLACEHOLDERS + ("detail",))
        if ("{detail}" in template) != (level != "low"):
            rule = "must not contain" if level == "low" else "must contain"
            raise PromptDataError(f"{path}: {where}.templates.{level} {rule} {{detail}}")
        key = f"{scenario}:{level}"
        contexts[key] = Context(
            key=key, description=f"{description} ({level} detail)", template=template,
            variations=tuple(variations), answer_type=answer_type, answer_prefix=answer_prefix,
            details=details.get(level, {}),
        )
    return contexts


def load_scenario_contexts(path: str | Path | None = None) -> dict[str, Context]:
    """The 2024 audit's scenarios as contexts "SCENARIO:LEVEL" (LEVELS of each scenario, in file order)."""
    path = Path(path or SCENARIOS_PATH)
    contexts = {}
    for scenario, table in _tables(path, _read_toml(path), "scenarios").items():
        contexts.update(_scenario_contexts(path, scenario, table))
    return contexts


def known_contexts(folder: str | Path | None = None) -> dict[str, Context]:
    """Every context `PromptSet.build` knows in a prompts folder (None: the bundled one): the pruning study's
    (contexts.toml), then the scenarios' (scenarios.toml)."""
    contexts_path = prompt_file(folder, CONTEXTS_FILE)
    study = load_contexts(contexts_path)
    scenarios = load_scenario_contexts(prompt_file(folder, SCENARIOS_FILE))
    clash = sorted(set(study) & set(scenarios))
    if clash:
        raise PromptDataError(f"{contexts_path}: context(s) {clash} are also scenario contexts")
    return study | scenarios


def load_instruction_suffix(path: str | Path | None = None) -> str:
    """The 2024 audit's instruction ("Reply only with the number ..."), stored once in the contexts file."""
    path = Path(path or CONTEXTS_PATH)
    return _field(path, _read_toml(path), "the file", "instruction_suffix", str)


def load_variation_sets(path: str | Path | None = None) -> dict[str, VariationSet]:
    """Alternative variation lists ([variation_sets.KEY]), e.g. the 18 purchase items with 6 held out."""
    path = Path(path or CONTEXTS_PATH)
    data = _read_toml(path)
    contexts = _tables(path, data, "contexts")
    sets = {}
    for key, table in _tables(path, data, "variation_sets").items():
        where = f"variation_sets.{key}"
        variations = _strings(path, table, where, "variations")
        held_out = _strings(path, table, where, "held_out")
        unknown = [v for v in held_out if v not in variations]
        if unknown:
            raise PromptDataError(f"{path}: {where}.held_out has items not in variations: {unknown}")
        sets[key] = VariationSet(key, _choice(path, table, where, "context", tuple(contexts)), variations, held_out)
    return sets


def article(variation: str) -> str:
    """The indefinite article for a variation: "an air conditioner", "a car"."""
    return "an" if variation[:1].lower() in "aeiou" else "a"


def make_prompt(context: Context, variation: str, entry: NameEntry, suffix: str | None = None) -> Prompt:
    """Fill a context's template; `suffix` (the audit instruction) is appended after a space."""
    if context.details and variation not in context.details:
        raise PromptDataError(f"context {context.key!r} has no detail text for variation {variation!r}; "
                         f"known: {list(context.details)}")
    detail = context.details.get(variation, "")
    text = context.template.format(name=entry.name, variation=variation, article=article(variation), detail=detail)
    if suffix:
        text = f"{text} {suffix}"
    return Prompt(
        context.key, variation, entry.name, entry.group, entry.race, entry.gender,
        text, context.answer_type, context.answer_prefix,
    )


def _select_names(names: Iterable[NameEntry | str] | None, folder: str | Path | None) -> list[NameEntry]:
    """NameEntry objects as given; strings looked up among the first and full names of the prompts folder's
    names file and, where the folder has one, the names of its name bank."""
    path = prompt_file(folder, NAMES_FILE)
    if names is None:
        return load_names(path)
    bank = Path(folder or PROMPTS_DIR) / NAME_BANK_FILE
    files = [path, bank] if bank.is_file() else [path]
    known = {e.name: e for e in load_names(bank, source="bank")} if bank.is_file() else {}
    known |= {e.name: e for e in load_names(path) + load_names(path, full_names=True)}
    selected = []
    for name in names:
        if isinstance(name, NameEntry):
            selected.append(name)
        elif name in known:
            selected.append(known[name])
        else:
            raise PromptDataError(f"unknown name {name!r}: not in {' nor in '.join(map(str, files))}")
    return selected


def _cell(row: dict, column: str) -> str:
    """A stripped CSV cell; a missing cell reads as empty."""
    return (row.get(column) or "").strip()


def _audit_prompt(path: Path, line: int, row: dict, scenarios: dict[str, Context]) -> Prompt:
    """One row of the 2024 audit's prompt table; `scenarios` are the contexts "SCENARIO:LEVEL"."""
    where = f"{path}: line {line}"
    group = _cell(row, "name_group")
    if group not in AUDIT_GROUPS:
        raise PromptDataError(
            f"{where}, column name_group: unknown group {group!r}; expected one of {list(AUDIT_GROUPS)}"
        )
    scenario = _cell(row, "scenario").lower().replace("_", " ")
    known = list(dict.fromkeys(key.rsplit(":", 1)[0] for key in scenarios))
    if scenario not in known:
        raise PromptDataError(f"{where}, column scenario: unknown scenario {scenario!r}; expected one of {known}")
    text, name = _cell(row, "prompt_text"), _cell(row, "name")
    if not text:
        raise PromptDataError(f"{where}, column prompt_text: empty prompt text")
    if not name or name not in text:
        raise PromptDataError(f"{where}, column name: name {name!r} does not occur in prompt_text")
    level = _cell(row, "context_level").lower()
    if level not in LEVELS:
        raise PromptDataError(f"{where}, column context_level: unknown level {level!r}; expected one of {LEVELS}")
    race, gender = AUDIT_GROUPS[group]
    context = scenarios[f"{scenario}:{level}"]
    return Prompt(context.key, _cell(row, "variation"), name, group, race, gender, text, context.answer_type,
                  context.answer_prefix)


def _as_set(values: str | Iterable[str] | None) -> set[str] | None:
    """A filter argument as a set; a single string is one value."""
    if values is None:
        return None
    return {values} if isinstance(values, str) else set(values)


class PromptSet:
    """An ordered list of prompts with the study's selections and White/Black pairing."""

    def __init__(self, prompts: Iterable[Prompt]):
        self.prompts = list(prompts)

    @classmethod
    def build(
        cls,
        contexts: list[str],
        names: Iterable[NameEntry | str] | None = None,
        variations: dict[str, list[str]] | None = None,
        instruction_suffix: bool = True,
        folder: str | Path | None = None,
    ) -> PromptSet:
        """Every context x variation x name; `variations` overrides a context's variation list.

        Contexts are those of `known_contexts`: the study's ("purchase") and the scenarios' ("purchase:low"), from
        the prompts folder `folder` (None: the bundled `prompts/`).
        """
        table = known_contexts(folder)
        entries = _select_names(names, folder)
        suffix = load_instruction_suffix(prompt_file(folder, CONTEXTS_FILE)) if instruction_suffix else None
        prompts = []
        for key in [contexts] if isinstance(contexts, str) else contexts:
            if key not in table:
                raise PromptDataError(f"unknown context {key!r}; known: {list(table)}")
            for variation in (variations or {}).get(key, table[key].variations):
                prompts += [make_prompt(table[key], variation, entry, suffix) for entry in entries]
        return cls(prompts)

    @classmethod
    def from_audit_csv(cls, path: str | Path, folder: str | Path | None = None) -> PromptSet:
        """Import the 2024 audit's prompt table as contexts "scenario:context_level" (answer type and prefix from
        the prompts folder's scenarios file), the variation as written."""
        path = Path(path)
        scenarios = load_scenario_contexts(prompt_file(folder, SCENARIOS_FILE))
        prompts = []
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise PromptDataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                                  "save the CSV as UTF-8") from error
        with io.StringIO(text, newline="") as file:
            reader = csv.DictReader(file)
            missing = [c for c in AUDIT_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PromptDataError(f"{path}: line 1 (header): missing column(s) {missing}")
            line = reader.line_num
            for row in reader:
                prompts.append(_audit_prompt(path, line + 1, row, scenarios))
                line = reader.line_num
        empty = [g for g in AUDIT_GROUPS if not any(p.group == g for p in prompts)]
        if empty:
            raise PromptDataError(f"{path}: column name_group has no rows for group(s) {empty}")
        return cls(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def filter(
        self,
        context: str | Iterable[str] | None = None,
        variations: str | Iterable[str] | None = None,
        names: str | Iterable[str] | None = None,
    ) -> PromptSet:
        """The prompts matching every given selection (a string or a list of strings each)."""
        selections = [("context", _as_set(context)), ("variation", _as_set(variations)), ("name", _as_set(names))]
        return PromptSet(
            p for p in self.prompts if all(keep is None or getattr(p, attr) in keep for attr, keep in selections)
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt, one column per Prompt field."""
        return pd.DataFrame([asdict(p) for p in self.prompts], columns=[f.name for f in fields(Prompt)])

    def contexts(self) -> list[str]:
        """The contexts in order of first appearance."""
        return list(dict.fromkeys(p.context for p in self.prompts))

    def variations(self, context: str) -> list[str]:
        """A context's variations in order of first appearance."""
        return list(dict.fromkeys(p.variation for p in self.prompts if p.context == context))

    def pairs(self) -> list[tuple[Prompt, Prompt]]:
        """(White, Black) prompts with the same context, variation and gender: the i-th with the i-th."""
        cells: dict[tuple[str, str, str], dict[str, list[Prompt]]] = {}
        for p in self.prompts:
            cells.setdefault((p.context, p.variation, p.gender), {race: [] for race in RACES})[p.race].append(p)
        pairs = []
        for (context, variation, gender), by_race in cells.items():
            white, black = by_race["white"], by_race["black"]
            if len(white) != len(black):
                raise PromptDataError(
                    f"cannot pair {context}/{variation}/{gender}: {len(white)} White and {len(black)} Black prompts"
                )
            pairs += zip(white, black)
        return pairs


def describe(prompt: Prompt) -> str:
    """A short label for messages: context/variation/name."""
    return f"{prompt.context}/{prompt.variation}/{prompt.name}"


def frame(prompt: Prompt, tokenizer, system_prompt: str | None = None) -> str:
    """The full text: chat template with generation prompt, or "Question: ...\\nAnswer: " after one BOS."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": prompt.text})
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chat + prompt.answer_prefix
    text = f"Question: {prompt.text}\nAnswer: {prompt.answer_prefix}"
    if system_prompt is not None:
        text = f"{system_prompt}\n\n{text}"
    bos = tokenizer.bos_token
    return bos + text if bos and not text.startswith(bos) else text


def _name_start(prompt: Prompt, text: str) -> int:
    """Character index of the name inside the user message within the rendered text."""
    user = text.rfind(prompt.text)
    if user < 0:
        raise PromptDataError(f"prompt {describe(prompt)}: the rendered text does not contain the user message verbatim")
    match = re.search(rf"(?<!\w){re.escape(prompt.name)}(?!\w)", prompt.text)
    if match is None:
        raise PromptDataError(f"prompt {describe(prompt)}: the name does not occur in the user message")
    return user + match.start()


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) over the tokens whose character offsets overlap [start, end)."""
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not inside:
        raise PromptDataError(f"no token covers characters [{start}, {end})")
    return inside[0], inside[-1] + 1


def render(
    prompt: Prompt, tokenizer, system_prompt: str | None = None, max_length: int | None = None
) -> RenderedPrompt:
    """Tokenise a prompt for generation and locate its name; needs a fast tokenizer (offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("render needs a fast tokenizer: the name span comes from its offset mapping")
    text = frame(prompt, tokenizer, system_prompt)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    if max_length is not None and len(input_ids) > max_length:
        raise PromptDataError(f"prompt {describe(prompt)} has {len(input_ids)} tokens, more than max_length={max_length}")
    start = _name_start(prompt, text)
    span = _token_span(encoding["offset_mapping"], start, start + len(prompt.name))
    return RenderedPrompt(input_ids, text, span, len(input_ids))


def render_all(
    prompts: Iterable[Prompt], tokenizer, system_prompt: str | None = None, max_length: int | None = None
) -> list[RenderedPrompt]:
    """`render` for each prompt, in order."""
    return [render(p, tokenizer, system_prompt, max_length) for p in prompts]
