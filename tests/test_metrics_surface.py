"""Boundary metrics (NSD, HD95) on shapes with a known answer, spacing and axis order, the empty-label
convention, the spec fields that choose metrics, and the continual metrics per metric (HD95 sign convention)."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.evaluation.continual import (
    continual_metrics,
    reference_gaps,
    result_matrix,
    undefined_counts,
)
from lifelong_nnunet.evaluation.metrics import nsd_tolerances, score_case
from lifelong_nnunet.evaluation.summary import summarize, write_summary_and_report
from lifelong_nnunet.experiment import Evaluation, experiment_from_dict
from lifelong_nnunet.run_folder import migrate

ALL = ["dice", "iou", "nsd", "hd95"]


def _scores(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["label"], r["metric"]): r["value"] for r in rows}


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2).astype(np.uint8)


# ---------------------------------------------------------------- two offset spheres, analytic answers
#
# Two spheres of radius r whose centres are d apart. A point of one surface at angle theta from the offset
# direction lies |sqrt(r^2 + d^2 - 2 r d cos theta) - r| from the other surface; surface area is uniform in
# t = cos theta on [-1, 1], and the distance is <= tau exactly for t in [(d^2 - 2 r tau - tau^2) / (2 r d),
# (d^2 + 2 r tau - tau^2) / (2 r d)]. Both directions are alike by symmetry, so NSD(tau) is that interval's
# share of [-1, 1], HD95 the tau where the share reaches 0.95, and the largest distance is exactly d.

R_MM, D_MM, VOXEL_MM = 10.0, 4.0, 0.5


def _analytic_share(tau: float, r: float = R_MM, d: float = D_MM) -> float:
    lo = max(-1.0, (d * d - 2 * r * tau - tau * tau) / (2 * r * d))
    hi = min(1.0, (d * d + 2 * r * tau - tau * tau) / (2 * r * d))
    return max(0.0, hi - lo) / 2


def _analytic_hd95() -> float:
    lo, hi = 0.0, D_MM
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _analytic_share(mid) < 0.95 else (lo, mid)
    return hi


@pytest.fixture(scope="module")
def spheres() -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction: balls of 10 mm radius at 0.5 mm voxels, offset by 4 mm along the last axis."""
    r, d = R_MM / VOXEL_MM, D_MM / VOXEL_MM
    shape = (56, 56, 64)
    ref = _ball(shape, (28, 28, 32 - d / 2), r)
    pred = _ball(shape, (28, 28, 32 + d / 2), r)
    return pred, ref


def test_analytic_expectations_are_what_the_tests_assume():
    assert _analytic_share(2.0) == pytest.approx(0.5, abs=1e-6)  # ~ tau / d for d << r
    assert _analytic_share(D_MM) == pytest.approx(1.0)
    assert _analytic_hd95() == pytest.approx(3.8, abs=1e-3)


def test_offset_spheres_hd95_and_dice(spheres):
    pred, ref = spheres
    s = _scores(score_case(pred, ref, {"ball": 1}, ALL, spacing=(VOXEL_MM,) * 3))
    # Dice of two spheres d apart: lens volume pi (4r + d)(2r - d)^2 / 12 over a sphere's volume
    lens = math.pi * (4 * R_MM + D_MM) * (2 * R_MM - D_MM) ** 2 / 12
    assert s[("ball", "dice")] == pytest.approx(lens / (4 / 3 * math.pi * R_MM**3), abs=0.01)
    assert s[("ball", "hd95")] == pytest.approx(_analytic_hd95(), abs=VOXEL_MM)  # within one voxel
    assert s[("ball", "hd95")] <= D_MM + 1e-6  # no surface point is farther than the offset


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_offset_spheres_nsd_below_the_offset(spheres, tau):
    pred, ref = spheres
    s = _scores(score_case(pred, ref, {"ball": 1}, ["nsd"], spacing=(VOXEL_MM,) * 3, nsd_tolerance_mm=tau))
    assert s[("ball", "nsd")] == pytest.approx(_analytic_share(tau), abs=0.06)
    assert s[("ball", "nsd")] < 1.0


