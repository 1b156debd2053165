"""Task loading and every up-front data check: each bad input is a UserInputError naming the offending file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.tasks import (Case, LabelRegistry, Task, check_case, check_sequence, load_task, make_test_split,
                                   read_voxels, resolve_task_folder)


def _first_case(folder: Path) -> tuple[str, Path, Path]:
    label = sorted((folder / "labelsTr").glob("*.nii.gz"))[0]
    case_id = label.name[: -len(".nii.gz")]
    return case_id, folder / "imagesTr" / f"{case_id}_0000.nii.gz", label


def _edit_json(folder: Path, **changes) -> Path:
    path = folder / "dataset.json"
    djson = json.loads(path.read_text())
    djson.update(changes)
    path.write_text(json.dumps(djson))
    return path


def _check_all(task: Task) -> None:
    for case in task.cases.values():
        check_case(task, case)


def _raises_naming(path: Path, fn, *args) -> str:
    with pytest.raises(UserInputError) as info:
        fn(*args)
    message = str(info.value)
    assert str(path) in message, f"{path} not named in: {message}"
    return message


def _fake_task(n_cases: int, dataset_id: int = 5, labels: dict | None = None) -> Task:
    """A Task without files: enough for the split and registry logic."""
    cases = {f"case_{i:03d}": Case(f"case_{i:03d}", (Path(f"/nonexistent/case_{i:03d}_0000.nii.gz"),),
                                   Path(f"/nonexistent/case_{i:03d}.nii.gz")) for i in range(n_cases)}
    djson = {"channel_names": {"0": "MRI"}, "labels": labels or {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    return Task(Path(f"/nonexistent/Dataset{dataset_id:03d}_Fake"), djson, cases)


# ---- valid data --------------------------------------------------------------------------------------------------

def test_valid_synthetic_sites_load_and_pass_every_check(raw_sites):
    tasks = [load_task(f) for f in raw_sites]
    for t in tasks:
        assert len(t.cases) == 6
        assert t.num_channels == 1 and t.file_ending == ".nii.gz"
        assert t.labels == {"background": 0, "structure_a": 1, "structure_b": 2}
        _check_all(t)
    assert [t.dataset_id for t in tasks] == [901, 902]
    assert tasks[0].short_name == "SynthSiteA" and tasks[0].name == "Dataset901_SynthSiteA"
    check_sequence(tasks, "domain")
    check_sequence(tasks, "class")
    case = tasks[0].cases[sorted(tasks[0].cases)[0]]
    assert case.images[0].is_file() and case.label.is_file()


# ---- one folder --------------------------------------------------------------------------------------------------

def test_missing_dataset_json(raw_sites):
    (raw_sites[0] / "dataset.json").unlink()
    message = _raises_naming(raw_sites[0] / "dataset.json", load_task, raw_sites[0])
    assert "missing" in message


def test_invalid_dataset_json(raw_sites):
    path = raw_sites[0] / "dataset.json"
    path.write_text('{"channel_names": {"0": "MRI"}, "labels": ')
    message = _raises_naming(path, load_task, raw_sites[0])
    assert "JSON" in message


def test_dataset_json_missing_keys(raw_sites):
    path = raw_sites[0] / "dataset.json"
    djson = json.loads(path.read_text())
    del djson["file_ending"]
    path.write_text(json.dumps(djson))
    assert '"file_ending": ".nii.gz"' in _raises_naming(path, load_task, raw_sites[0])  # the value to add


def test_region_labels_are_rejected(raw_sites):
    path = _edit_json(raw_sites[0], labels={"background": 0, "whole": [1, 2]})
    assert "region-based" in _raises_naming(path, load_task, raw_sites[0])


def test_string_label_values_are_named_as_strings(raw_sites):
    path = _edit_json(raw_sites[0], labels={"background": 0, "structure_a": "1"})
    message = _raises_naming(path, load_task, raw_sites[0])
    assert "'structure_a' maps to \"1\"" in message and "region" not in message


def test_background_must_be_zero(raw_sites):
    path = _edit_json(raw_sites[0], labels={"structure_a": 1, "structure_b": 2})
    assert "background" in _raises_naming(path, load_task, raw_sites[0])


@pytest.mark.parametrize("subfolder", ["imagesTr", "labelsTr"])
def test_missing_training_subfolder(raw_sites, subfolder):
    shutil.rmtree(raw_sites[0] / subfolder)
    _raises_naming(raw_sites[0] / subfolder, load_task, raw_sites[0])


def test_no_label_files(raw_sites):
    for p in (raw_sites[0] / "labelsTr").iterdir():
        p.unlink()
    _raises_naming(raw_sites[0] / "labelsTr", load_task, raw_sites[0])


def test_label_without_its_image(raw_sites):
    _, image, label = _first_case(raw_sites[0])
    image.unlink()
    message = _raises_naming(image, load_task, raw_sites[0])
    assert str(label) in message


def test_image_without_its_label(raw_sites):
    _, image, label = _first_case(raw_sites[0])
    label.unlink()
    _raises_naming(image, load_task, raw_sites[0])


def test_folder_not_named_dataset_xxx(raw_sites):
    renamed = raw_sites[0].with_name("SynthSiteA")
    raw_sites[0].rename(renamed)
    message = _raises_naming(renamed, load_task, renamed)
    assert "DatasetXXX_Name" in message


@pytest.mark.parametrize("name", ["Dataset1_A", "Dataset0011_A", "Dataset011", "dataset011_A"])
def test_bad_dataset_folder_names(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    _raises_naming(folder, load_task, folder)


# ---- one case ----------------------------------------------------------------------------------------------------

def _rewrite_label(label: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), label)


def test_image_label_shape_mismatch(raw_sites):
    case_id, image, label = _first_case(raw_sites[0])
    _rewrite_label(label, np.zeros((20, 24, 24), dtype=np.uint8))
    task = load_task(raw_sites[0])
    message = _raises_naming(label, check_case, task, task.cases[case_id])
    assert str(image) in message and "shape" in message


def test_image_label_spacing_mismatch(raw_sites):
    case_id, image, label = _first_case(raw_sites[0])
    array = np.asanyarray(nib.load(label).dataobj).astype(np.uint8)
    _rewrite_label(label, array, spacing=(2.0, 1.0, 1.0))
    task = load_task(raw_sites[0])
    message = _raises_naming(label, check_case, task, task.cases[case_id])
    assert str(image) in message and "spacing" in message
    assert "(1.0, 1.0, 1.0) vs (2.0, 1.0, 1.0)" in message and "np.float64" not in message


def test_non_integer_label_values(raw_sites):
    case_id, _, label = _first_case(raw_sites[0])
    array = np.zeros((24, 24, 24), dtype=np.float32)
    array[10:14, 10:14, 10:14] = 0.5
    _rewrite_label(label, array)
    task = load_task(raw_sites[0])
    message = _raises_naming(label, check_case, task, task.cases[case_id])
    assert "non-integer" in message


def test_integer_valued_float_labels_are_accepted(raw_sites):
    case_id, _, label = _first_case(raw_sites[0])
    _rewrite_label(label, np.asanyarray(nib.load(label).dataobj).astype(np.float32))
    task = load_task(raw_sites[0])
    check_case(task, task.cases[case_id])


def test_truncated_uncompressed_nifti_is_refused(tmp_path):
    """SimpleITK reads a cut-off .nii as well as a cut-off .nii.gz without complaint (the rest comes back as zeros)."""
    path = tmp_path / "case_0000.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    assert read_voxels(path).sum() == 512
    path.write_bytes(path.read_bytes()[:-100])
    assert "truncated" in _raises_naming(path, read_voxels, path)


def test_scaled_nifti_is_read_scaled_in_float32(tmp_path):
    """CT is often int16 with scl_inter -1024: read as nnU-Net's reader sees it, without nibabel's float64 copy."""
    path = tmp_path / "ct_0000.nii.gz"
    image = nib.Nifti1Image(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, path)
    voxels = read_voxels(path)
    assert voxels.dtype == np.float32 and voxels.min() == -1024.0 and voxels.max() == 2 * 63 - 1024.0
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4)), path)
    assert read_voxels(path).dtype == np.int16  # unscaled: the stored type


def test_undeclared_label_value(raw_sites):
    case_id, _, label = _first_case(raw_sites[0])
    array = np.asanyarray(nib.load(label).dataobj).astype(np.uint8)
    array[0, 0, 0] = 7
    _rewrite_label(label, array)
    task = load_task(raw_sites[0])
    message = _raises_naming(label, check_case, task, task.cases[case_id])
    assert "[7]" in message and str(raw_sites[0] / "dataset.json") in message


def test_unreadable_image(raw_sites):
    case_id, image, _ = _first_case(raw_sites[0])
    image.write_bytes(b"not a nifti file")
    task = load_task(raw_sites[0])
    _raises_naming(image, check_case, task, task.cases[case_id])


# ---- the sequence ------------------------------------------------------------------------------------------------

def test_domain_scenario_needs_identical_labels(raw_sites):
    path = _edit_json(raw_sites[1], labels={"background": 0, "structure_a": 1, "structure_c": 2})
    tasks = [load_task(f) for f in raw_sites]
    message = _raises_naming(path, check_sequence, tasks, "domain")
    assert "class" in message  # it suggests the class-incremental scenario


def test_domain_scenario_rejects_renumbered_labels(raw_sites):
    path = _edit_json(raw_sites[1], labels={"background": 0, "structure_a": 2, "structure_b": 1})
    _raises_naming(path, check_sequence, [load_task(f) for f in raw_sites], "domain")


def test_class_scenario_accepts_different_labels(raw_sites):
    _edit_json(raw_sites[1], labels={"background": 0, "structure_a": 1, "structure_c": 2})
    check_sequence([load_task(f) for f in raw_sites], "class")


def test_channel_count_mismatch(raw_sites):
    folder = raw_sites[1]
    for image in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(image, image.with_name(image.name.replace("_0000.", "_0001.")))
    path = _edit_json(folder, channel_names={"0": "MRI", "1": "MRI2"})
    tasks = [load_task(f) for f in raw_sites]
    assert tasks[1].num_channels == 2
    message = _raises_naming(path, check_sequence, tasks, "class")
    assert "channel" in message


def test_file_ending_mismatch(raw_sites):
    path = _edit_json(raw_sites[1], file_ending=".nii")
    for p in (raw_sites[1] / "labelsTr").iterdir():
        p.rename(p.with_name(p.name[: -len(".gz")]))
    for p in (raw_sites[1] / "imagesTr").iterdir():
        p.rename(p.with_name(p.name[: -len(".gz")]))
    _raises_naming(path, check_sequence, [load_task(f) for f in raw_sites], "class")


def test_duplicate_dataset_ids(raw_sites):
    twin = raw_sites[0].with_name("Dataset901_Twin")
    shutil.copytree(raw_sites[0], twin)
    tasks = [load_task(raw_sites[0]), load_task(twin)]
    message = _raises_naming(twin, check_sequence, tasks, "domain")
    assert "901" in message and str(raw_sites[0]) in message


# ---- the test split ----------------------------------------------------------------------------------------------

def test_split_is_deterministic_for_a_seed(raw_sites):
    task = load_task(raw_sites[0])
    a = make_test_split(task, 0.25, 1, seed=0)
    assert a == make_test_split(load_task(raw_sites[0]), 0.25, 1, seed=0)
    assert len(a) == 2 and a == sorted(a) and set(a) <= set(task.cases)


def test_split_differs_for_another_seed():
    task = _fake_task(40)
    first = make_test_split(task, 0.25, 1, seed=0)
    assert len(first) == 10
    assert make_test_split(task, 0.25, 1, seed=1) != first


def test_split_depends_on_the_dataset_id():
    assert make_test_split(_fake_task(40, 5), 0.25, 1, 0) != make_test_split(_fake_task(40, 6), 0.25, 1, 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_test_cases_are_never_training_cases(raw_sites, seed):
    task = load_task(raw_sites[0])
    task.test_cases = make_test_split(task, 0.25, 1, seed)
    assert task.test_cases
    assert not set(task.test_cases) & set(task.train_cases)
    assert set(task.test_cases) | set(task.train_cases) == set(task.cases)


def test_split_respects_min_cases():
    task = _fake_task(10)
    assert len(make_test_split(task, 0.1, 1, 0)) == 1
    assert len(make_test_split(task, 0.1, 4, 0)) == 4
    assert len(make_test_split(task, 0.5, 2, 0)) == 5  # the fraction wins when it asks for more


def test_too_few_cases_for_the_split(raw_sites):
    task = load_task(raw_sites[0])  # 6 cases; 5 held out leaves 1 < 2 for training and validation
    message = _raises_naming(raw_sites[0], make_test_split, task, 0.25, 5, 0)
    assert "6 case(s)" in message and "min_cases" in message
    with pytest.raises(UserInputError):
        make_test_split(task, 0.9, 1, 0)
    assert len(make_test_split(task, 0.25, 4, 0)) == 4  # exactly 2 left is enough


# ---- labels across tasks -----------------------------------------------------------------------------------------

def test_label_registry_maps_reannotated_structures_to_their_global_id():
    reg = LabelRegistry()
    assert reg.add_task("T1", {"background": 0, "liver": 1, "tumor": 2}) == {0: 0, 1: 1, 2: 2}
    # tumor again (now value 1) keeps global ID 2; kidney is new and gets 3
    assert reg.add_task("T2", {"background": 0, "tumor": 1, "kidney": 2}) == {0: 0, 1: 2, 2: 3}
    assert reg.ids == {"background": 0, "liver": 1, "tumor": 2, "kidney": 3}
    assert reg.introduced_by == {"liver": "T1", "tumor": "T1", "kidney": "T2"}
    assert reg.foreground == {"liver": 1, "tumor": 2, "kidney": 3}
    assert reg.to_dict() == {"ids": reg.ids, "introduced_by": reg.introduced_by}


def test_label_registry_in_the_domain_scenario_is_the_first_tasks_labels():
    reg = LabelRegistry()
    labels = {"background": 0, "structure_a": 1, "structure_b": 2}
    assert reg.add_task("A", labels) == {0: 0, 1: 1, 2: 2}
    assert reg.add_task("B", labels) == {0: 0, 1: 1, 2: 2}
    assert reg.introduced_by == {"structure_a": "A", "structure_b": "A"}


# ---- finding a task ----------------------------------------------------------------------------------------------

def test_resolve_task_folder_by_path_name_and_id(raw_sites, monkeypatch):
    root = raw_sites[0].parent
    expected = raw_sites[0].resolve()
    assert resolve_task_folder(raw_sites[0]) == expected
    assert resolve_task_folder(str(raw_sites[0])) == expected
    assert resolve_task_folder("Dataset901_SynthSiteA", root) == expected
    assert resolve_task_folder("901", root) == expected
    assert resolve_task_folder(902, root) == raw_sites[1].resolve()
    assert resolve_task_folder("SynthSiteB", root) == raw_sites[1].resolve()  # the name without its ID
    monkeypatch.chdir(root)
    assert resolve_task_folder("Dataset902_SynthSiteB") == raw_sites[1].resolve()  # relative to the cwd


def test_resolve_task_folder_errors(raw_sites):
    root = raw_sites[0].parent
    with pytest.raises(UserInputError, match="Dataset999_Nope"):
        resolve_task_folder("Dataset999_Nope")
    with pytest.raises(UserInputError) as info:
        resolve_task_folder("999", root)
    assert str(root) in str(info.value)
    shutil.copytree(raw_sites[0], root / "Dataset901_Other")  # an ambiguous ID is not guessed
    with pytest.raises(UserInputError, match="Dataset901_Other, Dataset901_SynthSiteA"):
        resolve_task_folder("901", root)
    shutil.copytree(raw_sites[0], root / "Dataset905_SynthSiteA")  # nor an ambiguous name
    with pytest.raises(UserInputError, match="matches 2 datasets"):
        resolve_task_folder("SynthSiteA", root)


@pytest.mark.parametrize("channels, needed, fragment", [(1, 2, "Add the missing channels"),
                                                        (2, 1, "Remove the extra ones")])
def test_predict_inputs_with_the_wrong_number_of_channels(tmp_path, channels, needed, fragment):
    from lifelong_nnunet.deploy import find_inputs
    for c in range(channels):
        (tmp_path / f"case1_{c:04d}.nii.gz").write_bytes(b"")
    with pytest.raises(UserInputError) as err:
        find_inputs(tmp_path, needed, ".nii.gz")
    assert fragment in str(err.value) and "case1" in str(err.value)
