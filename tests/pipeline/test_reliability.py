"""Issue #7: a run never fails obscurely, never loses results, and gives the same numbers on a rerun.

Bad input (data files, config, model files), model answers the statistics must survive, the number parser
under fuzzing, interruption and resume of a stage, determinism, and safe files. Cases already covered by
test_prompts / test_models / test_stats / test_parsing / test_plan are not repeated here; the CLI's messages
are in test_cli. Only the tiny random Llama is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, strategies as st

import workbench
from workbench.audit.stats import bias_table, context_summary, signed_reduction
from workbench.audit.table import answers_frame, run_audit
from workbench.components import Component, mean_activations
from workbench.config import ConfigError, StudyConfig, load_config
from workbench.loaded import model_info
from workbench.models import ModelError, load_hf, weight_hash
from workbench import files
from workbench.pipeline import runstore, study
from workbench.pipeline.runstore import RunDir
from workbench.prune.plan import PruningPlan, hooks_for, model_hash, pruned_weights
from workbench.readout.engine import samples_to_distribution
from workbench.readout.parsing import STATUSES, parse_number
from workbench.readout.prompts import (
    AUDIT_COLUMNS,
    CONTEXTS_PATH,
    NAMES_PATH,
    PromptDataError,
    PromptSet,
    load_contexts,
    load_names,
)
from workbench.testing.tiny import tiny_llama

PACKAGE = Path(workbench.__file__).parent
TABLES = ["answers", "bias", "context_summary", "group_means"]


@pytest.fixture(scope="module")
def bridge(make_tiny_bridge):
    return make_tiny_bridge()


@pytest.fixture(scope="module")
def prompts():
    """One purchase variation, one name per race x gender group: four prompts, one batch."""
    return PromptSet.build(["purchase"], names=["Hunter", "Katelyn", "DaShawn", "Tanisha"],
                           variations={"purchase": ["car"]})


def fast_config(**audit) -> StudyConfig:
    config = StudyConfig(seed=5)
    config.readout.max_tokens = 2
    config.audit = dataclasses.replace(config.audit, n_boot=30, **audit)
    return config


def tables(run: RunDir) -> dict[str, pd.DataFrame]:
    return {name: run.read_table(f"tables/{name}.parquet") for name in TABLES}


def assert_same_tables(first: dict[str, pd.DataFrame], second: dict[str, pd.DataFrame]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name], check_exact=True, obj=name)


@pytest.fixture(scope="module")
def baseline(bridge, prompts, tmp_path_factory):
    """An uninterrupted audit stage: the reference every interrupted-and-resumed run must reproduce."""
    run = RunDir(tmp_path_factory.mktemp("baseline"))
    study.audit_stage(run, fast_config(), bridge, prompts)
    return run, tables(run)


# ============================================================================================ bad input




@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("from {name}.", "from {name.", "contexts.purchase.template is not a valid format string"),
        ("from {name}.", "from {name} for {}.", "contexts.purchase.template has unknown placeholder(s) ['']"),
        ("from {name}.", "from {{name}}.", "contexts.purchase.template has no {name} placeholder"),
        ("from {name}.", "from {name.upper}.", "contexts.purchase.template has no {name} placeholder"),
        ('answer_prefix = "$"', "answer_prefix = 1", "contexts.purchase.answer_prefix must be a str, got 1"),
    ],
)
def test_template_errors_name_file_and_field(tmp_path, old, new, expected, write_variant):
    path = write_variant(CONTEXTS_PATH, old, new, "contexts.toml")
    with pytest.raises(PromptDataError) as info:
        load_contexts(path)
    assert str(path) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[groups]\n", "[groups] has no entries"),
        ('[groups.white_men]\nrace = "white"\ngender = "man"\nnames = ["Hunter", "  "]\n',
         "groups.white_men.names must hold non-empty strings"),
        ('[groups.white_men]\nrace = "white"\ngender = "man"\nnames = "Hunter"\n',
         "groups.white_men.names must be a list, got 'Hunter'"),
        ('[groups.white_men]\nrace = "white"\ngender = "man"\n', "groups.white_men is missing field 'names'"),
        ('groups = 3\n', "the file.groups must be a dict, got 3"),
        ('[groups]\nwhite_men = "x"\n', "groups.white_men must be a table"),
    ],
)
def test_names_file_errors(tmp_path, text, expected):
    path = tmp_path / "names.toml"
    path.write_text(text)
    with pytest.raises(PromptDataError) as info:
        load_names(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_name_in_two_groups_of_the_full_names(tmp_path, write_variant):
    path = write_variant(NAMES_PATH, '"Jake Becker"', '"Jamal Washington"', "names.toml")
    with pytest.raises(PromptDataError, match=r"names.toml: groups.black_men.full_names: duplicate name "
                                              r"'Jamal Washington' \(also in groups.white_men\)"):
        load_names(path, full_names=True)


def write_csv(path, rows, columns=AUDIT_COLUMNS):
    import csv

    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


ROWS = [
    ("purchase", "bike", "white_men", "Hunter Becker", "low", "Buy a bike from Hunter Becker."),
    ("purchase", "bike", "white_women", "Amy Becker", "low", "Buy a bike from Amy Becker."),
    ("purchase", "bike", "black_men", "Jamal Washington", "low", "Buy a bike from Jamal Washington."),
    ("purchase", "bike", "black_women", "Ebony Washington", "low", "Buy a bike from Ebony Washington."),
]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([], "line 1 (header): missing column(s) ['scenario', 'variation', 'name_group', 'name', "),
        (ROWS[:3] + [ROWS[3][:3]], "line 5, column prompt_text: empty prompt text"),  # a short row
        (ROWS[:1] + [ROWS[1][:3] + ("Zoe Becker",) + ROWS[1][4:]] + ROWS[2:],
         "line 3, column name: name 'Zoe Becker' does not occur in prompt_text"),
        ([("gardening",) + ROWS[0][1:]] + ROWS[1:], "line 2, column scenario: unknown scenario 'gardening'"),
        ([ROWS[0][:2] + ("",) + ROWS[0][3:]] + ROWS[1:], "line 2, column name_group: unknown group ''"),
    ],
)
def test_audit_csv_errors_name_the_line(tmp_path, rows, expected):
    path = tmp_path / "prompts.csv"
    if rows:
        write_csv(path, rows)
    else:
        path.write_text("")  # an empty file
    with pytest.raises(PromptDataError) as info:
        PromptSet.from_audit_csv(path)
    assert str(path) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[generalize]\nsweep_fractions = [0.1, 'x']\n",
         "[generalize]: field 'sweep_fractions' must be float, got str 'x'"),
        ("[localize]\nmethods = 'wanda'\n", "[localize]: field 'methods' must be a list of str, got 'wanda'"),
        ("[audit]\nn_boot = 10.5\n", "[audit]: field 'n_boot' must be int, got float 10.5"),
        ("[readout.extra]\nx = 1\n", "[readout]: unknown key(s) ['extra']"),
        ("model = 'x'\nmodel = 'y'\n", "malformed TOML"),
        ("backend = 'vllm'\n", "field 'backend' has 'vllm'; allowed: ['bridge', 'nnsight']"),
        ("remote = true\n", "field 'remote' = True needs backend = 'nnsight'"),
        ("backend = 'nnsight'\nremote = 'yes'\n", "field 'remote' has 'yes'; allowed: false, true, 'local'"),
        ("device_map = 'everywhere'\n", "field 'device_map' has 'everywhere'"),
        ("device_map = 3\n", "field 'device_map' must be str or dict, got int 3"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, text, expected):
    path = tmp_path / "study.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_config_int_for_float_is_accepted_and_defaults_kept(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text("[readout]\nthreshold = 1\n")
    config = load_config(path)
    assert config.readout.threshold == 1.0 and isinstance(config.readout.threshold, float)
    assert config.audit == StudyConfig().audit


@pytest.mark.parametrize(
    "text, field",
    [
        ("[audit]\nscale = 'sqrt'\n", "scale"),
        ("[audit]\nmethod = 'median'\n", "method"),
        ("[audit]\nn_boot = -1\n", "n_boot"),
        ("[audit]\nnames_per_group = 0\n", "names_per_group"),
        ("[readout]\nbatch_size = 0\n", "batch_size"),
        ("[readout]\nmax_tokens = 0\n", "max_tokens"),
        ("[localize]\nmethods = ['magic']\n", "methods"),
        ("[generalize]\nablation = 'blur'\n", "ablation"),
        ("[generalize]\nregimes = ['everything']\n", "regimes"),
        ("dtype = 'float16'\n", "dtype"),
        ("device = 'gpu'\n", "device"),
    ],
)
def test_config_values_out_of_range_are_rejected_at_load(tmp_path, text, field):
    path = tmp_path / "study.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}.*'{field}'"):
        load_config(path)


def test_config_scenario_contexts_and_prompts_csv(tmp_path):
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text("scenario,variation,name_group,name,context_level,prompt_text\n")
    path = tmp_path / "study.toml"
    path.write_text(f"[audit]\ncontexts = ['purchase:low', 'public office:numeric']\nprompts_csv = '{csv_path}'\n"
                    "variations = {'purchase:low' = ['car']}\n")
    config = load_config(path)
    assert config.audit.contexts == ["purchase:low", "public office:numeric"]
    assert config.audit.prompts_csv == str(csv_path) and StudyConfig().audit.prompts_csv == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[audit]\ncontexts = ['purchase:medium']\n",
         "[audit]: field 'contexts': unknown context 'purchase:medium'; known: ['purchase'"),
        ("[audit]\nprompts_csv = 'no/such/prompts.csv'\n",
         "[audit]: field 'prompts_csv': no file 'no/such/prompts.csv'"),
        ("[audit]\nprompts_csv = 3\n", "[audit]: field 'prompts_csv' must be str, got int 3"),
    ],
)
def test_config_rejects_unknown_context_and_missing_prompts_csv(tmp_path, text, expected):
    path = tmp_path / "study.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_prompt_longer_than_the_context_window_names_the_prompt(prompts, make_tiny_bridge):
    short = make_tiny_bridge(name="tiny-short", max_position_embeddings=40)
    with pytest.raises(ValueError, match=r"prompt purchase/car/Hunter has \d+ tokens, more than max_length=40"):
        run_audit(short, prompts, progress=False)


def test_pickled_weights_are_refused(tmp_path):
    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "model" / "pytorch_model.bin")  # a pickle, as old checkpoints are
    with pytest.raises(ModelError, match="safetensors"):
        load_hf(str(tmp_path / "model"), device="cpu")


# ============================================================================================ model answers


def crafted_answers(prompts: PromptSet, texts_by_name: dict[str, list[str]]) -> pd.DataFrame:
    """The audit table from sampled answer texts (as `--readout sample` builds it)."""
    return answers_frame(prompts, [samples_to_distribution(texts_by_name[p.name]) for p in prompts])


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_odd_answers_are_recorded_and_reported(prompts, tmp_path):
    texts = {
        "Hunter": ["no idea", "", "NaN", "$" + "9" * 400, "20"],  # non-numeric, empty, NaN, huge (inf), one valid
        "Katelyn": ["5", "7", "3"],
        "DaShawn": ["1,000", "3k", "2.5 million", "about 3k"],  # the number must start the reply
        "Tanisha": ["inf", "twelve", "   "],  # all invalid
    }
    answers = crafted_answers(prompts, texts)
    hunter = answers.set_index("name").loc["Hunter"]
    assert hunter.invalid_mass == pytest.approx(0.8) and hunter.valid_mass == pytest.approx(0.2)
    assert list(hunter["values"]) == [20.0]
    assert list(answers.set_index("name").loc["Katelyn", "values"]) == [3.0, 5.0, 7.0]
    dashawn = answers.set_index("name").loc["DaShawn"]
    assert list(dashawn["values"]) == [1000.0, 3000.0, 2.5e6] and dashawn.invalid_mass == pytest.approx(0.25)
    tanisha = answers.set_index("name").loc["Tanisha"]
    assert tanisha.valid_mass == 0 and math.isnan(tanisha.expected) and math.isnan(tanisha.log_expected)

    run = RunDir(tmp_path / "run")
    config = fast_config()
    study.write_bias_tables(run, config, answers)
    run.write_table("tables/answers.parquet", answers)
    bias = run.read_table("tables/bias.parquet").iloc[0]
    # Tanisha has no valid answer, Hunter's valid mass 0.2 is below min_valid_mass 0.5: both excluded, counted
    assert (bias.n_white, bias.n_black, bias.n_invalid) == (1, 1, 2)
    assert np.isfinite(bias.smd) and bias.note == "excluded (valid mass < 0.5): Hunter, Tanisha"
    text = study.audit_summary_text(run)
    assert "n_invalid" in text and "purchase" in text and "p_adjusted" in text


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_all_answers_invalid_through_the_audit_tables(prompts, tmp_path):
    answers = crafted_answers(prompts, {p.name: ["no idea", "", "nan"] for p in prompts})
    assert (answers.valid_mass == 0).all() and answers.expected.isna().all()
    run = RunDir(tmp_path / "run")
    for method in ("mixture", "pooled_winsorized"):
        config = fast_config(method=method)
        study.write_bias_tables(run, config, answers)
        bias = run.read_table("tables/bias.parquet").iloc[0]
        excluded = "excluded (valid mass < 0.5): Hunter, Katelyn, DaShawn, Tanisha"
        assert math.isnan(bias.smd) and bias.note == f"no valid answers; {excluded}" and bias.n_invalid == 4
        assert math.isnan(bias.ci_low) and math.isnan(bias.ci_high) and pd.isna(bias.p_mwu)
        summary = run.read_table("tables/context_summary.parquet").iloc[0]
        assert math.isnan(summary.mean_abs_smd) and summary.n_used == 0
        means = run.read_table("tables/group_means.parquet")
        assert means["mean"].isna().all() and (means.n_names == 0).all()
    assert "no valid answers" not in study.audit_summary_text(run)  # the text shows the numbers: NaN
    assert "NaN" in study.audit_summary_text(run)
    reduction = signed_reduction(answers, answers, n_boot=20).iloc[0]
    assert math.isnan(reduction.reduction_pct) and math.isnan(reduction.ci_low)


def test_all_invalid_bias_table_keeps_float_columns(prompts, tmp_path):
    answers = crafted_answers(prompts, {p.name: ["no idea"] for p in prompts})
    run = RunDir(tmp_path / "run")
    study.write_bias_tables(run, fast_config(), answers)
    for table in (bias_table(answers, n_boot=20), run.read_table("tables/bias.parquet")):
        assert table[["p_mwu", "wasserstein"]].dtypes.tolist() == [np.float64, np.float64]


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("method", ["mixture", "pooled_winsorized"])
def test_zero_variance_with_different_group_means(prompts, method):
    """Every White name answers 5, every Black name 7: a mean difference but no spread, so no SMD."""
    answers = crafted_answers(prompts, {p.name: ["5"] if p.race == "white" else ["7"] for p in prompts})
    bias = bias_table(answers, method=method, n_boot=50).iloc[0]
    assert math.isnan(bias.smd) and bias.note == "zero variance"
    assert (bias.mean_white, bias.mean_black) == (5.0, 7.0)
    assert context_summary(answers, method=method, n_boot=50).n_used.iloc[0] == 0
    reduction = signed_reduction(answers, answers, method=method, n_boot=50).iloc[0]
    assert math.isnan(reduction.bias_before) and math.isnan(reduction.reduction_pct)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_zero_variance_in_one_group_only(prompts):
    texts = {p.name: ["5"] if p.race == "white" else ["6", "8"] for p in prompts}
    bias = bias_table(crafted_answers(prompts, texts), n_boot=50).iloc[0]
    assert bias.smd == pytest.approx((5 - 7) / math.sqrt((0 + 1) / 2)) and bias.note == ""


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_huge_answers_on_log_scale(prompts):
    texts = {p.name: ["1" + "0" * 300, "2"] if p.race == "white" else ["3", "4"] for p in prompts}
    bias = bias_table(crafted_answers(prompts, texts), scale="log", n_boot=50).iloc[0]
    assert np.isfinite(bias.smd) and bias.note == ""


def test_huge_answers_on_raw_scale_are_handled_explicitly(prompts):
    texts = {p.name: ["1" + "0" * 200, "2"] if p.race == "white" else ["3", "4"] for p in prompts}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        bias = bias_table(crafted_answers(prompts, texts), scale="raw", n_boot=50).iloc[0]
    assert np.isfinite(bias.smd) or bias.note not in ("", "zero variance")


# ============================================================================================ the parser, fuzzed

NUMBERISH = st.text(alphabet="0123456789,.-+$kKmMbBnN \u2212eE%tT", max_size=30)


@given(NUMBERISH)
def test_parser_never_raises_on_number_like_text(text):
    parsed = parse_number(text)
    assert parsed.status in STATUSES
    assert (parsed.value is None) == (parsed.status != "ok")
    assert parsed.value is None or math.isfinite(parsed.value)


WORDS = st.text(alphabet=string.ascii_letters + " ", max_size=20).filter(
    lambda t: not re.search(r"\b(nan|inf)", t, re.IGNORECASE))
SUFFIXES = st.sampled_from(["", ".", " for it.", " dollars", " USD, final offer", "\nThanks!"])
finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(WORDS, finite, SUFFIXES)
def test_round_trip_inside_a_sentence(prefix, x, suffix):
    text = f"{prefix} ${x:,.2f}{suffix}"
    assert parse_number(text).value == pytest.approx(round(x, 2), abs=1e-9)


@given(st.integers(min_value=-10**6, max_value=10**6), st.sampled_from(["thousand", "million", "billion", "k", "bn"]))
def test_round_trip_multipliers(n, word):
    factor = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "k": 1e3, "bn": 1e9}[word]
    spaced = " " if len(word) > 2 else ""
    assert parse_number(f"{n}{spaced}{word}").value == pytest.approx(n * factor)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_str_of_any_float_parses_or_reports(x):
    """Python's own spelling of a float ('nan', 'inf', '1e+300', '-0.0'): never an exception, never a NaN value."""
    parsed = parse_number(str(x))
    if not math.isfinite(x):
        assert parsed.status == "not_finite"
    else:
        assert parsed.status == "ok" and math.isfinite(parsed.value)
        if "e" not in str(x):
            assert parsed.value == x


