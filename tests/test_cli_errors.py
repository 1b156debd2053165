"""The console script on bad input: one paragraph on stderr, exit code 2, no traceback, nothing written.

The main error paths run the real command in a subprocess (`python -m lifelong_nnunet.cli`), as a user would. Further
error paths call `cli.main()` in-process (they stop before nnU-Net starts any worker process), which keeps the suite
fast: every subprocess pays the torch import again.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lifelong_nnunet.cli import _split_tasks, expand_multi_value_options


def _assert_user_error(code: int, out: str, err: str, *fragments: str | Path) -> None:
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    assert "Error" in err, out + err
    for fragment in fragments:
        assert str(fragment) in err, f"{fragment} not in: {err}"


def _check(result, *fragments: str | Path) -> None:
    _assert_user_error(result.returncode, result.stdout, result.stderr, *fragments)


def _write_labels(folder: Path, labels: dict) -> Path:
    path = folder / "dataset.json"
    djson = json.loads(path.read_text())
    djson["labels"] = labels
    path.write_text(json.dumps(djson))
    return path


# ---- the real console script, in a subprocess ----------------------------------------------------------------------

def test_run_with_missing_dataset_json(raw_sites, run_cli, tmp_path):
    (raw_sites[0] / "dataset.json").unlink()
    out = tmp_path / "out"
    _check(run_cli("run", "--tasks", raw_sites[0], "-o", out), raw_sites[0] / "dataset.json")
    assert not out.exists()


def test_run_with_different_labels_in_domain_scenario(raw_sites, run_cli, tmp_path):
    djson_path = _write_labels(raw_sites[1], {"background": 0, "structure_a": 1, "structure_c": 2})
    out = tmp_path / "out"
    result = run_cli("run", "--tasks", raw_sites[0], raw_sites[1], "-o", out)  # `--tasks A B`: two tasks
    _check(result, djson_path)
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


def test_run_into_a_folder_holding_a_different_experiment(raw_sites, run_cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stored = out / "experiment.json"
    stored.write_text('{"tasks": ["x"]}')
    result = run_cli("run", "--tasks", raw_sites[0], "-o", out)
    _check(result, out)
    assert "different experiment" in result.stderr
    assert stored.read_text() == '{"tasks": ["x"]}'
    assert sorted(p.name for p in out.iterdir()) == ["experiment.json"]


def test_run_into_a_non_empty_folder_without_a_run(raw_sites, run_cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _check(run_cli("run", "--tasks", raw_sites[0], "-o", out), out, "experiment.json")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_run_with_a_truncated_image(raw_sites, run_cli, tmp_path):
    """The first 200 bytes of a valid .nii.gz: the header reads, the voxels are cut off. SimpleITK (nnU-Net's
    reader) would fill the rest with zeros, so without the full read this run trained and reported on blank data."""
    image = sorted((raw_sites[0] / "imagesTr").iterdir())[0]
    image.write_bytes(image.read_bytes()[:200])
    out = tmp_path / "out"
    result = run_cli("run", "--tasks", raw_sites[0], "-o", out, "--epochs", "1", "--iterations", "1")  # fails fast
    _check(result, image, "truncated")
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


def test_predict_on_a_folder_that_is_not_a_run(run_cli, tmp_path):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    result = run_cli("predict", not_a_run, "-i", tmp_path / "in", "-o", tmp_path / "pred")
    _check(result, not_a_run, "experiment.json")
    assert not (tmp_path / "pred").exists()


def test_data_build_unknown_builder(run_cli, tmp_path):
    result = run_cli("data", "build", "nonexistent", "-o", tmp_path / "raw")
    _check(result, "nonexistent", "synthetic-sites", "hippocampus-sites")
    assert not (tmp_path / "raw").exists()


def test_methods_lists_the_reference_methods(run_cli):
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    listing = result.stdout  # a listing belongs on stdout, so it can be piped
    for name in ("sequential", "joint", "separate"):
        assert name in listing
    assert "Traceback" not in listing


def test_usage_error_exits_2_without_traceback(run_cli):
    result = run_cli("run", "--tasks", "A")  # -o/--output is required
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "output" in result.stderr


# ---- more error paths, in-process ----------------------------------------------------------------------------------

def test_run_with_bad_case_writes_nothing(raw_sites, cli_in_process, tmp_path):
    label = sorted((raw_sites[0] / "labelsTr").iterdir())[0]
    label.write_bytes(b"garbage")
    out = tmp_path / "out"
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], "-o", out), label)
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def stop_after_checks(monkeypatch):
    """Broken data that slipped through `runner.prepare` would be planned and trained on in this process: fail at
    once instead."""
    from lifelong_nnunet import runner

    checked = runner.prepare

    def prepare_then_stop(*args, **kwargs):
        checked(*args, **kwargs)
        raise AssertionError("the broken data passed every check in runner.prepare")

    monkeypatch.setattr(runner, "prepare", prepare_then_stop)


def _rewrite(path: Path, array: np.ndarray) -> None:
    """Write ``array`` into ``path`` with the file's own affine (so only the voxels are wrong, not the geometry)."""
    nib.save(nib.Nifti1Image(array, nib.load(path).affine), path)


def test_run_with_a_truncated_label_in_the_second_task(raw_sites, cli_in_process, tmp_path, stop_after_checks):
    label = sorted((raw_sites[1] / "labelsTr").iterdir())[-1]
    label.write_bytes(label.read_bytes()[:-40])  # the end of the gzip stream is missing
    out = tmp_path / "out"
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], raw_sites[1], "-o", out), label, "truncated")
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


