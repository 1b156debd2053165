"""What the report tells a user beyond R (cost, data, stage 0, learned nothing, per structure) and `compare`, on
hand-made run folders: no training, a few seconds in all."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.evaluation.compare_runs import compare_runs, run_names, write_comparison
from lifelong_nnunet.evaluation.summary import write_summary_and_report
from lifelong_nnunet.io_utils import write_json
from lifelong_nnunet.methods import Stage
from lifelong_nnunet.run_folder import RESULT_COLUMNS, RunFolder, save_model
from lifelong_nnunet.stages.resources import Session

TASKS = ["Dataset911_Spine", "Dataset912_Lung"]
LABELS = {"Dataset911_Spine": ["vertebra", "disc"], "Dataset912_Lung": ["lesion", "vessel"]}
TRAIN = {t: [f"{t[11:].lower()}_{i:02d}" for i in range(5)] for t in TASKS}  # 5 training cases: 4 + 1 validation


def make_run(root: Path, dice: dict[tuple[int, str, str], float], method: str = "sequential",
             scenario: str = "class", test: dict[str, list[str]] | None = None) -> RunFolder:
    """A finished chained run over TASKS as the runner leaves it (format 1: no format.json). ``dice[(stage, task,
    label)]`` is that label's Dice in every test case (default 0.5); IoU is Dice / 2."""
    run = RunFolder(root)
    test = test or {t: [f"{t[11:].lower()}_t{i}" for i in range(2)] for t in TASKS}
    stages = [Stage(k + 1, (t,), "previous") for k, t in enumerate(TASKS)]
    write_json(run.spec, {"tasks": [f"/data/raw/{t}" for t in TASKS], "method": method, "method_params": {},
                          "scenario": scenario, "seed": 0, "configuration": "2d"})
    run.write_splits(test)
    run.write_schedule(stages)
    run.write_task_records({t: {"folder": f"/data/raw/{t}", "dataset_json": {"labels": {"background": 0}},
                                "n_cases": 7, "train_cases": TRAIN[t], "test_cases": test[t], "test_files": {}}
                            for t in TASKS})
    write_json(run.plans, {"configurations": {"2d": {"batch_size": 12}}})
    save_model(run.model(0), {"w": torch.zeros(2)}, {})
    for s in stages:
        save_model(run.model(s.index), {"w": torch.zeros(2)}, {}, {"stage": s.index, "trained_on": list(s.train_tasks),
                                                                   "epochs": 3, "iterations_per_epoch": 20,
                                                                   "augmentation_workers": 0})
    rows = [[i, "none" if i == 0 else f"{TASKS[i - 1]}", t, case, label, metric,
             dice.get((i, t, label), 0.5) * (1 if metric == "dice" else 0.5)]
            for i in range(len(TASKS) + 1) for t in TASKS for case in test[t] for label in LABELS[t]
            for metric in ("dice", "iou")]
    run.write_results(pd.DataFrame(rows, columns=RESULT_COLUMNS))
    return run


def session(run: RunFolder, stage: int, phase: str, seconds: float, rss: float, name: str) -> None:
    run.record_session(stage, {"session": name, "phase": phase, "seconds": seconds, "peak_rss_mb": rss,
                               "peak_gpu_mb": None, "device": "cpu (2 threads)"})


def learned_everything() -> dict:
    """Stage 0 at 0.3 (chance overlap of a large structure): each stage beats it on the task it trains."""
    return {**{(0, t, lbl): 0.3 for t in TASKS for lbl in LABELS[t]},
            **{(k + 1, t, lbl): 0.8 for k, t in enumerate(TASKS) for lbl in LABELS[t]}}


# ---- cost, budget and data ---------------------------------------------------------------------------------------
def test_a_resumed_stage_adds_up_its_sessions_and_the_missing_parts_are_named(tmp_path):
    run = make_run(tmp_path / "run", learned_everything())
    session(run, 0, "evaluate", 5.0, 900.0, "a")
    session(run, 1, "train", 30.0, 1000.0, "b")  # killed ...
    session(run, 1, "train", 50.0, 1200.0, "c")  # ... and resumed: both count
    session(run, 1, "evaluate", 6.0, 1200.0, "c-eval")
    session(run, 2, "evaluate", 7.0, 1100.0, "d")  # stage 2's training has no record (an older version trained it)
    summary = write_summary_and_report(run.root)
    res = summary["resources"]
    assert res["wall_seconds"] == pytest.approx(5 + 30 + 50 + 6 + 7)
    assert res["not_recorded"] == ["stage 2 training"] and res["peak_rss_mb"] == 1200.0
    assert [e["train_seconds"] for e in res["stages"]] == [None, 80.0, None]
    assert [e["sessions"] for e in res["stages"]] == [1, 3, 1]
    report = run.report.read_text()
    assert ("- **Wall time:** 98 s (training 80 s, evaluation 18 s; not recorded, so not in the total: stage 2 "
            "training)") in report
    assert "- **Peak memory:** 1200 MiB resident" in report and "- **Device:** cpu (2 threads) (requested: auto)" \
        in report
    assert "| 1 | 3 | 80 s | 6 s | 1200 MiB | — |" in report
    # the budget actually used, and the batch size nnU-Net planned (the spec left it open)
    assert ("- **Budget:** nnU-Net 2d, batch size 12 (nnU-Net's plan); epochs x iterations per epoch: stage 1: 3 x "
            "20, stage 2: 3 x 20") in report
    assert "- **Augmentation workers:** 0 (nnUNet_n_proc_DA" in report
    assert "| Dataset911_Spine | 4 | 1 | 2 | spine_t0, spine_t1 |" in report
    assert summary["data"]["Dataset912_Lung"] == {"n_train": 4, "n_validation": 1, "n_test": 2,
                                                  "test_cases": ["lung_t0", "lung_t1"], "imported": False,
                                                  "normalisation": None}
    assert json.loads(run.summary.read_text())["resources"] == res