@pytest.mark.parametrize("tau", [D_MM, 5.0])
def test_offset_spheres_nsd_at_or_above_the_offset_is_one(spheres, tau):
    pred, ref = spheres
    s = _scores(score_case(pred, ref, {"ball": 1}, ["nsd"], spacing=(VOXEL_MM,) * 3, nsd_tolerance_mm=tau))
    assert s[("ball", "nsd")] == 1.0


def test_distances_scale_with_isotropic_spacing(spheres):
    pred, ref = spheres
    half = _scores(score_case(pred, ref, {"ball": 1}, ["hd95"], spacing=(VOXEL_MM,) * 3))
    double = _scores(score_case(pred, ref, {"ball": 1}, ["hd95"], spacing=(2 * VOXEL_MM,) * 3))
    assert double[("ball", "hd95")] == pytest.approx(2 * half[("ball", "hd95")])


# ---------------------------------------------------------------- anisotropic spacing, axis order
#
# A mask and its copy shifted by k voxels along one axis: every surface voxel's translate is a surface voxel
# of the other mask, and the extreme voxel in the shift direction is exactly k voxels from the other mask, so
# the largest surface distance is k * spacing[axis] mm. NSD is therefore exactly 1 at that tolerance and
# below 1 just under it; the shift along a 3 mm axis and along a 1 mm axis must give different answers.

SPACING = (3.0, 1.0, 1.0)  # mm per array axis (z, y, x as SimpleITKIO returns it)


