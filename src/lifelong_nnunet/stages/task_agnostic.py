"""Task-agnostic evaluation: every task's test cases scored with the head task inference chooses, not the oracle's.

The result matrix R[stage][task] gives each test case its own task's head (the oracle, as ``--task`` does). A
deployed model is not told the task, so for methods with per-task parts (``Method.infers_task``) each stage is also
scored the way `predict` runs without ``--task``: the head comes from the stages' image descriptions
(`deploy.task_chooser`, rule "description"). A case whose chosen head is the oracle's gets the oracle's scores
(the same network on the same image); only the other cases are predicted again. One file per cell
(`RunFolder.task_agnostic_cell`), with the chosen task and the OOD flag per case, so a resumed run scores only
what is missing.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..console import progress_bar
from ..run_folder import RESULT_COLUMNS, load_model
from ..runner import known_labels_json
from .context import RunContext

#: The columns of a task-agnostic cell: the result columns, and per case the chosen task and its OOD flag.
TASK_AGNOSTIC_COLUMNS = [*RESULT_COLUMNS, "chosen_task", "ood"]


def evaluate_task_agnostic(ctx: RunContext, index: int, trained_on: str) -> None:
    """Score every task already scored at stage ``index`` (its oracle cell exists) with the inferred head; nothing
    for methods without per-task parts, for stage 0 (no heads yet) or for cells already scored."""
    from ..deploy import task_chooser
    from ..evaluation.metrics import nsd_tolerances, score_case
    from ..nnunet.predictor import Segmenter, read_label
    from ..nnunet.trainer import build_network
    method, exp, labels = ctx.method, ctx.exp, ctx.labels
    if not method.infers_task or index == 0:
        return
    todo = [t for t in ctx.tasks if t.evaluable and ctx.run.read_cell(index, t.name) is not None
            and ctx.run.read_task_agnostic_cell(index, t.name) is None]
    if not todo:
        return
    seen = ctx.tasks_trained_by(index)
    stages = [s.index for s in ctx.schedule if s.index <= index and set(s.train_tasks) & set(seen)]
    missing = [i for i in stages if not ctx.run.task_description(i).is_file()]
    if missing:  # a stage trained before task inference existed: its images were never described
        ctx.log(f"Stage {index}: no task-agnostic evaluation: stage {missing[0]} has no description of its images "
                f"(trained before task inference existed); the result matrix uses the oracle head only")
        return
    from ..deploy import plans_for_images
    from ..errors import UserInputError
    try:  # an image of unknown task is normalised as every task's is: there must be one such normalisation
        plans = plans_for_images(ctx.run.root, None, seen)
    except UserInputError:
        ctx.log(f"Stage {index}: no task-agnostic evaluation: the tasks normalise their images differently, so an "
                f"image's task must be given (predict --task)")
        return
    net = build_network(ctx.plans, exp.configuration, ctx.dataset_json, deep_supervision=False)
    stored = load_model(ctx.run.model(index))
    method.load_state_dict(stored["method_state"])
    net = method.adapt_network(net, seen)
    net.load_state_dict(stored["network_weights"])
    dataset_json = known_labels_json(ctx.dataset_json, labels, seen)
    segmenters: dict[str, Segmenter] = {}

    def segmenter(task: str) -> Segmenter:
        if task not in segmenters:
            segmenters[task] = Segmenter(method.network_for_task(net, task), plans, exp.configuration,
                                         dataset_json, ctx.device, exp.evaluation.mirroring,
                                         exp.evaluation.tile_step_size)
        return segmenters[task]
    chooser = task_chooser(ctx.run, method, net, seen, "description",
                           lambda m: Segmenter(m, plans, exp.configuration, dataset_json, ctx.device),
                           up_to_stage=index)
    started, right, total = time.time(), 0, 0
    with progress_bar(ctx.log.quiet) as bar:
        job = bar.add_task(f"Task-agnostic evaluation, stage {index}", total=sum(len(t.test_cases) for t in todo),
                           info="")
        for t in todo:
            oracle = ctx.run.read_cell(index, t.name)
            oracle_head = t.name if t.name in seen else seen[-1]  # `network_for_task`: the newest head when untrained
            rows = []
            for cid in t.test_cases:
                case = t.cases[cid]
                image, props = segmenter(oracle_head).read(list(case.images))
                choice = chooser(image, props)
                if choice.task == oracle_head:
                    scored = oracle[oracle.case.astype(str) == str(cid)].to_dict("records")
                else:
                    pred = segmenter(choice.task).predict_arrays(image, props)
                    ref = read_label(case.label)
                    if labels.is_class_incremental:  # the task's local values -> global IDs of the model
                        ref = np.asarray(labels.lut(t.name))[ref.astype(np.int64)]
                    ev, wanted = exp.evaluation, labels.eval_labels(t.name)
                    scored = [{"stage": index, "trained_on": trained_on, "eval_task": t.name, "case": cid, **row}
                              for row in score_case(pred, ref, wanted, ev.metrics, spacing=props["spacing"],
                                                    nsd_tolerance_mm=nsd_tolerances(
                                                        ev.nsd_tolerance_mm, list(wanted),
                                                        [n for x in ctx.tasks for n in x.labels]))]
                rows += [{**r, "chosen_task": choice.task, "ood": choice.ood} for r in scored]
                if t.name in seen:
                    right, total = right + (choice.task == t.name), total + 1
                bar.advance(job, 1)
            ctx.run.write_task_agnostic_cell(index, t.name, pd.DataFrame(rows, columns=TASK_AGNOSTIC_COLUMNS))
    accuracy = f"{right}/{total} trained tasks' cases got their own head" if total else "no trained task to check"
    ctx.log(f"Stage {index} task-agnostic evaluation in {time.time() - started:.0f} s: {accuracy}")

