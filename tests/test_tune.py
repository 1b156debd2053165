"""`tune`: the grid, the validation split it scores on (never a test case), the choice, the folder and the CLI."""
from __future__ import annotations

import csv
import json

import pytest

from lifelong_nnunet import runner
from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.run_folder import RunFolder, TuneFolder
from lifelong_nnunet.tasks import load_task, make_test_split, scored_cases
from lifelong_nnunet.tuning import choose, grid_edge_warnings, parse_grid, score_settings, settings_of, tune


def test_grid_values_are_numbers_where_they_are_numbers():
    grid = parse_grid(["lambda=1e3,100", "online=true,false"])
    assert grid == {"lambda": [1000.0, 100], "online": [True, False]}
    assert isinstance(grid["lambda"][1], int)


@pytest.mark.parametrize("items, words", [
    (["lambda"], "NAME=V1,V2"), (["lambda="], "NAME=V1,V2"), (["lambda=1,1"], "twice"),
    (["lambda=1", "lambda=2"], "twice"), ([], "at least one"),
])
def test_bad_grids_are_refused(items, words):
    with pytest.raises(UserInputError, match=words):
        parse_grid(items)


def test_a_misspelt_parameter_is_refused_with_its_correction():
    with pytest.raises(UserInputError, match="Did you mean 'lambda'"):
        settings_of("ewc", {}, {"lamda": [1.0]})
    with pytest.raises(UserInputError, match="a number >= 0"):
        settings_of("ewc", {}, {"lambda": [-1.0]})
    with pytest.raises(UserInputError, match="no parameters to tune"):
        settings_of("sequential", {}, {"lambda": [1.0]})


def test_settings_are_the_grid_product_over_the_fixed_parameters_then_the_reference():
    settings = settings_of("ewc", {"fisher_batches": 2}, {"lambda": [10, 1e4], "online": [False, True]})
    assert [s.label for s in settings] == ["lambda=10,online=False", "lambda=10,online=True",
                                           "lambda=10000,online=False", "lambda=10000,online=True", "sequential"]
    assert settings[1].params == {"fisher_batches": 2, "lambda": 10, "online": True}
    assert settings[-1].is_reference and settings[-1].params == {}


def _scores(values: dict[str, tuple[float | None, float | None]]) -> list[dict]:
    """score_settings over hand-made summaries: label -> (final_average, mean_forgetting), one seed."""
    settings = settings_of("ewc", {}, {"lambda": [float(v) for v in values if v != "sequential"]})
    summaries = {}
    for s in settings:
        final, forgetting = values[s.label.split("=")[-1] if not s.is_reference else "sequential"]
        summaries[(s.label, 0)] = {"final_average": final, "mean_forgetting": forgetting, "plasticity": 0.8,
                                   "bwt": None if forgetting is None else -forgetting}
    return score_settings(settings, [0], summaries)[1]


def test_the_highest_final_average_wins_and_ties_go_to_less_forgetting():
    scores = _scores({"1": (0.50, 0.20), "10": (0.70, 0.10), "100": (0.70, 0.05), "sequential": (0.90, 0.30)})
    assert choose(scores) == "lambda=100"  # the reference is never chosen, however good
    assert [round(e["forgetting_cut"], 3) for e in scores] == [0.333, 0.667, 0.833, 0.0]
    assert choose(_scores({"1": (None, None), "sequential": (0.5, 0.1)})) is None


def test_a_choice_at_the_end_of_a_numeric_grid_is_flagged():
    assert grid_edge_warnings({"lambda": [1, 10, 100]}, {"lambda": 10}) == []
    [warning] = grid_edge_warnings({"lambda": [1, 10, 100], "online": [True, False]}, {"lambda": 100, "online": True})
    assert "lambda=100 is the largest value tried" in warning
    assert "smallest" in grid_edge_warnings({"lambda": [3, 1, 2]}, {"lambda": 1})[0]
    assert grid_edge_warnings({"lambda": [1, 10]}, {"lambda": 10}) == []  # two values: no range to be inside of


def test_no_forgetting_cut_when_the_reference_forgot_nothing():
    scores = _scores({"1": (0.5, -0.01), "sequential": (0.5, -0.02)})
    assert all(e["forgetting_cut"] is None for e in scores)


def test_validation_cases_are_carved_from_the_training_split_and_test_cases_vanish(raw_sites):
    for folder in raw_sites:
        test = make_test_split(load_task(folder), 0.25, 1, 0)
        task = load_task(folder)
        validation = scored_cases(task, 0.25, 1, 0, "validation")
        assert validation and not set(validation) & set(test)
        assert not set(task.cases) & set(test)  # no later step can read a test case
        task.test_cases = validation
        assert not set(task.train_cases) & (set(test) | set(validation))
        assert scored_cases(load_task(folder), 0.25, 1, 0, "validation") == validation  # the same on resume
        assert scored_cases(load_task(folder), 0.25, 1, 0) == test


def test_too_few_cases_for_tuning_are_refused_in_words(raw_sites):
    task = load_task(raw_sites[0])
    with pytest.raises(UserInputError, match="validation cases for tuning"):
        scored_cases(task, 0.5, 1, 0, "validation")