def _shifted(axis: int, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    ref = _ball((24, 24, 24), (12, 12, 12), 6)
    return np.roll(ref, k, axis=axis), ref


def _nsd(pred, ref, tau, spacing=SPACING) -> float:
    return _scores(score_case(pred, ref, {"s": 1}, ["nsd"], spacing=spacing, nsd_tolerance_mm=tau))[("s", "nsd")]


def test_anisotropic_spacing_is_applied_per_array_axis():
    along_z, ref = _shifted(axis=0)  # 2 voxels of 3 mm = 6 mm
    along_x, _ = _shifted(axis=2)  # 2 voxels of 1 mm = 2 mm
    assert _nsd(along_x, ref, 2.0) == 1.0
    assert _nsd(along_z, ref, 2.0) < 0.9
    assert _nsd(along_z, ref, 6.0) == 1.0 and _nsd(along_z, ref, 5.9) < 1.0
    hd_z = _scores(score_case(along_z, ref, {"s": 1}, ["hd95"], spacing=SPACING))[("s", "hd95")]
    hd_x = _scores(score_case(along_x, ref, {"s": 1}, ["hd95"], spacing=SPACING))[("s", "hd95")]
    assert 2.0 < hd_z <= 6.0 and hd_x <= 2.0
    # the spacing in the other axis order swaps the answers: the order matters and is the array's
    assert _nsd(along_z, ref, 2.0, spacing=SPACING[::-1]) == 1.0


def test_simpleitk_spacing_reaches_score_case_in_array_order(tmp_path):
    """The runner passes SimpleITKIO's properties["spacing"] with its arrays; check that this is the array's
    axis order on an image whose slices are 3 mm apart (SimpleITK spacing x, y, z = 1, 1, 3)."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    along_z, ref = _shifted(axis=0)
    for name, arr in (("pred", along_z), ("ref", ref)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    pred_arr, props = SimpleITKIO().read_seg(str(tmp_path / "pred.nii.gz"))
    ref_arr, _ = SimpleITKIO().read_seg(str(tmp_path / "ref.nii.gz"))
    assert list(props["spacing"]) == [3.0, 1.0, 1.0]
    assert _nsd(pred_arr[0], ref_arr[0], 6.0, spacing=props["spacing"]) == 1.0
    assert _nsd(pred_arr[0], ref_arr[0], 2.0, spacing=props["spacing"]) < 0.9


# ---------------------------------------------------------------- empty labels, arguments

def test_empty_label_convention_for_every_metric():
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = 1
    pred[2:6, 2:6, 2:6] = 1  # a: perfect
    pred[7:9, 7:9, 7:9] = 3  # c: predicted only
    ref[8:10, 1:3, 8:10] = 4  # d: in the reference only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI is not asked about empty surfaces, so it cannot warn
        s = _scores(score_case(pred, ref, {"a": 1, "b": 2, "c": 3, "d": 4}, ALL, spacing=(1.0, 1.0, 1.0)))
    assert [s[("a", m)] for m in ALL] == [1.0, 1.0, 1.0, 0.0]
    assert [s[("b", m)] for m in ALL] == [1.0, 1.0, 1.0, 0.0]  # absent from both: correct
    for label in ("c", "d"):  # only one side has it
        assert [s[(label, m)] for m in ("dice", "iou", "nsd")] == [0.0, 0.0, 0.0]
        assert math.isnan(s[(label, "hd95")])


def test_rows_follow_the_requested_metrics_label_by_label():
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    ref[1:3, 1:3, 1:3], ref[3:5, 3:5, 3:5] = 1, 2
    rows = score_case(ref, ref, {"background": 0, "x": 1, "y": 2}, ["hd95", "dice"], spacing=[1, 1, 1])
    assert [(r["label"], r["metric"]) for r in rows] == [("x", "dice"), ("x", "hd95"), ("y", "dice"), ("y", "hd95")]
    assert all(type(r["value"]) is float for r in rows)


def test_boundary_metrics_need_a_valid_spacing():
    a = np.ones((4, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="spacing"):
        score_case(a, a, {"x": 1}, ["nsd"])
    with pytest.raises(ValueError, match="spacing"):
        score_case(a, a, {"x": 1}, ["hd95"], spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        score_case(a, a, {"x": 1}, ["hd95"], spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="unknown metric"):
        score_case(a, a, {"x": 1}, ["hd100"], spacing=(1.0, 1.0, 1.0))
    assert len(score_case(a, a, {"x": 1}, ["dice", "iou"])) == 2  # overlap metrics need no spacing


def test_per_label_tolerance():
    shape = (24, 24, 24)
    ref = _ball(shape, (7, 12, 12), 4) + 2 * _ball(shape, (17, 12, 12), 4)
    pred = np.roll(ref, 2, axis=2)  # both labels shifted by 2 mm
    s = _scores(score_case(pred, ref, {"a": 1, "b": 2}, ["nsd"], spacing=(1.0, 1.0, 1.0),
                           nsd_tolerance_mm={"a": 1.0, "default": 2.0}))
    assert s[("a", "nsd")] < 1.0 and s[("b", "nsd")] == 1.0


def test_tolerance_mapping_errors_name_the_labels():
    assert nsd_tolerances(1.5, ["a", "b"]) == {"a": 1.5, "b": 1.5}
    assert nsd_tolerances({"a": 1, "default": 3}, ["a", "b"], ["background", "a", "b"]) == {"a": 1.0, "b": 3.0}
    with pytest.raises(UserInputError, match=r"\['b'\].*default"):
        nsd_tolerances({"a": 1}, ["a", "b"])
    with pytest.raises(UserInputError, match="hipocampus"):  # a typo must not silently get the default
        nsd_tolerances({"hipocampus": 1, "default": 2}, ["hippocampus"], ["background", "hippocampus"])


# ---------------------------------------------------------------- spec fields

def test_evaluation_spec_defaults_and_choices():
    exp = experiment_from_dict({"tasks": ["a"]})
    assert exp.evaluation.metrics == ALL
    assert exp.evaluation.nsd_tolerance_mm == 2.0 and exp.evaluation.report_metric == "dice"
    exp = experiment_from_dict({"tasks": ["a"], "evaluation": {"metrics": ["dice", "hd95"], "report_metric": "hd95",
                                                               "nsd_tolerance_mm": {"x": 1, "default": 3}}})
    assert exp.evaluation.report_metric == "hd95"


@pytest.mark.parametrize("evaluation, fragment", [
    ({"metrics": ["dice", "hausdorff"]}, "hausdorff"),
    ({"metrics": []}, "non-empty"),
    ({"metrics": "dice"}, "list"),
    ({"metrics": ["dice", "dice"]}, "twice"),
    ({"metrics": ["dice"], "report_metric": "nsd"}, "report_metric"),
    ({"report_metric": "hd100"}, "report_metric"),
    ({"nsd_tolerance_mm": -1}, "nsd_tolerance_mm"),
    ({"nsd_tolerance_mm": True}, "nsd_tolerance_mm"),
    ({"nsd_tolerance_mm": {"a": "2mm"}}, "nsd_tolerance_mm"),
    ({"nsd_tolerance_mm": {}}, "nsd_tolerance_mm"),
])
def test_evaluation_spec_errors(evaluation, fragment):
    with pytest.raises(UserInputError, match=fragment):
        experiment_from_dict({"tasks": ["a"], "evaluation": evaluation})


def test_run_folders_from_before_the_new_fields_keep_their_identity():
    # what the experiment.json of a run from before these fields holds (format 1 left them out at their defaults)
    stored = {**experiment_from_dict({"tasks": ["a"]}).identity(),
              "evaluation": {"mirroring": False, "tile_step_size": 0.5}}
    stored.pop("plan_with")
    migrated = migrate("experiment", stored, 1)
    assert migrated["evaluation"] == asdict(Evaluation())
    assert experiment_from_dict({"tasks": ["a"]}).identity() == migrated  # resumes: same identity
    custom = experiment_from_dict({"tasks": ["a"], "evaluation": {"metrics": ["dice"]}}).identity()
    assert custom != migrated and custom["evaluation"]["metrics"] == ["dice"]  # what is computed differs
    assert experiment_from_dict(custom).identity() == custom
    assert migrate("experiment", custom, 1) == custom  # a complete record passes unchanged


# ---------------------------------------------------------------- continual metrics per metric

# HD95 in mm, T = 3 (rows: before training, after task 1..3). Lower is better.
HD = np.array([
    [30.0, 30.0, 30.0],
    [4.0, 20.0, 18.0],
    [12.0, 4.0, 25.0],
    [10.0, 22.0, 5.0],
])
# final_average = (10 + 22 + 5) / 3 = 12.333...; plasticity = (4 + 4 + 5) / 3 = 4.333...
# bwt = mean(R[j][j] - R[T][j]) = ((4 - 10) + (4 - 22)) / 2 = -12  (negative: got worse)
# fwt = mean(R[0][j] - R[j-1][j]) = ((30 - 20) + (30 - 25)) / 2 = 7.5  (positive: earlier tasks helped)
# forgetting_1 = R[3][1] - min(R[1][1], R[2][1]) = 10 - 4 = 6; forgetting_2 = 22 - 4 = 18; mean 12


def test_hd95_continual_metrics_hand_computed():
    m = continual_metrics(HD, higher_is_better=False)
    assert m["final_average"] == pytest.approx(37 / 3) and m["plasticity"] == pytest.approx(13 / 3)
    assert m["bwt"] == pytest.approx(-12.0)
    assert m["fwt"] == pytest.approx(7.5)
    assert m["forgetting"] == pytest.approx([6.0, 18.0]) and m["mean_forgetting"] == pytest.approx(12.0)


def test_orientation_makes_worse_read_the_same_for_every_metric():
    """A Dice-like matrix and an HD95-like matrix that get better and worse at the same places give
    transfer and forgetting of the same sign."""
    dice_like = 1.0 - HD / 40.0
    up, down = continual_metrics(dice_like), continual_metrics(HD, higher_is_better=False)
    for key in ("bwt", "fwt", "mean_forgetting"):
        assert np.sign(up[key]) == np.sign(down[key]) != 0
        assert up[key] == pytest.approx(down[key] / 40.0)
    assert down["forgetting"] == pytest.approx([40 * f for f in up["forgetting"]])


def test_hd95_reference_gaps_negative_means_worse():
    g = reference_gaps({"a": 10.0, "b": 22.0}, {"a": 5.0, "b": 30.0}, 12.0, higher_is_better=False)
    assert g["vs_separate"] == {"a": pytest.approx(-5.0), "b": pytest.approx(8.0)}
    assert g["final_average"] == pytest.approx(16.0) and g["vs_joint"] == pytest.approx(-4.0)


def _results_two_metrics() -> pd.DataFrame:
    """Two tasks A, B; dice and hd95 per (case, label); some HD95 NaN (label on one side only)."""
    rows = []
    dice = {0: (0.1, 0.1), 1: (0.8, 0.2), 2: (0.5, 0.9)}  # stage -> (A, B)
    hd = {0: (30.0, 30.0), 1: (3.0, 20.0), 2: (9.0, 2.0)}
    for stage in (0, 1, 2):
        for t, task in enumerate("AB"):
            for case in ("c1", "c2"):
                for label in ("x", "y"):
                    rows.append((stage, "none" if stage == 0 else "AB"[stage - 1], task, case, label, "dice",
                                 dice[stage][t]))
                    rows.append((stage, "none" if stage == 0 else "AB"[stage - 1], task, case, label, "hd95",
                                 hd[stage][t]))
    df = pd.DataFrame(rows, columns=["stage", "trained_on", "eval_task", "case", "label", "metric", "value"])
    # stage 2, task A: case c1 label y undefined (the mean must ignore it); case c2 entirely undefined
    nan_rows = (df.stage == 2) & (df.eval_task == "A") & (df.metric == "hd95") & ((df.case == "c2") | (df.label == "y"))
    df.loc[nan_rows, "value"] = math.nan
    df.loc[(df.stage == 2) & (df.eval_task == "A") & (df.metric == "hd95") & (df.case == "c1") & (df.label == "x"),
           "value"] = 7.0
    return df


def test_result_matrix_leaves_nan_scores_out_and_counts_them():
    df = _results_two_metrics()
    R = result_matrix(df, ["A", "B"], "hd95")
    assert R.loc[2, "A"] == pytest.approx(7.0)  # only c1/x is defined
    U = undefined_counts(df, ["A", "B"], "hd95")
    assert U.loc[2, "A"] == 3 and int(U.to_numpy().sum()) == 3
    assert int(undefined_counts(df, ["A", "B"], "dice").to_numpy().sum()) == 0


@pytest.fixture
def fake_run(tmp_path):
    """A finished two-task sequential run folder (results only, no models), written like the runner does."""
    run = tmp_path / "run"
    run.mkdir()
    _results_two_metrics().to_csv(run / "results.csv", index=False)
    (run / "experiment.json").write_text(json.dumps({
        "tasks": ["/d/A", "/d/B"], "method": "sequential", "scenario": "domain",
        "evaluation": {"mirroring": False, "tile_step_size": 0.5}}))
    (run / "splits.json").write_text(json.dumps({"A": ["c1", "c2"], "B": ["c1", "c2"]}))
    (run / "schedule.json").write_text(json.dumps([
        {"index": 1, "train_tasks": ["A"], "init": "previous", "budget": 1.0},
        {"index": 2, "train_tasks": ["B"], "init": "previous", "budget": 1.0}]))
    return run


def test_summary_keeps_dice_on_top_and_adds_by_metric(fake_run):
    s = summarize(fake_run)  # experiment.json from before report_metric existed: Dice
    assert s["metric"] == "dice" and s["R"][2] == pytest.approx([0.5, 0.9])
    assert s["final_average"] == pytest.approx(0.7) and s["bwt"] == pytest.approx(0.5 - 0.8)
    assert set(s["by_metric"]) == {"dice", "hd95"}
    hd = s["by_metric"]["hd95"]
    assert hd["higher_is_better"] is False and hd["unit"] == "mm"
    assert hd["final_per_task"] == pytest.approx([7.0, 2.0])
    assert hd["bwt"] == pytest.approx(3.0 - 7.0)  # A: 3 mm after learning it, 7 mm at the end: worse
    assert hd["forgetting"] == pytest.approx([4.0])
    assert hd["fwt"] == pytest.approx(30.0 - 20.0)
    assert hd["n_undefined"] == 3 and hd["undefined"][2] == [3, 0]
    assert s["by_metric"]["dice"]["bwt"] == s["bwt"]
    json.dumps(s, allow_nan=False)


def test_report_headline_metric_and_all_metrics_table(fake_run):
    s = write_summary_and_report(fake_run, metric="hd95")
    stored = json.loads((fake_run / "summary.json").read_text())
    assert stored["metric"] == "hd95" and stored["final_average"] == pytest.approx(4.5)
    assert stored["forgetting"] == pytest.approx([4.0]) and s["by_metric"]["dice"]["final_average"] == 0.7
    md = (fake_run / "report.md").read_text()
    assert "**Headline metric:** HD95 (mm)" in md and "Mean foreground HD95 (mm)" in md
    assert "3 (case, label) HD95 score(s) are undefined" in md
    assert "## All metrics" in md and "| Dice | 0.700 | -0.300 |" in md and "| HD95 (mm) | 4.500 | -4.000 |" in md
    assert (fake_run / "figures" / "result_matrix.png").is_file()
    write_summary_and_report(fake_run)  # the spec's headline again: Dice
    assert json.loads((fake_run / "summary.json").read_text())["metric"] == "dice"


def test_spec_report_metric_is_the_default_headline(fake_run):
    exp = json.loads((fake_run / "experiment.json").read_text())
    exp["evaluation"]["report_metric"] = "hd95"
    (fake_run / "experiment.json").write_text(json.dumps(exp))
    assert summarize(fake_run)["metric"] == "hd95"


def test_report_command_metric_option(fake_run, run_cli):
    result = run_cli("report", fake_run, "--metric", "nsd")
    assert result.returncode == 2 and "no 'nsd' scores" in result.stderr and "dice, hd95" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    result = run_cli("report", fake_run, "--metric", "hd95")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Final average HD95 4.500 mm" in result.stdout + result.stderr
    assert json.loads((fake_run / "summary.json").read_text())["metric"] == "hd95"


def test_a_one_slice_image_is_measured_in_its_plane():
    """nnU-Net reads a 2D image as (1, y, x) with a dummy slice spacing; its surfaces are in-plane contours."""
    yy, xx = np.indices((40, 40))
    ref = ((yy - 20) ** 2 + (xx - 18) ** 2 <= 100).astype(np.uint8)
    pred = np.roll(ref, 4, axis=1)  # 4 px of 0.5 mm = 2 mm
    flat = _scores(score_case(pred[None], ref[None], {"d": 1}, ["nsd", "hd95"], spacing=(999.0, 0.5, 0.5),
                              nsd_tolerance_mm=2.0))
    plane = _scores(score_case(pred, ref, {"d": 1}, ["nsd", "hd95"], spacing=(0.5, 0.5), nsd_tolerance_mm=2.0))
    assert flat == plane
    assert flat[("d", "nsd")] == 1.0 and 1.0 < flat[("d", "hd95")] <= 2.0
    assert _scores(score_case(pred[None], ref[None], {"d": 1}, ["nsd"], spacing=(999.0, 0.5, 0.5),
                              nsd_tolerance_mm=1.0))[("d", "nsd")] < 1.0
