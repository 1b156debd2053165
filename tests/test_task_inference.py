"""Task inference on constructed images (no network, no training): two clearly different synthetic sites, the stored
description's size and content, the out-of-distribution flag, and where the threshold comes from."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lifelong_nnunet import task_inference as ti
from lifelong_nnunet.methods import Stage
from lifelong_nnunet.run_folder import RunFolder
from lifelong_nnunet.stages import description

SHAPE = (1, 12, 12, 12)


def site_image(rng: np.random.Generator, site: str) -> np.ndarray:
    """A z-scored two-tissue image: site A mostly dark tissue with a bright minority, site B the inverted contrast
    (bright majority, dark minority), as T1- and T2-like acquisitions look after nnU-Net's normalisation. The share
    stays clear of every quantile level (0.25, 0.5): a quantile at the step between two noise-free tissues jumps."""
    share = rng.uniform(0.28, 0.45)
    bright = rng.random(SHAPE) < (share if site == "A" else 1 - share)
    levels = (-0.6, 1.4) if site == "A" else (-1.4, 0.6)
    image = np.where(bright, levels[1], levels[0]) + rng.normal(0, 0.15, SHAPE)
    return ((image - image.mean()) / image.std()).astype(np.float32)


def descriptions(rng, n=10) -> dict[str, ti.StageDescription]:
    return {s: ti.fit_description(s, [ti.image_features(site_image(rng, s)) for _ in range(n)]) for s in "AB"}


def test_each_new_image_is_given_its_own_site():
    rng = np.random.default_rng(0)
    described = descriptions(rng)
    for site in "AB":
        for _ in range(10):
            choice = ti.choose(described, ti.image_features(site_image(rng, site)))
            assert choice.task == site
            assert choice.margin > 0 and not choice.ood  # new cases of a known site are not alarms
            assert choice.scores[site] == min(choice.scores.values())


def test_only_the_given_candidates_compete():
    rng = np.random.default_rng(1)
    described = descriptions(rng)
    choice = ti.choose(described, ti.image_features(site_image(rng, "A")), tasks=["B"])
    assert choice.task == "B" and choice.margin == float("inf")
    assert choice.ood  # an A image is far beyond B's threshold


def test_an_image_unlike_any_stage_is_flagged():
    rng = np.random.default_rng(2)
    described = descriptions(rng)
    unlike = rng.uniform(-3, 3, SHAPE).astype(np.float32)  # flat histogram, no tissue at all
    choice = ti.choose(described, ti.image_features(unlike))
    assert choice.ood
    assert choice.scores[choice.task] > choice.threshold == described[choice.task].threshold


def test_the_stored_description_holds_parameters_only(tmp_path):
    rng = np.random.default_rng(3)
    images = [site_image(rng, "A") for _ in range(14)]
    described = {"A": ti.fit_description("A", [ti.image_features(x) for x in images])}
    run = RunFolder(tmp_path)
    run.write_task_description(1, described)
    path = run.task_description(1)
    d = len(ti.feature_names(1))
    # bound: d means + d*d covariances + a few scalars, at most ~40 characters each as indented JSON; one image
    # alone has 1728 voxels
    assert path.stat().st_size < 40 * (d + d * d + 20) < 40 * images[0].size
    stored = json.loads(path.read_text())["tasks"]["A"]
    assert set(stored) == {"task", "mean", "covariance", "threshold", "n_fit", "n_calibration", "features_version"}
    assert len(stored["mean"]) == d and all(len(row) == d for row in stored["covariance"]) and len(
        stored["covariance"]) == d
    voxels = {float(v) for x in images for v in x.ravel()}
    numbers = {float(v) for v in [*stored["mean"], *(v for r in stored["covariance"] for v in r)]}
    assert not numbers & voxels  # not one voxel value of the images made it into the file (exact floats)
    assert run.read_task_descriptions([1]) == described  # and it is the whole description


def test_a_missing_description_is_refused_naming_the_file_and_the_alternatives(tmp_path):
    from lifelong_nnunet.errors import UserInputError
    with pytest.raises(UserInputError, match=r"task_description.json is missing.*--task-choice entropy"):
        RunFolder(tmp_path).read_task_descriptions([1])


def test_threshold_is_calibrated_on_held_out_cases_by_leave_one_out():
    rng = np.random.default_rng(4)
    features = [ti.image_features(site_image(rng, "A")) for _ in range(10)]
    d = ti.fit_description("A", features)
    held_out = [ti.fit_description("A", features[:i] + features[i + 1:]) for i in range(len(features))]
    # each case scored by the Gaussian of the others (the same mean and covariance a fit without it gives)
    expected = ti.THRESHOLD_FACTOR * max(h.distance(f) for h, f in zip(held_out, features))
    assert d.threshold == pytest.approx(expected, rel=1e-9)
    assert d.threshold > ti.THRESHOLD_FACTOR * max(d.distance(f) for f in features)  # in-sample would be tighter
    assert (d.n_fit, d.n_calibration) == (10, 10)
    with pytest.raises(ValueError, match="3 at least"):
        ti.fit_description("A", features[:2])


def test_a_stage_is_described_from_its_training_cases_never_its_test_cases(tmp_path, monkeypatch):
    """A test case read at all fails the test; and test images far out (x100) would make the threshold huge if
    they were used."""
    rng = np.random.default_rng(5)
    train = [f"a_{i:03d}" for i in range(12)]
    test = ["a_100", "a_101"]
    images = {c: site_image(rng, "A") for c in train} | {c: 100 * site_image(rng, "A") for c in test}
    read = []

    def fake_read(folder, case):
        read.append(case)
        return images[case]
    monkeypatch.setattr("lifelong_nnunet.nnunet.trainer.read_preprocessed_image", fake_read)
    task = SimpleNamespace(name="A", train_cases=train, test_cases=test)
    ctx = SimpleNamespace(by_name={"A": task}, workspace=SimpleNamespace(preprocessed_folder=lambda t: tmp_path),
                          run=RunFolder(tmp_path), log=_Log())
    description.describe_stage(ctx, Stage(1, ("A",)))
    assert sorted(read) == sorted(train) and not set(read) & set(test)
    stored = RunFolder(tmp_path).read_task_descriptions([1])["A"]
    assert stored.n_fit == len(train)
    expected = ti.fit_description("A", [ti.image_features(images[c]) for c in train])
    assert stored.threshold == pytest.approx(expected.threshold, rel=1e-9)


class _Log:
    quiet = True

    def __call__(self, message: str) -> None:
        self.last = message


def test_a_training_case_that_is_also_a_test_case_is_refused(tmp_path):
    with pytest.raises(ValueError, match="also given as training cases"):
        description.describe_task("A", Path(tmp_path), ["a", "b", "c"], ["b"])


def test_features_are_the_same_for_any_large_image_up_to_striding():
    rng = np.random.default_rng(6)
    image = site_image(rng, "A")
    assert ti.image_features(image).shape == (len(ti.feature_names(1)),)
    two = np.concatenate([image, -image])  # one row of features per channel
    assert ti.image_features(two).shape == (len(ti.feature_names(2)),)
