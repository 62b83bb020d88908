"""The prompts folder: the bundled top-level prompts/, shipped as package data, and a user's own folder."""

import shutil
import tomllib
from pathlib import Path

import pytest

from workbench.config import ConfigError, load_config
from workbench.errors import PromptDataError
from workbench.pipeline.study import audit_prompts
from workbench.readout.prompts import PROMPTS_DIR, PromptSet, names_subset

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_prompts_are_the_top_level_folder_and_ship_as_package_data():
    assert PROMPTS_DIR == ROOT / "prompts"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["workbench.prompts"] == "prompts"
    assert "workbench.prompts" in setuptools["packages"]
    shipped = setuptools["package-data"]["workbench.prompts"]
    missing = [p.name for p in PROMPTS_DIR.iterdir()
               if p.is_file() and p.suffix != ".py" and f"*{p.suffix}" not in shipped]
    assert not missing, f"prompts/ files left out of the package data: {missing}"


@pytest.fixture
def my_prompts(tmp_path):
    """A copy of the bundled folder in which the first White man's name is Quentin."""
    folder = tmp_path / "my_prompts"
    shutil.copytree(PROMPTS_DIR, folder)
    names = folder / "names.toml"
    names.write_text(names.read_text().replace('names = ["Hunter"', 'names = ["Quentin"', 1))
    return folder


def test_a_user_folder_replaces_the_bundled_prompts(my_prompts, tmp_path, monkeypatch):
    assert names_subset(1, my_prompts)[0] == "Quentin"
    assert names_subset(1)[0] == "Hunter"
    monkeypatch.chdir(tmp_path)
    config_path = tmp_path / "study.toml"
    config_path.write_text('[prompts]\nfolder = "my_prompts"\n[audit]\ncontexts = ["purchase"]\nnames_per_group = 1\n')
    config = load_config(config_path)
    assert {p.name for p in audit_prompts(config)} == {"Quentin", "Katelyn", "DaShawn", "Tanisha"}


def test_a_folder_without_a_file_names_the_file(my_prompts, tmp_path):
    (my_prompts / "scenarios.toml").unlink()
    with pytest.raises(PromptDataError, match=r"my_prompts/scenarios.toml: no such file; a prompts folder holds"):
        PromptSet.build(["purchase"], folder=my_prompts)
    config_path = tmp_path / "study.toml"
    config_path.write_text(f'[prompts]\nfolder = "{my_prompts}"\n')
    with pytest.raises(ConfigError, match=r"\[prompts\]: .*scenarios.toml: no such file"):
        load_config(config_path)
    config_path.write_text('[prompts]\nfolder = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"\[prompts\]: field 'folder': no folder 'nowhere'"):
        load_config(config_path)
