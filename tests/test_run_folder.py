"""The run folder's format: one owner of its file names, a version, and the migration of older folders.

``fixtures/run_format1`` is a run folder written by the code of commit 42d79f2, before folders carried a format
version (how it was made: fixtures/make_run_format1.py). Today's code must report, predict, export and resume it.
Its experiment.json names its data by absolute folder under /tmp/lifelong-nnunet-fixture; the data are conftest's
two synthetic sites (24^3, seed 0), regenerated here byte for byte and pointed at with ``relocate_tasks``.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.run_folder import (
    RUN_FORMAT,
    RunFolder,
    RunFolderError,
    SweepFolder,
    load_model,
    migrate,
    relocate_tasks,
    save_model,
)

FIXTURE = Path(__file__).parent / "fixtures" / "run_format1"
SRC = Path(__file__).parents[1] / "src" / "lifelong_nnunet"


@pytest.fixture
def old_run(tmp_path) -> RunFolder:
    """A private copy of the format-1 fixture run."""
    return RunFolder(Path(shutil.copytree(FIXTURE, tmp_path / "old_run")))


def stage_rows(run: RunFolder, index: int) -> pd.DataFrame:
    """Every task's scores at stage ``index``, in training order, read cell by cell (either format)."""
    return pd.concat([run.read_cell(index, t) for t in run.read_tasks()], ignore_index=True)