def test_a_stage_imported_from_a_stock_model_is_not_counted_as_unrecorded_training(tmp_path):
    run = make_run(tmp_path / "run", learned_everything())
    save_model(run.model(1), {"w": torch.zeros(2)}, {}, {"stage": 1, "trained_on": [TASKS[0]],
                                                          "imported_from": "/models/fold_0/checkpoint_final.pth"})
    for index in (0, 1, 2):
        session(run, index, "evaluate", 2.0, 10.0, f"e{index}")
    session(run, 2, "train", 20.0, 10.0, "t2")
    summary = write_summary_and_report(run.root)
    assert summary["resources"]["not_recorded"] == [] and summary["resources"]["wall_seconds"] == 26.0
    report = run.report.read_text()
    assert "stage 1: imported (trained elsewhere), stage 2: 3 x 20" in report
    assert "| 1 | 1 | imported | 2 s | 10 MiB | — |" in report
    assert "| Dataset911_Spine | trained elsewhere | trained elsewhere | 2 | spine_t0, spine_t1 |" in report
    assert summary["data"]["Dataset912_Lung"]["n_train"] == 4  # the task trained here keeps its counts


def test_a_session_updates_its_own_entry_and_counts_every_earlier_one(tmp_path):
    run = RunFolder(tmp_path)
    session(run, 1, "train", 40.0, 100.0, "killed earlier")
    s = Session(run, 1, "train", torch.device("cpu"))
    s.save()
    s.save()  # after the next epoch: the same entry again, not a second one
    sessions = run.read_sessions(1)
    assert len(sessions) == 2 and sessions[1]["session"] == s.id and sessions[1]["peak_gpu_mb"] is None
    assert sessions[1]["peak_rss_mb"] > 10  # this process holds torch: tens of MiB at least, so MiB, not KiB or B
    assert s.phase_seconds() == pytest.approx(40.0 + sessions[1]["seconds"])
    Session(run, 1, "train", torch.device("cpu"), started=s.started).save()  # same process, same second: its own
    assert len(run.read_sessions(1)) == 3
    assert run.read_sessions(2) is None  # never recorded


# ---- stage 0, learned nothing, per structure ---------------------------------------------------------------------
def test_the_report_explains_stage_zero_and_shows_no_warning_when_every_stage_learned(tmp_path):
    run = make_run(tmp_path / "run", learned_everything())
    summary = write_summary_and_report(run.root)
    assert summary["warnings"] == [] and summary["learned_nothing"] == {"stages": [], "labels": []}
    report = run.report.read_text()
    assert "Warning" not in report
    assert "The row *before training* is the untrained model" in report and "not a result" in report


def test_a_stage_at_or_below_the_untrained_model_and_a_structure_never_found_are_warned(tmp_path, cli_in_process):
    dice = learned_everything()
    dice.update({(2, "Dataset912_Lung", "lesion"): 0.2, (2, "Dataset912_Lung", "vessel"): 0.4})  # mean 0.3 == R[0]
    dice.update({(i, "Dataset911_Spine", "disc"): 0.0 for i in (1, 2)})  # never segmented after training
    run = make_run(tmp_path / "run", dice)
    summary = write_summary_and_report(run.root)
    nothing = summary["learned_nothing"]
    assert nothing["stages"] == [{"stage": 2, "task": "Dataset912_Lung", "dice": pytest.approx(0.3),
                                  "untrained_dice": pytest.approx(0.3)}]
    assert nothing["labels"] == [{"task": "Dataset911_Spine", "label": "disc"}]
    assert len(summary["warnings"]) == 2
    stored = json.loads(run.summary.read_text())
    assert stored["warnings"] == summary["warnings"]
    report = run.report.read_text()
    assert report.index("> **Warning:** Stage 2 learned nothing on Dataset912_Lung") < report.index("## Result matrix")
    assert "Dataset911_Spine: 1 structure(s) scored Dice 0 in every test case after every stage: disc." in report
    # stage 1 trained the spine: 0.4 (mean of 0.8 and 0.0) beats the untrained 0.3, so no warning for stage 1
    assert "Stage 1 learned nothing" not in report
    code, _, err = cli_in_process("report", run.root)  # and the terminal says it too
    assert code == 0 and "Warning: Stage 2 learned nothing on Dataset912_Lung" in err