def test_run_with_an_all_nan_image(raw_sites, cli_in_process, tmp_path, stop_after_checks):
    image = sorted((raw_sites[0] / "imagesTr").iterdir())[2]
    _rewrite(image, np.full(nib.load(image).shape, np.nan, np.float32))
    out = tmp_path / "out"
    code, stdout, err = cli_in_process("run", "--tasks", raw_sites[0], "-o", out)
    _assert_user_error(code, stdout, err, image, "non-finite", f"{24 ** 3} NaN")
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


def test_run_with_an_infinite_voxel_in_an_image(raw_sites, cli_in_process, tmp_path, stop_after_checks):
    image = sorted((raw_sites[0] / "imagesTr").iterdir())[0]
    voxels = np.asanyarray(nib.load(image).dataobj).astype(np.float32)
    voxels[3, 4, 5] = -np.inf
    _rewrite(image, voxels)
    out = tmp_path / "out"
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], "-o", out), image, "1 non-finite", "1 +/-inf")
    assert not out.exists()


@pytest.mark.parametrize("bad, fragment", [(np.nan, "non-finite"), (np.inf, "non-finite"), (1.5, "non-integer")])
def test_run_with_a_label_map_that_is_not_finite_and_integer(raw_sites, cli_in_process, tmp_path, stop_after_checks,
                                                             bad, fragment):
    label = sorted((raw_sites[0] / "labelsTr").iterdir())[1]
    values = np.asanyarray(nib.load(label).dataobj).astype(np.float32)
    values[0, 0, 0] = bad
    _rewrite(label, values)
    out = tmp_path / "out"
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], "-o", out), label, fragment)
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


def test_run_with_too_few_cases_for_the_test_split(raw_sites, cli_in_process, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(f"tasks: ['{raw_sites[0]}']\ntest_split: {{min_cases: 5}}\n")
    out = tmp_path / "out"
    _assert_user_error(*cli_in_process("run", spec, "-o", out), raw_sites[0], "min_cases")
    assert not out.exists()


def test_run_with_a_bad_spec_value(raw_sites, cli_in_process, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(f"tasks: ['{raw_sites[0]}']\nscenario: nope\n")
    out = tmp_path / "out"
    _assert_user_error(*cli_in_process("run", spec, "-o", out), spec, "scenario")
    assert not out.exists()


def test_run_with_a_bad_override(raw_sites, cli_in_process, tmp_path):
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], "--epochs", "0", "-o", tmp_path / "out"),
                       "epochs")
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], "--method", "nope", "-o", tmp_path / "out"),
                       "nope")
    assert not (tmp_path / "out").exists()


def test_run_with_a_broken_yaml(cli_in_process, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("tasks: [a, b\n")
    _assert_user_error(*cli_in_process("run", spec, "-o", tmp_path / "out"), spec)


def test_run_with_an_unknown_task(cli_in_process, tmp_path):
    _assert_user_error(*cli_in_process("run", "--tasks", "Dataset999_Nope", "-o", tmp_path / "out"),
                       "Dataset999_Nope")
    assert not (tmp_path / "out").exists()


def test_run_without_spec_or_tasks(cli_in_process, tmp_path):
    _assert_user_error(*cli_in_process("run", "-o", tmp_path / "out"), "--tasks")


def test_run_with_bad_param(raw_sites, cli_in_process, tmp_path):
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], "--param", "lambda", "-o", tmp_path / "out"),
                       "NAME=VALUE")
    _assert_user_error(*cli_in_process("run", "--tasks", raw_sites[0], "--param", "lambda=1", "-o",
                                       tmp_path / "out"), "lambda")  # sequential has no parameters
    assert not (tmp_path / "out").exists()


def test_export_from_a_folder_that_is_not_a_run(cli_in_process, tmp_path):
    _assert_user_error(*cli_in_process("export", tmp_path, "-o", tmp_path / "exported"), "experiment.json")
    assert not (tmp_path / "exported").exists()


def test_report_on_a_folder_that_is_not_a_run(cli_in_process, tmp_path):
    _assert_user_error(*cli_in_process("report", tmp_path), tmp_path / "experiment.json")


def test_keyboard_interrupt_exits_130(cli_in_process, monkeypatch, tmp_path):
    import lifelong_nnunet.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    code, out, err = cli_in_process("run", "--tasks", "A", "-o", tmp_path / "out")
    assert code == 130
    assert "resume" in err


# ---- argument handling ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["run", "--tasks", "A", "B", "-o", "out"], ["run", "--tasks", "A", "--tasks", "B", "-o", "out"]),
    (["run", "--tasks", "A", "--tasks", "B"], ["run", "--tasks", "A", "--tasks", "B"]),
    (["run", "-o", "out", "--tasks", "A", "B", "C"],
     ["run", "-o", "out", "--tasks", "A", "--tasks", "B", "--tasks", "C"]),
    (["run", "spec.yaml", "--tasks", "A", "--method", "joint"],
     ["run", "spec.yaml", "--tasks", "A", "--method", "joint"]),
    (["run", "spec.yaml", "-o", "A", "B"], ["run", "spec.yaml", "-o", "A", "B"]),  # only --tasks takes many
    (["methods"], ["methods"]),
])
def test_expand_multi_value_options(argv, expected):
    assert expand_multi_value_options(argv) == expected


def test_split_tasks_accepts_comma_and_space_lists():
    assert _split_tasks(None) == []
    assert _split_tasks(["A,B", "C"]) == ["A", "B", "C"]
    assert _split_tasks(["A B"]) == ["A", "B"]


def test_run_help_shows_the_defaults_a_run_uses(cli_in_process):
    from lifelong_nnunet.experiment import Experiment, Training
    code, out, _ = cli_in_process("run", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert f"Default: {Experiment(tasks=[]).method}." in text and f"Default: {Training().epochs}." in text
    assert f"Default: {Experiment(tasks=[]).configuration}." in text