def _fake_run(monkeypatch, calls: list):
    """runner.run_experiment replaced by a summary that peaks at lambda = 10 (no training)."""
    def fake(exp, run_dir, quiet=False):
        run = RunFolder(run_dir)
        calls.append((exp.method, dict(exp.method_params), exp.score_on, run.summary.is_file()))
        lam = float(exp.method_params.get("lambda", 0.0))
        summary = {"final_average": 0.9 - abs(lam - 10) / 100, "mean_forgetting": 0.3 / (1 + lam),
                   "plasticity": 0.9 - lam / 200, "bwt": -0.3 / (1 + lam)}
        run.root.mkdir(parents=True, exist_ok=True)
        run.write_experiment(exp)
        run.summary.write_text(json.dumps(summary))
        return summary
    monkeypatch.setattr(runner, "run_experiment", fake)


def test_tune_runs_every_setting_on_validation_chooses_and_resumes(raw_sites, tmp_path, monkeypatch):
    calls: list = []
    _fake_run(monkeypatch, calls)
    base = {"tasks": [str(p) for p in raw_sites], "method": "ewc", "configuration": "2d"}
    out = tmp_path / "tune"
    record = tune(base, {"lambda": [1, 10, 100]}, [0, 1], out, quiet=True)
    assert record["chosen"] == "lambda=10"
    assert {c[2] for c in calls} == {"validation"} and len(calls) == 8  # 3 settings + the reference, 2 seeds
    assert ("sequential", {}, "validation", False) in calls
    folder = TuneFolder(out)
    rows = list(csv.DictReader(folder.table.open()))
    assert len(rows) == 8 and {r["setting"] for r in rows} == {"lambda=1", "lambda=10", "lambda=100", "sequential"}
    text = folder.report.read_text()
    assert "**Chosen: lambda=10**" in text and "--param lambda=10" in text and "validation cases" in text
    assert folder.tradeoff_plot.stat().st_size > 0
    assert folder.read_tune()["scores"][1]["final_average_sd"] == 0.0  # both seeds scored alike here
    assert folder.read_tune()["warnings"] == [] and "Warning" not in text  # the peak lies inside the grid

    calls.clear()
    assert tune(base, {"lambda": [1, 10, 100]}, [0, 1], out, quiet=True)["chosen"] == "lambda=10"
    assert len(calls) == 8 and all(c[3] for c in calls)  # every run found finished
    with pytest.raises(UserInputError, match="another tune"):
        tune(base, {"lambda": [1, 10]}, [0, 1], out, quiet=True)


def test_a_finished_reference_is_shared_and_a_different_one_refused(raw_sites, tmp_path, monkeypatch):
    calls: list = []
    _fake_run(monkeypatch, calls)
    base = {"tasks": [str(p) for p in raw_sites], "method": "ewc", "configuration": "2d"}
    tune(base, {"lambda": [1]}, [0], tmp_path / "first", quiet=True)
    calls.clear()
    shared = tmp_path / "first" / "runs" / "sequential"
    record = tune({**base, "method": "mas"}, {"lambda": [1, 10]}, [0], tmp_path / "second", quiet=True,
                  reference=shared)
    assert [c[0] for c in calls] == ["mas", "mas"]  # the reference was not run again
    assert record["reference_runs"] == {"0": str(shared / "seed0")}
    assert record["scores"][-1]["final_average"] == pytest.approx(0.9 - 10 / 100)  # the shared run's summary
    with pytest.raises(UserInputError, match="differs in: training"):
        tune({**base, "training": {"epochs": 2}}, {"lambda": [1]}, [0], tmp_path / "third", reference=shared)
    with pytest.raises(UserInputError, match="no finished run"):
        tune(base, {"lambda": [1]}, [0], tmp_path / "fourth", reference=tmp_path)
    assert not (tmp_path / "third").exists() and not (tmp_path / "fourth").exists()


def test_tune_refuses_a_folder_it_did_not_write(raw_sites, tmp_path, monkeypatch):
    _fake_run(monkeypatch, [])
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        tune({"tasks": [str(p) for p in raw_sites], "method": "ewc"}, {"lambda": [1]}, [0], tmp_path / "tune")


def test_a_spec_cannot_name_an_unknown_score_on():
    with pytest.raises(UserInputError, match="score_on 'holdout'"):
        experiment_from_dict({"tasks": ["a"], "score_on": "holdout"})


def test_tune_flags_reach_the_grid_check(raw_sites, cli_in_process, tmp_path):
    code, out, err = cli_in_process("tune", "--tasks", *raw_sites, "--method", "ewc", "--grid", "lamda=1,10", "-o",
                                  tmp_path / "tune")
    assert code == 2 and "Did you mean 'lambda'" in out + err and not (tmp_path / "tune").exists()


def test_a_validation_scored_run_never_reads_a_test_case(raw_sites, run_cli, tmp_path):
    """A real run with score_on: validation (what every tune run is), as small as it goes: 2d, one iteration."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"tasks": [str(p) for p in raw_sites], "configuration": "2d", "score_on": "validation",
                                "training": {"epochs": 1, "iterations_per_epoch": 1, "val_iterations": 1}}))
    out = tmp_path / "run"
    result = run_cli("run", spec, "-o", out, "-q", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run = RunFolder(out)
    assert run.read_experiment().score_on == "validation"
    splits, records = run.read_splits(), run.read_task_records()
    for task_dir in raw_sites:
        task = load_task(task_dir)
        test = set(make_test_split(task, 0.25, 1, 0))
        assert splits[task.name] and not set(splits[task.name]) & test
        assert not set(records[task.name]["train_cases"]) & test
        assert records[task.name]["n_cases"] == len(task.cases) - len(test)
        assert set(run.read_cell(2, task.name)["case"]) == set(splits[task.name])  # scored on validation only
    assert "**Scored on:** validation cases" in run.report.read_text()
