"""`extend`: a finished run learns new tasks months later, after the old training data (and the cache) are gone.

The story test is the user's workflow through the console script: run on site A, delete A's training images and the
cache, extend with B (A's test cases still there: re-scored), delete A's test cases, extend with C (A: "not
evaluated"). The error tests check every refusal: exit 2, one paragraph, nothing written. Incremental-equals-batch
for every method is in test_methods_resume.py.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from lifelong_nnunet.datasets.synthetic import build_synthetic_sites
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.runner import run_experiment

TINY = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1}
ARRAY_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz", ".b2nd", ".pkl", ".mha", ".nrrd")


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> list[Path]:
    return build_synthetic_sites(tmp_path_factory.mktemp("sites"), n_sites=3, cases_per_site=4, shape=(24, 24, 24),
                                 first_id=921)


@pytest.mark.slow
def test_extend_after_the_old_training_data_and_the_cache_are_deleted(three_sites, run_cli, tmp_path):
    sites = [Path(shutil.copytree(s, tmp_path / "raw" / s.name)) for s in three_sites]
    run, cache = tmp_path / "model", tmp_path / "cache"
    common = ["--epochs", "1", "--iterations", "2", "--device", "cpu", "--cache-dir", cache]
    # nnU-Net's 2d configuration (extend keeps the run's): what extend keeps and deletes does not depend on it, and
    # it trains and predicts in half the time of 3d here
    first = run_cli("run", "--tasks", sites[0], "--method", "rehearsal", "-o", run, "--configuration", "2d", *common,
                    timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    test_a = json.loads((run / "splits.json").read_text())[sites[0].name]
    for f in [*(sites[0] / "imagesTr").iterdir(), *(sites[0] / "labelsTr").iterdir()]:
        if not any(f.name.startswith(c + "_0000") or f.name == c + ".nii.gz" for c in test_a):
            f.unlink()  # only A's held-out test cases are kept
    assert run_cli("cache", "clear", "--cache-dir", cache).returncode == 0
    assert not any(cache.iterdir())

    second = run_cli("extend", run, "--task", sites[1], *common[:-2], "--cache-dir", cache, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tasks"] == [s.name for s in sites[:2]] and summary["not_evaluated"] == []
    assert [h["origin"] for h in summary["history"]] == ["run", "extend"]
    # rehearsal replayed A from its declared buffer in the run folder: A's originals and the cache were gone
    replayed = sorted(p.name for p in (run / "replay" / sites[0].name).iterdir())
    assert replayed and not set(test_a) & {p.split(".")[0].removesuffix("_seg") for p in replayed}

    for f in [*(sites[0] / "imagesTr").iterdir(), *(sites[0] / "labelsTr").iterdir()]:
        f.unlink()  # now A's test cases are gone too
    third = run_cli("extend", run, "--task", sites[2], "--epochs", "2", "--iterations", "2", "--device", "cpu",
                    "--cache-dir", cache, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["not_evaluated"] == [[3, sites[0].name]]
    assert summary["final_per_task"][0] is None  # missing, not zero
    assert summary["final_average"] == pytest.approx(sum(summary["final_per_task"][1:]) / 2)
    assert summary["history"][-1]["budget"] == {"epochs": 2, "iterations_per_epoch": 2, "augmentation_workers": 0}
    report = (run / "report.md").read_text()
    assert "not evaluated (test data absent)" in report and "## History" in report
    # the privacy promise: nothing of A or B outside the declared buffer, and an empty cache
    arrays = [p for p in run.rglob("*") if p.name.endswith(ARRAY_SUFFIXES)]
    assert all(p.parent.parent == run / "replay" for p in arrays), arrays[:3]
    assert not [p for p in cache.rglob("*") if p.is_file()]
    predicted = run_cli("predict", run, "-i", sites[2] / "imagesTr", "-o", tmp_path / "pred")
    assert predicted.returncode == 0, predicted.stderr[-2000:]


# ---- refusals: exit 2, one paragraph, nothing written -------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(three_sites, tmp_path_factory) -> Path:
    """A finished one-task sequential run (never modified: tests extend a copy, or are refused before writing)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(experiment_from_dict({"tasks": [str(three_sites[0])], "training": TINY, "device": "cpu",
                                         "cache_dir": str(tmp_path_factory.mktemp("cache"))}), out, quiet=True)
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(cli_in_process, *args) -> str:
    code, out, err = cli_in_process(*args)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    return " ".join((out + err).split())


