"""Evaluating one stage: every task's held-out test cases predicted by the stage's model and scored.

A stage counts as done only once its evaluation file exists (written atomically), so this is the last step of a
stage and the one a resumed run checks.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..console import progress_bar
from ..run_folder import RESULT_COLUMNS, load_model
from ..runner import known_labels_json
from .context import RunContext


def evaluate_stage(ctx: RunContext, index: int, trained_on: str) -> None:
    """Predict every task's test cases with the model of stage ``index`` and score them into its eval file."""
    from ..evaluation.metrics import nsd_tolerances, score_case
    from ..nnunet.predictor import Segmenter, read_label
    from ..nnunet.trainer import build_network
    out = ctx.run.stage_eval(index)
    if out.is_file():
        return
    method, exp, labels = ctx.method, ctx.exp, ctx.labels
    net = build_network(ctx.plans, exp.configuration, ctx.dataset_json, deep_supervision=False)
    stored = load_model(ctx.run.model(index))
    if index > 0:
        method.load_state_dict(stored["method_state"])  # architecture choices the state records
    net = method.adapt_network(net, ctx.tasks_trained_by(index))
    net.load_state_dict(stored["network_weights"])
    dataset_json = known_labels_json(ctx.dataset_json, labels, ctx.tasks_trained_by(index))
    rows = []
    n_cases = sum(len(t.test_cases) for t in ctx.tasks)
    started = time.time()
    with progress_bar(ctx.log.quiet) as bar:
        job = bar.add_task(f"Evaluating stage {index}", total=n_cases, info="")
        for t in ctx.tasks:
            seg = Segmenter(method.network_for_task(net, t.name), ctx.workspace.plans(t), exp.configuration,
                            dataset_json, ctx.device, exp.evaluation.mirroring, exp.evaluation.tile_step_size)
            for cid in t.test_cases:
                case = t.cases[cid]
                pred, props = seg.predict_files(list(case.images))
                ref = read_label(case.label)
                if labels.is_class_incremental:  # the task's local values -> global IDs of the model
                    ref = np.asarray(labels.lut(t.name))[ref.astype(np.int64)]
                ev, scored = exp.evaluation, labels.eval_labels(t.name)
                for row in score_case(pred, ref, scored, ev.metrics, spacing=props["spacing"],  # z, y, x as pred
                                      nsd_tolerance_mm=nsd_tolerances(ev.nsd_tolerance_mm, list(scored),
                                                                      [n for x in ctx.tasks for n in x.labels])):
                    rows.append({"stage": index, "trained_on": trained_on, "eval_task": t.name, "case": cid, **row})
                bar.advance(job, 1)
                bar.update(job, info=t.short_name)
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    ctx.run.write_stage_eval(index, df)
    mean = df[df.metric == "dice"].groupby("eval_task").value.mean()
    ctx.log(f"Stage {index} evaluated in {time.time() - started:.0f} s: "
            + ", ".join(f"{ctx.by_name[k].short_name} Dice {v:.3f}" for k, v in mean.items()))