def _close(a, b) -> bool:
    """JSON-like values equal, floats to 1e-9 (NaN-free records)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= 1e-9
    return a == b


# ---- the format-1 fixture ----------------------------------------------------------------------------------------
def test_fixture_is_format_1_and_reads_typed(old_run):
    assert not old_run.format_file.exists() and old_run.format() == 1
    exp = old_run.read_experiment()
    assert exp.configuration == "2d" and exp.evaluation.report_metric == "dice" and exp.plan_with is None
    assert [s.budget for s in old_run.read_schedule()] == [1.0, 1.0]
    assert old_run.read_tasks() == ["Dataset901_SynthSiteA", "Dataset902_SynthSiteB"]
    assert old_run.read_labels().scenario == "domain"
    assert old_run.load_model(2)["info"]["tasks_seen"] == ["Dataset901_SynthSiteA", "Dataset902_SynthSiteB"]


def test_report_of_an_old_run_reproduces_its_summary(old_run):
    from lifelong_nnunet.evaluation.summary import write_summary_and_report
    before = json.loads((FIXTURE / "summary.json").read_text())
    summary = write_summary_and_report(old_run.root)
    # keys added since (cells not evaluated, the stage history) hold their empty values for an old run; every key
    # the old summary had is reproduced
    assert summary.pop("not_evaluated") == [] and summary.pop("history") == [] and summary.pop("notes") == []
    assert summary.pop("task_agnostic") is None  # a method without heads
    assert summary.pop("scored_on") == "test"  # runs before `tune` existed were all scored on their test cases
    for entry in summary["by_metric"].values():
        assert entry.pop("n_not_evaluated") == 0
    # what a format-1 run never recorded reads as not recorded (None), never as zero
    resources, data = summary.pop("resources"), summary.pop("data")
    assert resources["wall_seconds"] is None and resources["peak_rss_mb"] is None
    assert resources["not_recorded"] == ["stage 0 evaluation", "stage 1 training", "stage 1 evaluation",
                                         "stage 2 training", "stage 2 evaluation"]
    assert data["Dataset901_SynthSiteA"] == {"n_train": None, "n_validation": None, "n_test": 2,
                                             "test_cases": ["synthsite_a_003", "synthsite_a_004"], "imported": False,
                                                 "normalisation": None}
    assert summary.pop("warnings") == [] and summary.pop("learned_nothing") == {"stages": [], "labels": []}
    # an old run recorded no worker count: None ("not recorded"), never a guess
    assert summary.pop("budget")["stages"] == [{"stage": k, "epochs": 1, "iterations_per_epoch": 2,
                                                "augmentation_workers": None, "imported": False} for k in (1, 2)]
    assert set(summary.pop("per_label_final")) == set(summary["tasks"])
    assert _close(summary, before)
    # the old report's lines all come back, in their order; the sections added since come in between
    new_lines = iter(old_run.report.read_text().splitlines())
    assert all(line in new_lines for line in (FIXTURE / "report.md").read_text().splitlines())
    report = old_run.report.read_text()
    assert "- **Wall time:** not recorded" in report and "- **Peak memory:** not recorded" in report
    assert "| Dataset901_SynthSiteA | not recorded | not recorded | 2 | synthsite_a_003, synthsite_a_004 |" in report
    assert old_run.result_matrix_figure.is_file() and old_run.task_curves_figure.is_file()
    assert not old_run.format_file.exists()  # a report leaves an older folder's format as it was


@pytest.mark.slow
def test_predict_with_an_old_run_reproduces_its_stored_scores(old_run, raw_sites, tmp_path):
    from lifelong_nnunet.deploy import predict
    from lifelong_nnunet.evaluation.metrics import score_case
    from lifelong_nnunet.nnunet.predictor import read_label
    case = old_run.read_splits()["Dataset901_SynthSiteA"][0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(raw_sites[0] / "imagesTr" / f"{case}_0000.nii.gz", inputs)
    written = predict(old_run.root, inputs, tmp_path / "out", device="cpu")
    assert [p.name for p in written] == [f"{case}.nii.gz"]
    pred = read_label(written[0])
    rows = score_case(pred, read_label(raw_sites[0] / "labelsTr" / f"{case}.nii.gz"),
                      {"structure_a": 1, "structure_b": 2}, ["dice"])
    stored = stage_rows(old_run, 2)
    stored = stored[(stored.case == case) & (stored.metric == "dice")].set_index("label").value
    assert {r["label"]: r["value"] for r in rows} == pytest.approx(stored.to_dict(), abs=1e-6)


def test_export_of_an_old_run_holds_its_final_weights(old_run, tmp_path):
    from lifelong_nnunet.deploy import export_model_folder
    folder = export_model_folder(old_run.root, tmp_path / "export")
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = old_run.load_model(2)["network_weights"]
    assert checkpoint["init_args"]["configuration"] == "2d" and checkpoint["current_epoch"] == 1
    assert all(torch.equal(v, weights[k]) for k, v in checkpoint["network_weights"].items())
    assert json.loads((folder / "plans.json").read_text()) == old_run.read_plans()


@pytest.mark.slow
def test_an_old_run_resumes_after_its_data_moved(old_run, raw_sites, tmp_path):
    from lifelong_nnunet.experiment import experiment_from_dict
    from lifelong_nnunet.runner import run_experiment
    spec = {"tasks": [str(p) for p in raw_sites], "method": "sequential", "configuration": "2d", "device": "cpu",
            "training": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1},
            "cache_dir": str(tmp_path / "cache")}
    old_run.stage_eval(2).unlink()  # the run stopped after training stage 2, before evaluating it
    models = {i: old_run.model(i).stat().st_mtime_ns for i in (0, 1, 2)}
    with pytest.raises(UserInputError, match=r"differs in: tasks"):  # the data is somewhere else now
        run_experiment(experiment_from_dict(dict(spec)), old_run.root, quiet=True)
    relocate_tasks(old_run.root, raw_sites)
    assert old_run.read_experiment().tasks == [str(p.resolve()) for p in raw_sites]

    summary = run_experiment(experiment_from_dict(dict(spec)), old_run.root, quiet=True)
    log = old_run.log.read_text()
    assert "Stage 1 (Dataset901_SynthSiteA) already done" in log
    assert {i: old_run.model(i).stat().st_mtime_ns for i in (0, 1, 2)} == models  # nothing retrained
    again = stage_rows(old_run, 2)  # evaluated again, with the same weights on the same data
    before = pd.read_csv(FIXTURE / "stages" / "stage_2" / "eval.csv")
    assert again[["eval_task", "case", "label", "metric"]].equals(before[["eval_task", "case", "label", "metric"]])
    np.testing.assert_allclose(again.value, before.value, rtol=1e-5, atol=1e-6)
    assert summary["final_average"] == pytest.approx(json.loads((FIXTURE / "summary.json").read_text())
                                                     ["final_average"], abs=1e-6)
    # every record is rewritten in the current format, and the folder says so
    assert json.loads(old_run.format_file.read_text())["format"] == RUN_FORMAT == old_run.format()
    stored = json.loads(old_run.spec.read_text())
    assert stored["plan_with"] is None and stored["evaluation"]["report_metric"] == "dice"


# ---- migrate -----------------------------------------------------------------------------------------------------
def test_migrate_fills_what_format_1_left_out():
    assert migrate("schedule", [{"index": 1, "train_tasks": ["A"], "init": "previous"}], 1)[0]["budget"] == 1.0
    labels = migrate("labels", {"ids": {"background": 0, "a": 1}}, 1)
    assert labels["scenario"] == "domain" and labels["task_maps"] == {} and labels["introduced_by"] == {}
    model = migrate("model", {"network_weights": {}, "method_state": {}, "info": {"stage": 1}}, 1)
    assert model["info"] == {"stage": 1, "tasks_seen": []}
    sweep = migrate("sweep", {"runs": [], "spec": None}, 1)
    assert sweep == {"runs": [], "spec": {}, "commands": [], "versions": {}}


def test_migrate_summary_from_before_by_metric():
    old = {"method": "sequential", "tasks": ["A", "B"], "R": [[0.1, 0.1], [0.8, 0.1], [0.5, 0.7]],
           "final_per_task": [0.5, 0.7], "final_average": 0.6, "bwt": -0.3, "fwt": 0.0, "forgetting": 0.3}
    summary = migrate("summary", old, 1)
    entry = summary["by_metric"]["dice"]
    assert summary["metric"] == "dice" and entry["higher_is_better"] is True
    assert entry["mean_forgetting"] == 0.3 and entry["final_average"] == 0.6 and entry["plasticity"] is None
    assert old == {**old} and "by_metric" not in old  # the input is not modified
    hd = migrate("summary", {"metric": "hd95", "tasks": [], "forgetting": [1.0]}, 1)["by_metric"]["hd95"]
    assert hd["higher_is_better"] is False and hd["mean_forgetting"] is None  # a per-task list, no mean stored


def test_complete_records_pass_migration_unchanged(old_run):
    summary = json.loads((FIXTURE / "summary.json").read_text())
    assert migrate("summary", summary, 1) == summary
    assert migrate("summary", summary, RUN_FORMAT) == summary


def test_a_folder_from_a_newer_version_is_refused(old_run):
    old_run.format_file.write_text(json.dumps({"format": RUN_FORMAT + 1}))
    with pytest.raises(RunFolderError, match="newer lifelong-nnunet"):
        old_run.read_experiment()
    with pytest.raises(RunFolderError, match="newer"):
        migrate("summary", {}, RUN_FORMAT + 1)


def test_damaged_records_name_the_file(old_run, tmp_path):
    old_run.summary.write_text("{not json")
    with pytest.raises(RunFolderError, match="summary.json is damaged"):
        old_run.read_summary()
    (tmp_path / "m.pt").write_bytes(b"not a model")
    with pytest.raises(RunFolderError, match="m.pt is damaged"):
        load_model(tmp_path / "m.pt")
    save_model(tmp_path / "ok.pt", {"w": torch.ones(2)}, {"k": 1}, {"stage": 1})
    assert load_model(tmp_path / "ok.pt")["format"] == RUN_FORMAT


def test_relocation_keeps_the_dataset_names(old_run, tmp_path):
    with pytest.raises(UserInputError, match="one for one"):
        relocate_tasks(old_run.root, [tmp_path / "Dataset901_SynthSiteA", tmp_path / "Dataset903_Other"])
    assert old_run.read_experiment().tasks[0].startswith("/tmp/lifelong-nnunet-fixture/")


def test_a_sweep_folder_without_sweep_json_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="sweep.json is missing"):
        SweepFolder(tmp_path).read_sweep()


# ---- one owner of the file names ---------------------------------------------------------------------------------
# nnU-Net's own names (dataset.json, plans.json, checkpoints) also name files of raw datasets and the planning cache,
# so only the names that are this project's alone are checked.
OWN_NAMES = ("experiment.json", "splits.json", "schedule.json", "labels.json", "summary.json", "results.csv",
             "report.md", "run.log", "eval.csv", "model.pt", "format.json", "sweep.json", "runs.csv", "sweep.log",
             "comparison.html", "task_choices.csv", "task_description.json", "demo.json", "result_matrix.png",
             "task_curves.png")


def test_no_module_but_run_folder_spells_a_run_folder_file_name():
    """String literals that are such a name (or end a path with one); prose in docstrings and help texts may name
    the files it describes."""
    pattern = re.compile(r"[\w./{}-]*(" + "|".join(re.escape(n) for n in OWN_NAMES) + ")")
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "run_folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert offenders == []


# ---- references of a report ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, fragment", [
    (lambda ref: ref.splits.write_text(json.dumps({"Dataset903_Other": ["a"], "Dataset904_Other": ["b"]})),
     "learned Dataset903_Other"),
    (lambda ref: ref.spec.write_text(json.dumps({**json.loads(ref.spec.read_text()), "scenario": "class"})),
     "class-scenario run"),
    (lambda ref: ref.splits.write_text(json.dumps({k: v[:1] for k, v in ref.read_splits().items()})),
     "on other cases"),
])
def test_a_reference_on_other_tasks_scenario_or_test_cases_is_refused(old_run, tmp_path, edit, fragment):
    from lifelong_nnunet.evaluation.summary import write_summary_and_report
    ref = RunFolder(Path(shutil.copytree(FIXTURE, tmp_path / "reference")))
    assert write_summary_and_report(old_run.root, {"joint": ref.root})["reference_gaps"]  # the same run: accepted
    written = {p: p.read_bytes() for p in (old_run.report, old_run.summary)}
    edit(ref)
    with pytest.raises(UserInputError, match=fragment):
        write_summary_and_report(old_run.root, {"joint": ref.root})
    assert {p: p.read_bytes() for p in written} == written  # refused before anything is rewritten
