"""Sweep comparison report rendered from a stored fixture of results, and the paired bootstrap behind its verdicts.

The fixture sweep is generated (never read from runs/): run folders in the runner's formats (experiment.json,
splits.json, schedule.json, results.csv, stages/stage_k/model.pt via run_folder.save_model, summary.json via the
project's own summarize), with result matrices chosen so every table value can be computed by hand.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.evaluation.comparison import (
    collect,
    load_sweep,
    method_table,
    pairwise_table,
    render_summary_png,
    write_comparison_report,
)
from lifelong_nnunet.evaluation.comparison.figures import Views
from lifelong_nnunet.evaluation.comparison.load import load_runs
from lifelong_nnunet.evaluation.stats import paired_bootstrap
from lifelong_nnunet.evaluation.summary import summarize
from lifelong_nnunet.io_utils import write_json
from lifelong_nnunet.methods import Stage
from lifelong_nnunet.run_folder import RESULT_COLUMNS, save_model

TASKS = ["Dataset901_SiteA", "Dataset902_SiteB", "Dataset903_SiteC"]
ORDERINGS = {"abc": TASKS, "cba": TASKS[::-1]}
SEEDS = [0, 1]
BASE_PARAMS = 24  # floating-point elements of _weights(0); the int64 bookkeeping buffer must not count

# Final row of R (by position in the run's order) of each sequential run; ewc = sequential + 0.1 everywhere.
SEQ_FINAL = {("abc", 0): [0.2, 0.3, 0.7], ("abc", 1): [0.3, 0.3, 0.9],
             ("cba", 0): [0.1, 0.2, 0.6], ("cba", 1): [0.3, 0.3, 0.6]}
JOINT_FINAL = {("abc", 0): 0.7, ("abc", 1): 0.8, ("cba", 0): 0.6}  # ("cba", 1) is unfinished
MISSING = [("ewc", "cba", 1), ("joint", "cba", 1)]  # ewc: folder never created; joint: killed after stage 0


def _weights(extra: int) -> dict[str, torch.Tensor]:
    w = {"enc.weight": torch.zeros(4, 3), "enc.bias": torch.zeros(4), "seg.weight": torch.zeros(2, 4),
         "norm.num_batches_tracked": torch.zeros((), dtype=torch.long)}
    if extra:
        w["head.weight"] = torch.zeros(extra)
    return w


def _chained_R(final: list[float]) -> np.ndarray:
    """T+1 x T: 0.05 before training, 0.8 right after learning, 0.1 before learning, 0.5 in between."""
    T = len(final)
    R = np.full((T + 1, T), 0.05)
    for i in range(1, T + 1):
        for j in range(T):
            R[i, j] = 0.8 if j == i - 1 else 0.1 if j > i - 1 else (final[j] if i == T else 0.5)
    R[T] = final
    return R


def _write_run(run_dir: Path, method: str, order: list[str], seed: int, R: np.ndarray, stages: list[Stage],
               extra_params, finished: bool = True) -> None:
    """A run folder as runner.run_experiment leaves it. R[stage][position]: each of two cases has two labels at
    value +-0.02 around the cell (so the mean per case, then per task, is the cell); IoU = Dice / 2."""
    run_dir.mkdir(parents=True)
    write_json(run_dir / "experiment.json", {"tasks": [f"/data/raw/{t}" for t in order], "method": method,
                                             "method_params": {}, "scenario": "domain", "seed": seed,
                                             "configuration": "3d_fullres"})
    write_json(run_dir / "splits.json", {t: [f"{t}_c1", f"{t}_c2"] for t in order})
    write_json(run_dir / "schedule.json", [asdict(s) for s in stages])
    save_model(run_dir / "stages" / "stage_0" / "model.pt", _weights(0), {}, {})
    if not finished:
        return
    rows = []
    for i in range(R.shape[0]):
        trained_on = "none" if i == 0 else stages[i - 1].label
        for j, task in enumerate(order):
            for case in (f"{task}_c1", f"{task}_c2"):
                for label, delta in (("a", 0.02), ("b", -0.02)):
                    v = R[i, j] + delta
                    rows += [[i, trained_on, task, case, label, "dice", v], [i, trained_on, task, case, label, "iou",
                                                                             v / 2]]
    for s in stages:
        save_model(run_dir / "stages" / f"stage_{s.index}" / "model.pt", _weights(extra_params(s.index)),
                   {}, {"stage": s.index, "trained_on": list(s.train_tasks), "train_seconds": 10.0 * s.index + seed,
                        "epochs": 1, "iterations_per_epoch": 1, "peak_rss_mb": 500.0 + s.index})
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(run_dir / "results.csv", index=False)
    write_json(run_dir / "summary.json", summarize(run_dir))


def build_sweep(root: Path) -> Path:
    entries = []
    for method in ("sequential", "ewc", "joint", "separate"):
        for ordering, order in ORDERINGS.items():
            for seed in SEEDS:
                rel = f"runs/{method}/{ordering}/seed{seed}"
                entries.append({"method": method, "ordering": ordering, "order": order, "seed": seed, "path": rel})
                if (method, ordering, seed) == MISSING[0]:
                    continue
                chained = [Stage(k + 1, (t,), "previous") for k, t in enumerate(order)]
                if method == "sequential":
                    _write_run(root / rel, method, order, seed, _chained_R(SEQ_FINAL[ordering, seed]), chained,
                               lambda k: 0)
                elif method == "ewc":
                    final = [v + 0.1 for v in SEQ_FINAL[ordering, seed]]
                    _write_run(root / rel, method, order, seed, _chained_R(final), chained, lambda k: 10 * k)
                elif method == "joint":
                    v = JOINT_FINAL.get((ordering, seed), 0.0)
                    R = np.array([[0.05] * 3, [v] * 3])
                    _write_run(root / rel, method, order, seed, R, [Stage(1, tuple(order), "initial", 3.0)],
                               lambda k: 0, finished=(ordering, seed) in JOINT_FINAL)
                else:  # separate: stage k is the specialist of the k-th task: 0.9 on it, 0.1 elsewhere
                    R = np.vstack([[0.05] * 3, np.where(np.eye(3, dtype=bool), 0.9, 0.1)])
                    _write_run(root / rel, method, order, seed, R,
                               [Stage(k + 1, (t,), "initial") for k, t in enumerate(order)], lambda k: 0)
    write_json(root / "sweep.json", {
        "spec": {"methods": ["sequential", "ewc", "joint", "separate"], "orderings": ORDERINGS, "seeds": SEEDS},
        "runs": entries,
        "commands": ["lifelong-nnunet sweep sweep.yaml -o fixture_sweep"],
        "versions": {"lifelong_nnunet": "0.1.0", "nnunetv2": "2.8.1", "torch": "2.13.0", "monai": "1.6.1",
                     "python": "3.12.0"}})
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Built once; tests that change it work on a copy."""
    return build_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def report(sweep) -> Path:
    return write_comparison_report(sweep)


