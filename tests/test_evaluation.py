"""Evaluation: per-case scores, result matrix, continual metrics, reference gaps, plots, report."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lifelong_nnunet.evaluation.continual import (
    continual_metrics,
    reference_gaps,
    result_matrix,
    stage_labels,
)
from lifelong_nnunet.evaluation.metrics import score_case
from lifelong_nnunet.evaluation.plots import (
    plot_method_comparison,
    plot_result_matrix,
    plot_task_curves,
)
from lifelong_nnunet.evaluation.report import (
    render_comparison_markdown,
    render_markdown,
)


def _scores(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["label"], r["metric"]): r["value"] for r in rows}


# ---------------------------------------------------------------- score_case

def test_overlapping_blobs_dice_half_iou_third():
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, 0:4] = 1  # 4 voxels
    pred[0, 0, 2:4] = 1  # 2 of them ...
    pred[0, 1, 0:2] = 1  # ... plus 2 outside: 4 voxels, overlap 2
    s = _scores(score_case(pred, ref, {"background": 0, "liver": 1}))
    assert set(s) == {("liver", "dice"), ("liver", "iou")}  # background is not scored
    assert s[("liver", "dice")] == pytest.approx(0.5)  # 2*2 / (4+4)
    assert s[("liver", "iou")] == pytest.approx(1 / 3)  # 2 / (4+4-2)
    assert all(type(v) is float for v in s.values())


def test_empty_label_convention_and_multi_label():
    ref = np.zeros((3, 3, 3), dtype=np.int16)
    pred = np.zeros_like(ref)
    ref[0] = 1
    pred[0] = 1  # label 1: perfect
    pred[2, 2, 2] = 3  # label 3: predicted but absent from the reference
    ref[1, 1, 1] = 4  # label 4: in the reference, missed
    s = _scores(score_case(pred, ref, {"a": 1, "b": 2, "c": 3, "d": 4}))
    assert s[("a", "dice")] == s[("a", "iou")] == 1.0
    assert s[("b", "dice")] == s[("b", "iou")] == 1.0  # absent from both: correct
    assert s[("c", "dice")] == s[("c", "iou")] == 0.0  # absent from reference but predicted
    assert s[("d", "dice")] == s[("d", "iou")] == 0.0
    assert not any(math.isnan(v) for v in s.values())


def test_score_case_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        score_case(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), {"a": 1})


# ---------------------------------------------------------------- result_matrix

def _results() -> pd.DataFrame:
    rows = [
        # stage 0, task A: case 1 labels (1.0, 0.5) -> 0.75; case 2 one label 0.25 -> mean over cases 0.5
        (0, "", "A", "c1", "l1", "dice", 1.0),
        (0, "", "A", "c1", "l2", "dice", 0.5),
        (0, "", "A", "c2", "l1", "dice", 0.25),
        (0, "", "A", "c1", "l1", "iou", 0.0),  # other metric: must not leak in
        (0, "", "B", "c1", "l1", "dice", 0.1),
        # stage 1 has no rows at all; stage 2 only evaluated task B
        (2, "B", "B", "c1", "l1", "dice", 0.9),
        (2, "B", "B", "c2", "l1", "dice", 0.7),
    ]
    return pd.DataFrame(rows, columns=["stage", "trained_on", "eval_task", "case", "label", "metric", "value"])


def test_result_matrix_case_mean_of_label_means():
    R = result_matrix(_results(), ["B", "A"])
    assert list(R.columns) == ["B", "A"]
    assert list(R.index) == [0, 1, 2]
    assert R.loc[0, "A"] == pytest.approx(0.5)  # not the label-pooled (1+0.5+0.25)/3
    assert R.loc[0, "B"] == pytest.approx(0.1)
    assert R.loc[2, "B"] == pytest.approx(0.8)
    assert math.isnan(R.loc[2, "A"]) and R.loc[1].isna().all()
    assert result_matrix(_results(), ["A"], metric="iou").loc[0, "A"] == 0.0


def test_stage_labels():
    assert stage_labels(_results()) == ["before training", "stage 1", "after B"]


# ---------------------------------------------------------------- continual_metrics

# T = 3; rows = stages 0..3, columns = tasks 1..3
R3 = np.array([
    [0.10, 0.20, 0.30],  # before training
    [0.90, 0.85, 0.35],  # after task 1
    [0.70, 0.80, 0.50],  # after task 2
    [0.60, 0.75, 0.90],  # after task 3
])
# final_average = (0.60 + 0.75 + 0.90) / 3 = 0.75
# plasticity    = (0.90 + 0.80 + 0.90) / 3 = 0.8666...
# bwt           = ((0.60 - 0.90) + (0.75 - 0.80)) / 2 = (-0.30 - 0.05) / 2 = -0.175
# fwt           = ((R[1][2] - R[0][2]) + (R[2][3] - R[0][3])) / 2 = ((0.85 - 0.20) + (0.50 - 0.30)) / 2 = 0.425
# forgetting_1  = max(0.90, 0.70) - 0.60 = 0.30
# forgetting_2  = max over stages >= 2 only: 0.80 - 0.75 = 0.05 (stage 1's 0.85 came before task 2 was learned)
# mean_forgetting = (0.30 + 0.05) / 2 = 0.175


def test_continual_metrics_hand_computed():
    m = continual_metrics(R3)
    assert m["n_tasks"] == 3
    assert m["final_average"] == pytest.approx(0.75)
    assert m["final_per_task"] == pytest.approx([0.60, 0.75, 0.90])
    assert m["plasticity"] == pytest.approx(2.6 / 3)
    assert m["bwt"] == pytest.approx(-0.175)
    assert m["fwt"] == pytest.approx(0.425)
    assert m["forgetting"] == pytest.approx([0.30, 0.05])
    assert m["mean_forgetting"] == pytest.approx(0.175)
    json.dumps(m, allow_nan=False)


def test_a_task_that_improves_later_has_negative_forgetting():
    """The max runs over the stages before the last: task 1 peaks at the final stage (backward transfer), so its
    forgetting is negative, 0.5 - 0.9. A max that included the final stage would say 0 and hide the gain."""
    R = np.array([[0.1, 0.1, 0.1],
                  [0.5, 0.2, 0.1],
                  [0.4, 0.7, 0.2],
                  [0.9, 0.6, 0.8]])
    m = continual_metrics(R)
    assert m["forgetting"] == pytest.approx([0.5 - 0.9, 0.7 - 0.6])
    assert m["mean_forgetting"] == pytest.approx((-0.4 + 0.1) / 2)
    assert m["bwt"] == pytest.approx(((0.9 - 0.5) + (0.6 - 0.7)) / 2)
    hd = continual_metrics(-R, higher_is_better=False)  # oriented: the same numbers for a lower-is-better metric
    assert hd["forgetting"] == pytest.approx(m["forgetting"]) and hd["bwt"] == pytest.approx(m["bwt"])


def test_single_task_has_no_transfer_or_forgetting():
    m = continual_metrics(np.array([[0.2], [0.8]]))
    assert m["final_average"] == pytest.approx(0.8) and m["plasticity"] == pytest.approx(0.8)
    assert m["bwt"] is None and m["fwt"] is None
    assert m["forgetting"] is None and m["mean_forgetting"] is None


def test_nan_cells_give_none_never_nan():
    R = R3.copy()
    R[0, 1] = np.nan  # task 2 not evaluated before training -> fwt undefined
    R[3, 0] = np.nan  # task 1 missing at the end
    m = continual_metrics(R)
    assert m["fwt"] is None and m["final_average"] is None and m["bwt"] is None
    assert m["forgetting"] == [None, pytest.approx(0.05)] and m["mean_forgetting"] is None
    assert m["final_per_task"][0] is None
    assert m["plasticity"] == pytest.approx(2.6 / 3)
    json.dumps(m, allow_nan=False)


def test_continual_metrics_rejects_bad_shape():
    with pytest.raises(ValueError):
        continual_metrics(np.zeros((3, 3)))


def test_continual_metrics_from_result_matrix_frame():
    R = pd.DataFrame(R3, columns=["t1", "t2", "t3"])
    assert continual_metrics(R.to_numpy())["bwt"] == pytest.approx(-0.175)


# ---------------------------------------------------------------- reference_gaps

def test_reference_gaps_arithmetic():
    g = reference_gaps({"a": 0.8, "b": 0.6}, {"a": 0.9, "b": 0.5}, 0.75)
    assert g["vs_separate"] == {"a": pytest.approx(-0.1), "b": pytest.approx(0.1)}
    assert g["mean_vs_separate"] == pytest.approx(0.0)
    assert g["final_average"] == pytest.approx(0.7)
    assert g["vs_joint"] == pytest.approx(-0.05)
    json.dumps(g, allow_nan=False)


def test_reference_gaps_missing_references():
    g = reference_gaps({"a": 0.8, "b": 0.6}, None, None)
    assert g["vs_separate"] == {"a": None, "b": None}
    assert g["mean_vs_separate"] is None and g["vs_joint"] is None
    g = reference_gaps({"a": 0.8, "b": 0.6}, {"a": 0.7}, 0.6)
    assert g["vs_separate"]["a"] == pytest.approx(0.1) and g["vs_separate"]["b"] is None
    assert g["mean_vs_separate"] is None
    assert g["vs_joint"] == pytest.approx(0.1)


# ---------------------------------------------------------------- plots and report

def _summary() -> dict:
    return {"method": "sequential", "tasks": ["t1", "t2", "t3"], **continual_metrics(R3),
            "reference_gaps": reference_gaps({"t1": 0.6, "t2": 0.75, "t3": 0.9}, {"t1": 0.95}, 0.875)}


ROW_LABELS = ["before training", "after t1", "after t2", "after t3"]


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    R = pd.DataFrame(R3, columns=["t1", "t2", "t3"])
    R.iloc[0, 2] = np.nan
    plot_result_matrix(R, tmp_path / "R.png", "sequential", row_labels=ROW_LABELS)
    plot_task_curves(R, tmp_path / "curves.png", ROW_LABELS, trained_stage={"t1": 1, "t2": 2, "t3": 3})
    joint = {"method": "joint", "tasks": ["t1", "t2", "t3"], "final_average": 0.875, "bwt": None,
             "final_per_task": [0.95, 0.8, 0.875]}
    plot_method_comparison({"sequential": _summary(), "joint": joint}, tmp_path / "cmp.png")
    for name in ("R.png", "curves.png", "cmp.png"):
        assert _is_png(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.png", "cmp.png", "curves.png"]  # no temp files left


def test_render_markdown_contains_numbers():
    R = pd.DataFrame(R3, columns=["t1", "t2", "t3"])
    R.iloc[0, 2] = np.nan
    md = render_markdown(_summary(), R, ROW_LABELS, {"Result matrix": "R.png"})
    assert "sequential" in md and "t1, t2, t3" in md
    assert "| after t1 | 0.900 | 0.850 | 0.350 |" in md
    assert "| before training | 0.100 | 0.200 | — |" in md
    assert "| BWT | -0.175 |" in md and "| FWT | 0.425 |" in md
    assert "| Final average | 0.750 |" in md and "| Mean forgetting | 0.175 |" in md
    assert "| t1 vs. separate | -0.350 |" in md and "| t2 vs. separate | — |" in md
    assert "| final average vs. joint (upper bound) | -0.125 |" in md
    assert "![Result matrix](R.png)" in md


def test_notes_of_what_a_method_could_not_do_reach_the_report():
    R = pd.DataFrame(R3, columns=["t1", "t2", "t3"])
    note = "t2: the full-size decoder was kept, not compressed: no student came within 0.01 Dice"
    md = render_markdown({**_summary(), "notes": [note]}, R, ROW_LABELS, {})
    assert "## Notes" in md and f"- {note}" in md
    assert "## Notes" not in render_markdown(_summary(), R, ROW_LABELS, {})  # nothing to say: no section


def test_render_comparison_markdown():
    joint = {"method": "joint", "tasks": ["t1", "t2", "t3"], "final_average": 0.875, "bwt": None,
             "final_per_task": [0.95, 0.8, 0.875], "resources": {"wall_seconds": 4000.0, "not_recorded": []}}
    md = render_comparison_markdown({"sequential": _summary(), "joint": joint}, {"comparison": "cmp.png"})
    assert ("| method | Final average | BWT | FWT | Mean forgetting | Plasticity | final t1 | final t2 | final t3 | "
            "wall time |" in md)
    assert "| sequential | 0.750 | -0.175 | 0.425 | 0.175 | 0.867 | 0.600 | 0.750 | 0.900 | not recorded |" in md
    assert "| joint | 0.875 | — | — | — | — | 0.950 | 0.800 | 0.875 | 4000 s (1.1 h) |" in md
    assert "![comparison](cmp.png)" in md


# ---------------------------------------------------------------- another headline metric

HD = np.array([[30.0, 30.0, 30.0], [4.0, 20.0, 18.0], [12.0, 4.0, 25.0], [10.0, 22.0, 5.0]])  # mm, lower = better


def test_plots_of_a_metric_in_mm(tmp_path):
    R = pd.DataFrame(HD, columns=["t1", "t2", "t3"])
    plot_result_matrix(R, tmp_path / "R.png", "hd95", ROW_LABELS, value_label="HD95 (mm)", vmax=None,
                       higher_is_better=False)
    plot_task_curves(R, tmp_path / "curves.png", ROW_LABELS, ylabel="HD95 (mm)", ylim=None)
    assert _is_png(tmp_path / "R.png") and _is_png(tmp_path / "curves.png")


def test_render_markdown_with_a_lower_is_better_headline():
    hd = {**continual_metrics(HD, higher_is_better=False), "R": HD.tolist(), "higher_is_better": False,
          "unit": "mm", "n_undefined": 2, "undefined": [[0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]]}
    dice = {**continual_metrics(R3), "higher_is_better": True, "unit": "", "n_undefined": 0}
    summary = {"method": "sequential", "tasks": ["t1", "t2", "t3"], "metric": "hd95",
               **{k: hd[k] for k in ("final_average", "final_per_task", "bwt", "fwt", "forgetting",
                                     "mean_forgetting", "plasticity")},
               "by_metric": {"dice": dice, "hd95": hd}}
    md = render_markdown(summary, pd.DataFrame(HD, columns=["t1", "t2", "t3"]), ROW_LABELS, {})
    assert "**Headline metric:** HD95 (mm)" in md and "Mean foreground HD95 (mm)" in md
    assert "| after t1 | 4.000 | 20.000 | 18.000 |" in md
    assert "| BWT | -12.000 | backward transfer" in md and "lower is better; negative = forgetting" in md
    assert "| Mean forgetting | 12.000 |" in md and "positive = worse" in md
    assert "2 (case, label) HD95 score(s) are undefined" in md and "| after t3 | 1 | 0 | 0 |" in md
    assert "| Dice | 0.750 | -0.175 | 0.425 | 0.175 | 0.867 | 0.600 | 0.750 | 0.900 | 0 |" in md
    assert "| HD95 (mm) | 12.333 | -12.000 | 7.500 | 12.000 | 4.333 | 10.000 | 22.000 | 5.000 | 2 |" in md


def test_render_markdown_without_by_metric_has_no_all_metrics_table():
    md = render_markdown(_summary(), pd.DataFrame(R3, columns=["t1", "t2", "t3"]), ROW_LABELS, {})
    assert "## All metrics" not in md and "**Headline metric:** Dice" in md


def test_cells_not_evaluated_are_left_out_of_the_means_and_counted():
    """A task whose test data were gone at some stages: its missing cells drop out of each mean (never read as 0)."""
    nan = float("nan")
    R = np.array([[0.1, 0.1, 0.1],
                  [0.8, 0.2, 0.1],
                  [0.6, 0.7, 0.2],
                  [0.5, 0.6, 0.9]])
    evaluated = np.ones_like(R, dtype=bool)
    evaluated[2:, 0] = False  # task 1's test cases deleted after stage 1
    R_missing = R.copy()
    R_missing[2:, 0] = nan
    m = continual_metrics(R_missing, evaluated=evaluated)
    assert m["n_not_evaluated"] == 2
    assert m["final_per_task"] == [None, 0.6, 0.9]
    assert m["final_average"] == pytest.approx((0.6 + 0.9) / 2)  # the two evaluated tasks, not (0 + .6 + .9) / 3
    assert m["bwt"] == pytest.approx(0.6 - 0.7)  # only task 2 has both cells
    assert m["forgetting"][0] is None and m["forgetting"][1] == pytest.approx(0.1)
    assert m["mean_forgetting"] == pytest.approx(0.1)
    assert m["fwt"] == pytest.approx(((0.2 - 0.1) + (0.2 - 0.1)) / 2)
    # the same NaN cells without the mask are undefined scores, not missing data: the aggregates become None
    unmasked = continual_metrics(R_missing)
    assert unmasked["final_average"] is None and unmasked["bwt"] is None and unmasked["n_not_evaluated"] == 0