# ============================================================================================ interruption


class Killed(BaseException):
    """Stands for SIGKILL / Ctrl-C: not an Exception, so no `except Exception` in the library catches it."""


def kill_before_rename(monkeypatch, target_name: str) -> None:
    """Make the atomic rename of `target_name` die after half of its temporary file was written."""
    real_replace = files.os.replace

    def replace(source, target):
        if Path(target).name == target_name:
            data = Path(source).read_bytes()
            Path(source).write_bytes(data[: len(data) // 2])
            raise Killed(target_name)
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)


@pytest.mark.parametrize("kill_at", ["bias.parquet", "answers.parquet", "audit_summary.json", "audit.json"])
def test_killed_stage_resumes_to_identical_tables(bridge, prompts, baseline, tmp_path, monkeypatch, kill_at):
    run = RunDir(tmp_path / "run")
    with monkeypatch.context() as patch:
        kill_before_rename(patch, kill_at)
        with pytest.raises(Killed):
            study.audit_stage(run, fast_config(), bridge, prompts)
    assert not run.path("stages/audit.json").exists()  # the stage is not marked done
    assert not (run.root / "tables" / kill_at).exists() and not (run.root / kill_at).exists()
    for table in (run.root / "tables").glob("*.parquet"):  # what was renamed into place is whole
        pd.read_parquet(table)
    # whatever temporaries a real kill leaves behind are never read
    (run.root / "tables" / "stray.tmp").write_bytes(b"PAR1 half a table")
    calls = []
    real_cached = runstore.RunDir.cached

    def spy(self, stage, inputs, outputs, compute, **kwargs):
        return calls.append(stage) or real_cached(self, stage, inputs, outputs, compute, **kwargs)

    monkeypatch.setattr(runstore.RunDir, "cached", spy)
    answers = study.audit_stage(run, fast_config(), bridge, prompts).answers
    assert calls == ["readout", "audit"]
    assert_same_tables(tables(run), baseline[1])
    pd.testing.assert_frame_equal(answers, baseline[1]["answers"], check_exact=True)
    assert run.read_json("stages/audit.json") == baseline[0].read_json("stages/audit.json")


def test_finished_stage_is_reused_not_recomputed(bridge, prompts, baseline, monkeypatch):
    run, expected = baseline
    monkeypatch.setattr(study, "run_audit", lambda *a, **k: pytest.fail("a finished stage was recomputed"))
    study.audit_stage(run, fast_config(), bridge, prompts)
    assert_same_tables(tables(run), expected)


def test_stage_with_a_missing_output_is_recomputed(bridge, prompts, baseline, tmp_path):
    run = RunDir(tmp_path / "run")
    study.audit_stage(run, fast_config(), bridge, prompts)
    run.path("tables/group_means.parquet").unlink()
    study.audit_stage(run, fast_config(), bridge, prompts)
    assert_same_tables(tables(run), baseline[1])


def test_killed_rerun_with_other_inputs_does_not_poison_the_first_inputs(bridge, prompts, baseline, tmp_path,
                                                                          monkeypatch):
    run = RunDir(tmp_path / "run")
    study.audit_stage(run, fast_config(), bridge, prompts)  # inputs X, finished
    with monkeypatch.context() as patch:
        kill_before_rename(patch, "bias.parquet")  # inputs Y (a new scale: the stored answers serve), killed
        with pytest.raises(Killed):
            study.audit_stage(run, fast_config(scale="raw"), bridge, prompts)
    study.audit_stage(run, fast_config(), bridge, prompts)  # inputs X again
    assert_same_tables(tables(run), baseline[1])


def test_a_recomputed_stage_recomputes_the_stages_after_it(tmp_path):
    """A stage that reads an earlier stage's outputs (`after`) is reused only while that stage's inputs are the
    same: when the audit is recomputed (new answers), attribution must not keep scores made from the old ones."""
    run, calls = RunDir(tmp_path / "run"), []

    def stage(name: str, inputs: dict, after: tuple[str, ...] = ()) -> bool:
        return run.cached(name, inputs, [f"{name}.txt"],
                          lambda: (calls.append(name), run.write_text(f"{name}.txt", name)), after=after)

    assert not stage("audit", {"format": 4}) and not stage("attribution", {"n_leaves": 10}, after=("audit",))
    assert stage("audit", {"format": 4}) and stage("attribution", {"n_leaves": 10}, after=("audit",))
    assert not stage("audit", {"format": 5})  # new answers
    assert not stage("attribution", {"n_leaves": 10}, after=("audit",))  # its own inputs are unchanged
    assert calls == ["audit", "attribution", "audit", "attribution"]
    with pytest.raises(runstore.RunDirError, match="stage 'localize' has not finished"):
        stage("generalize", {}, after=("localize",))


def test_failed_table_write_keeps_the_previous_table(tmp_path):
    run = RunDir(tmp_path)
    good = pd.DataFrame({"a": [1, 2]})
    run.write_table("tables/t.parquet", good)
    with pytest.raises(Exception):
        run.write_table("tables/t.parquet", pd.DataFrame({"a": [object()]}))  # not serialisable
    pd.testing.assert_frame_equal(run.read_table("tables/t.parquet"), good)
    assert not list((tmp_path / "tables").glob("*.tmp"))


# ============================================================================================ determinism


@pytest.mark.parametrize("readout", ["exact", "sample"])
def test_same_config_and_seed_give_identical_tables(prompts, tmp_path, readout, make_tiny_bridge, monkeypatch):
    monkeypatch.setenv("WORKBENCH_READOUT_CACHE", "off")  # both runs read the model
    results = []
    for attempt in range(2):
        torch.manual_seed(100 + attempt)  # the global RNG state must not matter
        np.random.seed(100 + attempt)
        run = RunDir(tmp_path / f"run{attempt}")
        study.audit_stage(run, fast_config(), make_tiny_bridge(), prompts, readout=readout, n_samples=6)
        results.append((run, tables(run)))
    assert_same_tables(results[0][1], results[1][1])
    summaries = [{k: v for k, v in run.read_json("audit_summary.json").items() if k != "seconds"}
                 for run, _ in results]
    assert summaries[0] == summaries[1]
    assert results[0][0].read_json("stages/audit.json") == results[1][0].read_json("stages/audit.json")


def test_a_different_seed_changes_the_random_parts_only(prompts, baseline, tmp_path, bridge):
    """The seed draws the bootstrap and the read-out's sampled completions; the exact part of every answer (what
    is tallied before any completion) and the answer table's layout stay the same."""
    run = RunDir(tmp_path / "run")
    config = fast_config()
    config.seed = 6
    study.audit_stage(run, config, bridge, prompts)
    answers, before = run.read_table("tables/answers.parquet"), baseline[1]["answers"]
    assert list(answers.columns) == list(before.columns) and len(answers) == len(before)
    exact = answers.completed_mass.to_numpy() == 0  # prompts whose answers needed no completion
    pd.testing.assert_frame_equal(answers[exact], before[exact], check_exact=True)
    assert not answers[~exact].log_expected.equals(before[~exact].log_expected)
    assert run.read_json("stages/audit.json") != baseline[0].read_json("stages/audit.json")


# ============================================================================================ safe files

UNSAFE = [
    (r"\b(import|from)\s+(c?pickle|dill|joblib|cloudpickle)\b|\bpickle\.\w", "pickle"),
    (r"read_pickle|to_pickle|allow_pickle\s*=\s*True", "pickle via numpy/pandas"),
    (r"torch\.save\(", "torch.save pickles"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
    (r"weights_only\s*=\s*False", "torch.load(weights_only=False)"),
]


def test_no_pickle_and_no_remote_code_in_the_package():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for pattern, why in UNSAFE:
            offences += [f"{path.relative_to(PACKAGE)}: {why}" for _ in re.finditer(pattern, text)]
        for call in re.finditer(r"torch\.load\(", text):
            closing = text[call.end(): text.find(")", call.end())]
            if "weights_only=True" not in closing:
                offences.append(f"{path.relative_to(PACKAGE)}: torch.load without weights_only=True")
    assert offences == []


def test_run_directory_holds_only_safe_formats(baseline):
    run, _ = baseline
    files = [p for p in run.root.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= {".parquet", ".json", ".safetensors", ".html", ".png", ".md"}
    json.loads((run.root / "audit_summary.json").read_text())


def test_trust_remote_code_is_off_by_default(tmp_path, monkeypatch):
    from workbench import models

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")  # loading is faked below; the file only has to exist
    seen = []
    model, tokenizer = tiny_llama()

    def fake(result):
        def from_pretrained(source, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return result
        return from_pretrained

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", fake(tokenizer))
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake(model))
    bridge = study.load_bridge(StudyConfig(model=str(model_dir)))
    assert seen == [False, False]
    assert model_info(bridge).name == str(model_dir)
    assert not any(f.name == "trust_remote_code" for f in dataclasses.fields(StudyConfig))


@pytest.mark.parametrize("relative", ["../x", "tables/../../x", "/tmp/elsewhere.parquet", "..", "a/../../../b"])
def test_run_dir_refuses_paths_outside(tmp_path, relative):
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="points outside the run directory"):
        run.path(relative)
    with pytest.raises(ValueError):
        run.write_json(relative, {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_run_dir_refuses_a_symlink_leading_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = RunDir(tmp_path / "run")
    (run.root / "tables").symlink_to(outside)
    with pytest.raises(ValueError, match="points outside the run directory"):
        run.write_table("tables/bias.parquet", pd.DataFrame({"a": [1]}))
    assert not list(outside.iterdir())


# ============================================================================================ pruning restores


def probe(bridge):
    tokenizer = model_info(bridge).tokenizer
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("I offer $120 to Jamal.")]])
    with torch.inference_mode():
        return bridge(ids)


COMPONENTS = [Component(0, "mlp_neuron", 3), Component(1, "mlp_neuron", 70), Component(1, "attn_head", 2)]


def plan(ablation="zero") -> PruningPlan:
    return PruningPlan(model="tiny", model_hash="x", components=COMPONENTS, method="test",
                       selection={"rule": "top_k", "k": 3}, ablation=ablation)


def test_hook_pruning_leaves_the_weight_checksum_unchanged(bridge):
    before_hash, before = model_hash(bridge), probe(bridge)
    with bridge.hooks(fwd_hooks=hooks_for(plan())):
        pruned = probe(bridge)
        assert model_hash(bridge) == before_hash
    assert not torch.equal(pruned, before)
    with pytest.raises(Killed):
        with bridge.hooks(fwd_hooks=hooks_for(plan())):
            raise Killed("inside the pruned block")
    assert model_hash(bridge) == before_hash
    assert torch.equal(probe(bridge), before)  # no hook is left behind


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_weight_edits_are_restored_after_an_exception(ablation, make_tiny_bridge):
    bridge = make_tiny_bridge()
    tokenizer = model_info(bridge).tokenizer
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("Hello, $5.")]])
    names = [f"blocks.{layer}.{hook}" for layer in range(2) for hook in ("mlp.hook_post", "attn.hook_z")]
    means = mean_activations(bridge, [(ids, torch.ones_like(ids))], names)
    before_hash, before_hf = model_hash(bridge), weight_hash(bridge.original_model)
    before = probe(bridge)
    with pytest.raises(Killed):
        with pruned_weights(bridge, plan(ablation), means):
            assert model_hash(bridge) != before_hash  # the edit is really in the weights
            raise Killed("inside the pruned block")
    assert model_hash(bridge) == before_hash
    assert weight_hash(bridge.original_model) == before_hf  # created biases removed again
    assert torch.equal(probe(bridge), before)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.readout.temperature == 0.6 and config.readout.top_p == 0.9  # the paper's sampler everywhere
    assert config.audit.names_per_group >= 8  # held-out halves of at least 4 names per group