@pytest.fixture
def sweep_copy(sweep, tmp_path) -> Path:
    return Path(shutil.copytree(sweep, tmp_path / "sweep"))


# ---------------------------------------------------------------- collect and the tables

def _row(df: pd.DataFrame, method: str, ordering: str, seed: int) -> pd.Series:
    hit = df[(df.method == method) & (df.ordering == ordering) & (df.seed == seed)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_collect_one_row_per_listed_run_with_hand_computed_values(sweep):
    df = collect(sweep)
    assert len(df) == 16
    assert sorted(map(tuple, df[df.status != "ok"][["method", "ordering", "seed"]].to_numpy())) == sorted(MISSING)
    assert df[df.status != "ok"]["final_average"].isna().all()

    seq = _row(df, "sequential", "cba", 0)  # final row [0.1, 0.2, 0.6]; learned at 0.8; 0.1 just before, 0.05 untrained
    assert seq.final_average == pytest.approx(0.3)
    assert seq.bwt == pytest.approx(np.mean([0.1 - 0.8, 0.2 - 0.8]))
    assert seq.forgetting == pytest.approx(np.mean([0.8 - 0.1, 0.8 - 0.2]))
    assert seq.fwt == pytest.approx(0.1 - 0.05)
    assert seq.gap_to_joint == pytest.approx(0.3 - 0.6)
    assert math.isnan(_row(df, "sequential", "cba", 1).gap_to_joint)  # its joint run is unfinished
    assert seq.train_seconds == pytest.approx(10 + 20 + 30)  # stage 0's info has none
    assert seq.peak_rss_mb == pytest.approx(503.0)

    assert _row(df, "sequential", "abc", 0).model_parameters == BASE_PARAMS
    assert _row(df, "ewc", "abc", 0).model_parameters == BASE_PARAMS + 30  # the last stage's model, not a sum
    assert _row(df, "joint", "abc", 0).model_parameters == BASE_PARAMS
    assert _row(df, "separate", "abc", 0).model_parameters == 3 * BASE_PARAMS  # one specialist per task
    sep = _row(df, "separate", "cba", 1)
    assert sep.final_average == pytest.approx(0.9)  # each task's own specialist, not the last stage's model
    assert math.isnan(sep.bwt) and math.isnan(sep.forgetting)


def test_method_table_mean_and_std_over_orderings_and_seeds(sweep):
    table = method_table(collect(sweep)).set_index("method")
    assert list(table.index) == ["sequential", "ewc", "joint", "separate"]
    seq, ewc, joint = table.loc["sequential"], table.loc["ewc"], table.loc["joint"]
    # sequential final averages 0.4, 0.5 (abc) and 0.3, 0.4 (cba)
    assert seq.final_average_mean == pytest.approx(0.4)
    assert seq.final_average_std == pytest.approx(math.sqrt((0.0**2 + 0.1**2 + 0.1**2 + 0.0**2) / 3))
    assert (seq.runs_listed, seq.runs_finished, seq.runs_missing) == (4, 4, 0)
    assert seq.train_seconds_mean == pytest.approx(61.5)  # 60 + seed
    assert seq.train_seconds_std == pytest.approx(math.sqrt(3.0))
    assert seq.gap_to_joint_mean == pytest.approx(-0.3) and seq.gap_to_joint_std == pytest.approx(0.0, abs=1e-12)
    assert seq.ordering_spread == pytest.approx(0.45 - 0.35)  # mean per ordering: abc 0.45, cba 0.35
    # ewc: 0.5, 0.6, 0.4 (cba seed 1 missing)
    assert ewc.final_average_mean == pytest.approx(0.5)
    assert ewc.final_average_std == pytest.approx(0.1)
    assert (ewc.runs_finished, ewc.runs_missing) == (3, 1)
    assert joint.final_average_mean == pytest.approx(0.7) and joint.runs_missing == 1
    assert math.isnan(joint.bwt_mean) and math.isnan(joint.forgetting_std)


def test_pairwise_table_pairs_only_runs_that_both_finished(sweep):
    pairs = pairwise_table(collect(sweep)).set_index(["method_a", "method_b"])
    assert len(pairs) == 6  # every pair of 4 methods
    p = pairs.loc[("sequential", "ewc")]
    assert p.n_pairs == 3  # ewc (cba, 1) never ran
    assert p.mean_diff == pytest.approx(-0.1)
    assert p.verdict == "B better"
    q = pairs.loc[("sequential", "joint")]
    assert q.n_pairs == 3 and q.verdict == "B better"


def test_heatmap_reindexes_permuted_orderings_by_task_name(sweep):
    views = Views(load_runs(sweep, load_sweep(sweep)["runs"], "dice"), "dice")
    assert views.tasks == TASKS  # columns in the first ordering
    assert views.row_labels["sequential"] == ["before", "stage 1", "stage 2", "stage 3"]  # no "delivered" row
    final_by_name = views.by_name["sequential"][3]
    # after stage 1, SiteA was just learned in abc (0.8) but not yet trained in cba (0.1); SiteB is 2nd in both
    assert views.by_name["sequential"][1] == pytest.approx([0.45, 0.1, 0.45])
    # SiteA is position 0 in abc (0.2, 0.3) and position 2 in cba (0.6, 0.6); SiteC the other way round
    assert final_by_name[0] == pytest.approx(np.mean([0.2, 0.3, 0.6, 0.6]))
    assert final_by_name[2] == pytest.approx(np.mean([0.7, 0.9, 0.1, 0.3]))
    # by position the first-trained task is always 0.8 right after its stage
    assert views.by_position["sequential"][0][1, 0] == pytest.approx(0.8)
    # separate delivers each task's specialist: an extra "delivered" row, not the last stage's row
    assert views.row_labels["separate"][-1] == "delivered"
    assert views.by_name["separate"][-1] == pytest.approx([0.9, 0.9, 0.9])


# ---------------------------------------------------------------- the HTML report

def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def test_report_is_self_contained_html_with_every_method_and_decodable_pngs(sweep, report):
    assert report == sweep / "comparison.html"
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for method in ("sequential", "ewc", "joint", "separate"):
        assert f"<td class='l'>{method}</td>" in text
    images = _pngs(text)
    assert len(images) == 3  # heatmaps, curves, ordering sensitivity
    for data in images:
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    # nothing loaded from elsewhere: every src/href is an embedded data URI, no scripts
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert all(v.startswith("data:") for v in re.findall(r"(?:src|href)=['\"]([^'\"]*)", text))
    # exact commands and versions
    assert "lifelong-nnunet sweep sweep.yaml -o fixture_sweep" in text
    for version in ("2.8.1", "2.13.0", "1.6.1", "3.12.0"):
        assert version in text


def test_report_table_shows_hand_computed_means_and_flags_missing_runs(sweep, report):
    text = report.read_text(encoding="utf-8")
    assert "0.400 &plusmn; 0.082" in text  # sequential final average
    assert "0.500 &plusmn; 0.100" in text  # ewc final average over its 3 finished runs
    assert "3 / 4 <span class='missing'>(1 missing)</span>" in text
    missing = text.split("Missing runs", 1)[1].split("</table>", 1)[0]
    assert str(sweep / "runs/ewc/cba/seed1") in missing and "run folder not created yet" in missing
    assert str(sweep / "runs/joint/cba/seed1") in missing and "no summary.json" in missing
    assert "ewc better" in text  # sequential vs ewc: every paired difference is -0.1


def test_report_writes_the_tables_as_csv(sweep, report):
    table = pd.read_csv(sweep / "comparison.csv").set_index("method")
    assert table.loc["sequential", "final_average_mean"] == pytest.approx(0.4)
    assert len(pd.read_csv(sweep / "comparison_runs.csv")) == 16
    assert len(pd.read_csv(sweep / "comparison_pairs.csv")) == 6


def test_report_renders_when_no_run_has_finished(tmp_path):
    (tmp_path / "runs").mkdir()
    write_json(tmp_path / "sweep.json", {"spec": {}, "runs": [
        {"method": "sequential", "ordering": "abc", "order": TASKS, "seed": 0, "path": "runs/sequential/abc/seed0"},
        {"method": "ewc", "ordering": "abc", "order": TASKS, "seed": 0, "path": "runs/ewc/abc/seed0"}],
        "commands": [], "versions": {}})
    text = write_comparison_report(tmp_path).read_text(encoding="utf-8")
    assert "2 missing" in text and "No run has finished yet" in text and "too few pairs" in text
    assert not _pngs(text)


def test_missing_sweep_json_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="sweep.json"):
        write_comparison_report(tmp_path)