def test_per_structure_table_and_the_details_page(tmp_path):
    dice = learned_everything()
    dice[(2, "Dataset912_Lung", "vessel")] = 0.6
    run = make_run(tmp_path / "run", dice)
    write_summary_and_report(run.root)
    report = run.report.read_text()
    assert "| Dataset912_Lung | vessel | 0.600 |" in report and "| Dataset912_Lung | lesion | 0.800 |" in report
    assert "[report_details.md](report_details.md)" in report
    details = run.details_report.read_text()
    # every stage per structure: stage 0, after the spine (the lung not yet trained), after the lung
    assert "| Dataset912_Lung | vessel | 0.300 | 0.500 | 0.600 |" in details
    # every test case of the final model, one column per structure (a spine case has no lung structures)
    assert "| task | case | vertebra | disc | lesion | vessel |" in details
    assert "| Dataset912_Lung | lung_t1 | — | — | 0.800 | 0.600 |" in details


# ---- compare -----------------------------------------------------------------------------------------------------
def test_compare_puts_comparable_runs_side_by_side_and_refuses_another_test_split(tmp_path, cli_in_process):
    better = learned_everything()
    worse = {**better, **{(2, "Dataset911_Spine", lbl): 0.1 for lbl in LABELS["Dataset911_Spine"]}}
    a = make_run(tmp_path / "a" / "run", better)
    b = make_run(tmp_path / "b" / "run", worse, method="ewc")
    session(b, 1, "train", 125.0, 1.0, "x")
    summaries = compare_runs([a.root, b.root])
    assert list(summaries) == ["a/run (sequential)", "b/run (ewc)"]  # same folder names: their paths tell them apart
    folder = write_comparison(summaries, tmp_path / "cmp")
    md = folder.report.read_text()
    assert "| run | Final average | BWT | FWT | Mean forgetting | Plasticity | final Dataset911_Spine | final " \
           "Dataset912_Lung | wall time |" in md
    # sequential: the spine falls from 0.8 to the default 0.5 after the lung stage, so final average (0.5 + 0.8) / 2,
    # BWT 0.5 - 0.8; ewc (worse): 0.1 - 0.8. FWT: R[1][lung] 0.5 - R[0][lung] 0.3 for both
    assert "| a/run (sequential) | 0.650 | -0.300 | 0.200 | 0.300 | 0.800 | 0.500 | 0.800 | not recorded |" in md
    assert ("| b/run (ewc) | 0.450 | -0.700 | 0.200 | 0.700 | 0.800 | 0.100 | 0.800 | 125 s (2.1 min) (partly not "
            "recorded) |") in md
    assert folder.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    other = make_run(tmp_path / "c", better, test={t: [f"{t[11:].lower()}_t{i}" for i in (0, 5)] for t in TASKS})
    with pytest.raises(UserInputError, match="tested Dataset911_Spine on other cases"):
        compare_runs([a.root, b.root, other.root])
    out = tmp_path / "refused"
    code, _, err = cli_in_process("compare", a.root, b.root, other.root, "-o", out)
    assert code == 2 and "Traceback" not in err and "same test split" in err
    assert not out.exists()  # nothing half-written
    code, _, err = cli_in_process("compare", a.root, b.root)
    assert code == 0 and "b/run (ewc)" in err and "0.450" in err


def test_compare_refuses_another_scenario_one_run_and_a_run_given_twice(tmp_path):
    a = make_run(tmp_path / "a", learned_everything())
    domain = make_run(tmp_path / "d", learned_everything(), scenario="domain")
    with pytest.raises(UserInputError, match="domain-scenario run"):
        compare_runs([a.root, domain.root])
    with pytest.raises(UserInputError, match="two or more run folders"):
        compare_runs([a.root])
    with pytest.raises(UserInputError, match="more than once"):
        compare_runs([a.root, tmp_path / "a"])
    assert run_names([tmp_path / "x" / "seq", tmp_path / "y" / "ewc"]) == ["seq", "ewc"]


def test_on_cuda_a_session_records_the_gpu_peak_since_it_started(tmp_path, monkeypatch):
    """The CUDA path without a GPU: torch's peak statistics are reset when a session starts (so each session's peak
    is its own) and its peak allocation is stored in MiB, with the GPU's name as the device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    run = RunFolder(tmp_path)
    s = Session(run, 1, "train", torch.device("cuda", 0))
    assert calls == ["reset"]
    s.save()
    entry = run.read_sessions(1)[0]
    assert entry["peak_gpu_mb"] == 3072.0 and entry["device"] == "cuda:0 (NVIDIA H200)"
