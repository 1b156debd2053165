"""The experiment spec: defaults, shorthand, validation errors and YAML loading (no data, no training)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.experiment import (CONFIGURATIONS, DEVICES, SCENARIOS, Evaluation, Experiment, Training,
                                        experiment_from_dict, load_experiment)
from lifelong_nnunet.experiment import TestSplit as SplitSpec  # aliased: pytest would try to collect Test*


def test_defaults_from_minimal_spec():
    exp = experiment_from_dict({"tasks": ["Dataset001_A", "Dataset002_B"]})
    assert exp.tasks == ["Dataset001_A", "Dataset002_B"]
    assert exp.method == "sequential"
    assert exp.method_params == {}
    assert exp.scenario == "domain"
    assert exp.configuration == "3d_fullres"
    assert exp.training == Training(epochs=5, iterations_per_epoch=20, val_iterations=5, initial_lr=1e-2,
                                    batch_size=None)
    assert exp.test_split == SplitSpec(fraction=0.25, min_cases=1)
    assert exp.evaluation == Evaluation(mirroring=False, tile_step_size=0.5)
    assert exp.validation_fraction == 0.2
    assert exp.seed == 0
    assert exp.device == "auto"
    assert exp.raw_root is None and exp.cache_dir is None


def test_nested_sections_are_built_as_dataclasses():
    exp = experiment_from_dict({"tasks": ["a"], "training": {"epochs": 2, "batch_size": 3},
                                "test_split": {"fraction": 0.5, "min_cases": 2},
                                "evaluation": {"mirroring": True}})
    assert isinstance(exp.training, Training) and exp.training.epochs == 2 and exp.training.batch_size == 3
    assert exp.training.iterations_per_epoch == 20  # untouched fields keep their defaults
    assert exp.test_split == SplitSpec(0.5, 2)
    assert exp.evaluation == Evaluation(True, 0.5)


def test_method_mapping_shorthand():
    exp = experiment_from_dict({"tasks": ["a"], "method": {"name": "sequential"}})
    assert exp.method == "sequential"
    assert exp.method_params == {}


def test_method_shorthand_moves_extra_keys_into_method_params():
    # `sequential` has no parameters, so the shorthand is only checked for how it splits the mapping.
    exp = experiment_from_dict({"tasks": ["a"], "method": {"name": "joint"}, "method_params": {}})
    assert exp.method == "joint"
    data = {"tasks": ["a"], "method": {"name": "sequential", "lam": 3}}
    assert experiment_from_dict(data).method_params == {"lam": 3}
    assert data["method"] == {"name": "sequential", "lam": 3}  # the caller's dict is not mutated


def test_method_shorthand_without_name_is_an_error():
    with pytest.raises(UserInputError, match="method"):
        experiment_from_dict({"tasks": ["a"], "method": {"lam": 1}})


def test_unknown_top_level_key_is_named():
    with pytest.raises(UserInputError, match="epoch") as info:
        experiment_from_dict({"tasks": ["a"], "epoch": 3})
    assert "'epoch'" in str(info.value)


def test_unknown_nested_key_is_named_with_its_section():
    with pytest.raises(UserInputError) as info:
        experiment_from_dict({"tasks": ["a"], "training": {"epoch": 3}})
    assert "training" in str(info.value) and "'epoch'" in str(info.value)


def test_error_names_the_source():
    with pytest.raises(UserInputError, match="^my.yaml"):
        experiment_from_dict({"tasks": ["a"], "scenario": "nope"}, "my.yaml")


@pytest.mark.parametrize("override, fragment", [
    ({"scenario": "task"}, "scenario"),
    ({"method": "no_such_method"}, "no_such_method"),
    ({"configuration": "3d_lowres"}, "configuration"),
    ({"device": "tpu"}, "device"),
    ({"training": {"epochs": 0}}, "epochs"),
    ({"training": {"epochs": -1}}, "epochs"),
    ({"training": {"epochs": 2.5}}, "epochs"),
    ({"training": {"iterations_per_epoch": 0}}, "iterations_per_epoch"),
    ({"training": {"val_iterations": 0}}, "val_iterations"),
    ({"training": {"batch_size": 0}}, "batch_size"),
    ({"training": {"initial_lr": 0}}, "initial_lr"),
    ({"test_split": {"fraction": 0}}, "fraction"),
    ({"test_split": {"fraction": 1}}, "fraction"),
    ({"test_split": {"fraction": 1.5}}, "fraction"),
    ({"test_split": {"fraction": -0.1}}, "fraction"),
    ({"test_split": {"min_cases": 0}}, "min_cases"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"seed": "x"}, "seed"),
    ({"method_params": [1, 2]}, "method_params"),
    ({"tasks": ["a", "a"]}, "twice"),
    ({"tasks": []}, "tasks"),
    ({"tasks": "a"}, "tasks"),
    ({"training": 5}, "training"),
])
def test_bad_values_are_user_errors(override, fragment):
    with pytest.raises(UserInputError, match=fragment):
        experiment_from_dict({"tasks": ["a", "b"], **override})


def test_missing_tasks_is_a_user_error():
    with pytest.raises(UserInputError, match="tasks"):
        experiment_from_dict({"method": "sequential"})


def test_accepted_enumerations():
    for scenario in SCENARIOS:
        assert experiment_from_dict({"tasks": ["a"], "scenario": scenario}).scenario == scenario
    for configuration in CONFIGURATIONS:
        assert experiment_from_dict({"tasks": ["a"], "configuration": configuration}).configuration == configuration
    for device in DEVICES:
        assert experiment_from_dict({"tasks": ["a"], "device": device}).device == device


def test_identity_excludes_machine_specific_fields():
    exp = experiment_from_dict({"tasks": ["a"], "device": "cpu", "cache_dir": "/c", "raw_root": "/r"})
    identity = exp.identity()
    assert not {"device", "cache_dir", "raw_root"} & set(identity)
    assert identity["tasks"] == ["a"] and identity["method"] == "sequential"
    assert identity["training"]["epochs"] == 5
    other = experiment_from_dict({"tasks": ["a"], "device": "cuda", "cache_dir": "/elsewhere"})
    assert other.identity() == identity
    assert experiment_from_dict({"tasks": ["a"], "seed": 1}).identity() != identity
    assert set(exp.to_dict()) == set(identity) | {"device", "cache_dir", "raw_root", "plan_with"}


def test_identity_round_trips_through_experiment_from_dict():
    exp = experiment_from_dict({"tasks": ["a", "b"], "training": {"epochs": 3}, "seed": 4})
    assert experiment_from_dict(exp.identity()).identity() == exp.identity()
    assert isinstance(experiment_from_dict(exp.to_dict()), Experiment)


# ---- YAML files --------------------------------------------------------------------------------------------------

def test_load_experiment_reads_yaml(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("tasks: [Dataset001_A, 2]\nmethod:\n  name: sequential\ntraining:\n  epochs: 2\nseed: 3\n")
    exp = load_experiment(spec)
    assert exp.tasks == ["Dataset001_A", "2"]  # names/IDs that are no folder stay as given (as strings)
    assert exp.training.epochs == 2 and exp.seed == 3 and exp.method == "sequential"


def test_yaml_syntax_error_names_the_file(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text("tasks: [a, b\nmethod: sequential\n")
    with pytest.raises(UserInputError) as info:
        load_experiment(spec)
    assert str(spec) in str(info.value)
    assert "YAML" in str(info.value)


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(UserInputError) as info:
        load_experiment(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    spec = tmp_path / "exp.yaml"
    spec.write_text(text)
    with pytest.raises(UserInputError, match="mapping") as info:
        load_experiment(spec)
    assert str(spec) in str(info.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("tasks: [a]\nscenari: class\n")
    with pytest.raises(UserInputError) as info:
        load_experiment(spec)
    assert str(spec) in str(info.value) and "'scenari'" in str(info.value)


def test_relative_task_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "Dataset001_A").mkdir(parents=True)
    (data / "Dataset002_B").mkdir()
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = specs / "exp.yaml"
    spec.write_text("tasks:\n  - ../data/Dataset001_A\n  - ../data/Dataset002_B\n  - Dataset003_ByName\n"
                    "raw_root: ../data\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # must not matter
    exp = load_experiment(Path("..") / "specs" / "exp.yaml")
    assert exp.tasks[:2] == [str((data / "Dataset001_A").resolve()), str((data / "Dataset002_B").resolve())]
    assert exp.tasks[2] == "Dataset003_ByName"
    assert exp.raw_root == str(data.resolve())


def test_absolute_task_paths_are_kept(tmp_path):
    folder = tmp_path / "Dataset001_A"
    folder.mkdir()
    spec = tmp_path / "sub" / "exp.yaml"
    spec.parent.mkdir()
    spec.write_text(f"tasks: ['{folder}']\n")
    assert load_experiment(spec).tasks == [str(folder.resolve())]