def test_damaged_run_is_flagged_not_fatal(sweep_copy):
    (sweep_copy / "runs/ewc/abc/seed0/summary.json").write_text("{not json")
    df = collect(sweep_copy)
    assert _row(df, "ewc", "abc", 0).status == "unreadable"
    assert (df.status == "ok").sum() == 13
    assert "unreadable" in write_comparison_report(sweep_copy).read_text(encoding="utf-8")


def _edit_summary(path: Path, edit) -> None:
    summary = json.loads(path.read_text())
    edit(summary)
    write_json(path, summary)


def test_other_metrics_from_by_metric_or_results(sweep_copy):
    runs = sweep_copy / "runs/sequential/abc"
    # a summary without by_metric (written before it existed): IoU re-scored from results.csv (IoU = Dice / 2)
    _edit_summary(runs / "seed0/summary.json", lambda s: s.pop("by_metric", None))
    # a summary whose by_metric says otherwise than results.csv: the stored summary wins
    _edit_summary(runs / "seed1/summary.json", lambda s: s.update(by_metric={"iou": {
        **{k: s[k] for k in ("R", "final_per_task", "bwt", "fwt")}, "final_average": 0.123,
        "mean_forgetting": 0.321}}))
    iou = collect(sweep_copy, metric="iou")
    assert _row(iou, "sequential", "abc", 0).final_average == pytest.approx(0.2)
    assert _row(iou, "sequential", "abc", 1).final_average == pytest.approx(0.123)
    assert _row(iou, "sequential", "abc", 1).forgetting == pytest.approx(0.321)
    assert _row(iou, "sequential", "cba", 0).final_average == pytest.approx(0.15)
    assert "iou" in write_comparison_report(sweep_copy, metric="iou").read_text(encoding="utf-8")
    with pytest.raises(UserInputError, match="hd95"):
        collect(sweep_copy, metric="hd95")