@pytest.fixture
def variant(three_sites, tmp_path):
    """A copy of site B whose dataset.json is edited by the test."""
    def make(edit) -> Path:
        folder = Path(shutil.copytree(three_sites[1], tmp_path / "variant" / three_sites[1].name))
        djson = json.loads((folder / "dataset.json").read_text())
        edit(djson)
        (folder / "dataset.json").write_text(json.dumps(djson))
        return folder
    return make


def test_extend_refuses_a_folder_that_is_not_a_run(cli_in_process, three_sites, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "is not a lifelong-nnunet run folder" in refused(cli_in_process, "extend", tmp_path / "empty", "--task",
                                                           three_sites[1])


def test_extend_refuses_an_unfinished_run(cli_in_process, finished, three_sites, tmp_path):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "summary.json").unlink()
    before = snapshot(run)
    assert "is not finished. Repeat the command that started it" in refused(cli_in_process, "extend", run, "--task",
                                                                           three_sites[1])
    assert snapshot(run) == before


def test_extend_refuses_a_task_already_trained(cli_in_process, finished, three_sites):
    before = snapshot(finished)
    assert "is already a task of the run" in refused(cli_in_process, "extend", finished, "--task", three_sites[0])
    assert snapshot(finished) == before


def test_extend_refuses_other_labels_in_the_domain_scenario(cli_in_process, finished, variant):
    other = variant(lambda d: d["labels"].update({"structure_c": 3}))
    before = snapshot(finished)
    assert "must have the same labels" in refused(cli_in_process, "extend", finished, "--task", other)
    assert snapshot(finished) == before


def test_extend_refuses_other_channels(cli_in_process, finished, variant):
    other = variant(lambda d: d.update(channel_names={"0": "T1", "1": "T2"}))
    for image in list((other / "imagesTr").glob("*_0000.nii.gz")):  # a complete two-channel dataset
        shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))
    before = snapshot(finished)
    assert "input channel(s)" in refused(cli_in_process, "extend", finished, "--task", other)
    assert snapshot(finished) == before


def test_extend_refuses_a_non_positive_budget(cli_in_process, finished, three_sites):
    assert "--epochs must be a positive whole number" in refused(cli_in_process, "extend", finished, "--task",
                                                                three_sites[1], "--epochs", "0")


def test_joint_cannot_be_extended(cli_in_process, finished, three_sites, tmp_path):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    spec = json.loads((run / "experiment.json").read_text())
    (run / "experiment.json").write_text(json.dumps({**spec, "method": "joint"}))
    schedule = json.loads((run / "schedule.json").read_text())
    (run / "schedule.json").write_text(json.dumps([{**schedule[0], "budget": 1.0}]))
    before = snapshot(run)
    assert "cannot be extended" in refused(cli_in_process, "extend", run, "--task", three_sites[1])
    assert snapshot(run) == before


def test_a_class_task_that_adds_no_structure_is_refused(cli_in_process, finished, three_sites, tmp_path):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    spec = json.loads((run / "experiment.json").read_text())
    (run / "experiment.json").write_text(json.dumps({**spec, "scenario": "class"}))
    before = snapshot(run)
    assert "annotates only structures the run already segments" in refused(cli_in_process, "extend", run, "--task",
                                                                          three_sites[1])
    assert snapshot(run) == before