def test_summary_png(sweep, tmp_path):
    out = render_summary_png(sweep, tmp_path / "comparison.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800


def test_rendering_needs_no_training_stack(sweep, tmp_path):
    """Re-rendering reads stored files only: nnU-Net itself is never imported."""
    code = ("import sys; from lifelong_nnunet.evaluation.comparison import write_comparison_report; "
            f"write_comparison_report({str(sweep)!r}, out={str(tmp_path / 'r.html')!r}); "
            "assert not any(m.startswith('nnunetv2') for m in sys.modules), 'nnunetv2 imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert (tmp_path / "r.html").is_file()


# ---------------------------------------------------------------- paired bootstrap

def test_bootstrap_ci_contains_true_difference():
    rng = np.random.default_rng(42)
    a = rng.uniform(0.3, 0.7, size=30)
    b = a - 0.2 + rng.normal(0.0, 0.05, size=30)  # true mean difference 0.2
    r = paired_bootstrap(a, b)
    assert r.ci_low < 0.2 < r.ci_high
    assert r.mean_diff == pytest.approx(np.mean(a - b))
    assert r.n_pairs == 30 and r.verdict == "A better"
    assert r.ci_high - r.ci_low < 0.1


def test_bootstrap_does_not_separate_differences_that_straddle_zero():
    b = np.array([0.5, 0.6, 0.4, 0.55])
    r = paired_bootstrap(b + np.array([0.1, -0.1, 0.05, -0.05]), b)
    assert r.mean_diff == pytest.approx(0.0)
    assert r.ci_low < 0 < r.ci_high
    assert r.verdict == "not separable"
    lopsided = paired_bootstrap(b + np.array([0.3, -0.1, 0.05, -0.05]), b)  # mean +0.05, still straddles 0
    assert lopsided.mean_diff == pytest.approx(0.05) and lopsided.verdict == "not separable"


def test_bootstrap_names_the_better_side_only_when_clear():
    b = np.array([0.30, 0.35, 0.40, 0.45, 0.50])
    up = paired_bootstrap(b + np.array([0.10, 0.12, 0.09, 0.11, 0.10]), b)
    assert up.verdict == "A better" and up.ci_low > 0
    assert paired_bootstrap(b, b + 0.1).verdict == "B better"
    assert paired_bootstrap(b + 0.1, b, higher_is_better=False).verdict == "B better"  # e.g. a distance
    assert paired_bootstrap(b, b).verdict == "not separable"  # identical methods


def test_bootstrap_too_few_pairs_nan_pairs_and_seeding():
    assert paired_bootstrap([0.5], [0.1]).verdict == "too few pairs"
    assert paired_bootstrap([], []).verdict == "too few pairs"
    r = paired_bootstrap([0.5, np.nan, 0.6], [0.1, 0.2, np.nan])  # only one complete pair
    assert r.n_pairs == 1 and r.verdict == "too few pairs" and math.isnan(r.ci_low)
    a, b = [0.5, 0.4, 0.7, 0.2], [0.45, 0.5, 0.6, 0.1]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    with pytest.raises(ValueError):
        paired_bootstrap([0.1, 0.2], [0.1])


def test_lower_is_better_metric_flips_verdicts_and_gap_sign(sweep_copy):
    """A distance stored with higher_is_better False: the smaller final average wins, and a gap to joint
    below the joint's distance is positive (better), as in the run summaries."""
    for path in sweep_copy.glob("runs/*/*/*/summary.json"):
        def add_hd95(s):
            s.setdefault("by_metric", {})["hd95"] = {**{k: s[k] for k in ("R", "final_per_task", "bwt", "fwt")},
                                                     "final_average": 10 * s["final_average"],
                                                     "higher_is_better": False}
        _edit_summary(path, add_hd95)
    df = collect(sweep_copy, metric="hd95")
    assert _row(df, "sequential", "abc", 0).gap_to_joint == pytest.approx(-(4.0 - 7.0))
    pairs = pairwise_table(df, "hd95").set_index(["method_a", "method_b"])
    assert pairs.loc[("sequential", "ewc")].verdict == "A better"  # ewc's distances are 1.0 larger
    assert "<b>hd95</b>, lower is better" in write_comparison_report(sweep_copy, metric="hd95").read_text()


# ---------------------------------------------------------------- figure layout

def _titles_outside(fig) -> list[str]:
    """Every title (axes titles, suptitles of the figure and its subfigures) whose drawn extent leaves the figure,
    measured by matplotlib's renderer after the layout has run (0.5 px of rounding allowed)."""
    fig.draw_without_rendering()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    figures = [fig, *fig.subfigs, *(s for f in fig.subfigs for s in f.subfigs)]
    titles = [ax.title for ax in fig.get_axes() if ax.get_visible()] + \
             [f._suptitle for f in figures if f._suptitle is not None]
    return [t.get_text() for t in titles if t.get_text() and not (
        t.get_window_extent(renderer).x0 >= box.x0 - 0.5 and t.get_window_extent(renderer).x1 <= box.x1 + 0.5
        and t.get_window_extent(renderer).y0 >= box.y0 - 0.5 and t.get_window_extent(renderer).y1 <= box.y1 + 0.5)]


@pytest.mark.parametrize("methods", [1, 4])
def test_sweep_figure_titles_lie_inside_their_figures(sweep, methods):
    """The long centred titles of the comparison's figures (ordering sensitivity, curves, heatmaps) used to be
    cut at both edges of a narrow figure; with one method every figure is at its narrowest."""
    from lifelong_nnunet.evaluation.comparison.figures import draw_curves, draw_heatmaps, draw_ordering, render
    runs = load_runs(sweep, load_sweep(sweep)["runs"], "dice")
    keep = list(dict.fromkeys(r.method for r in runs))[:methods]
    views = Views([r for r in runs if r.method in keep], "dice")
    for draw in (draw_ordering, draw_curves, draw_heatmaps):
        fig = render(draw, views)
        assert fig._suptitle is not None or fig.get_axes()[0].get_title()  # there is a title to check
        assert _titles_outside(fig) == [], draw.__name__


def test_run_figure_titles_lie_inside_their_figures(tmp_path):
    from lifelong_nnunet.evaluation.plots import plot_result_matrix
    R = pd.DataFrame([[0.1, 0.2]], index=[1], columns=["Dataset001_A", "Dataset002_B"])
    title = "frozen_encoder_decoders_with_a_long_name: mean normalised_surface_dice R[stage][task] of the run"
    fig = plot_result_matrix(R, tmp_path / "R.png", title)
    assert "\n" in fig.axes[0].get_title() and _titles_outside(fig) == []
