"""Evaluating one stage: every task's held-out test cases predicted by the stage's model and scored.

Each cell R[stage][task] has its own file (written atomically), so a resumed run, or `extend` adding a task, scores
exactly the cells still missing.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..console import progress_bar
from ..run_folder import RESULT_COLUMNS, load_model
from ..runner import known_labels_json
from .context import RunContext
from .resources import Session


def evaluate_stage(ctx: RunContext, index: int, trained_on: str) -> None:
    """Predict the test cases of every task not yet scored at stage ``index`` with that stage's model, one cell
    R[index][task] at a time. A task whose test files are gone is left out (its cell stays "not evaluated"),
    never scored as zero; an imported task has no test cases at all."""
    from ..evaluation.metrics import nsd_tolerances, score_case
    from ..nnunet.predictor import Segmenter, read_label
    from ..nnunet.trainer import build_network
    todo = [t for t in ctx.tasks if ctx.run.read_cell(index, t.name) is None]
    for t in [t for t in todo if t.missing_test_cases]:
        ctx.log(f"Stage {index}: {t.short_name} not evaluated: {len(t.missing_test_cases)} of its "
                f"{len(t.test_cases)} test case(s) are gone (e.g. {t.missing_test_cases[0]})")
    todo = [t for t in todo if t.evaluable]
    if not todo:
        return
    method, exp, labels = ctx.method, ctx.exp, ctx.labels
    net = build_network(ctx.plans, exp.configuration, ctx.dataset_json, deep_supervision=False)
    stored = load_model(ctx.run.model(index))
    if index > 0:
        method.load_state_dict(stored["method_state"])  # architecture choices the state records
    net = method.adapt_network(net, ctx.tasks_trained_by(index))
    net.load_state_dict(stored["network_weights"])
    dataset_json = known_labels_json(ctx.dataset_json, labels, ctx.tasks_trained_by(index))
    gate = merge_gate(ctx, net, index)
    session = Session(ctx.run, index, "evaluate", ctx.device)
    started, means, gated = time.time(), {}, {"cases": 0, "gated": 0, "ood": 0}
    with progress_bar(ctx.log.quiet) as bar:
        job = bar.add_task(f"Evaluating stage {index}", total=sum(len(t.test_cases) for t in todo), info="")
        for t in todo:
            rows = []
            seg = Segmenter(method.network_for_task(net, t.name), ctx.plans_for(t.name), exp.configuration,
                            dataset_json, ctx.device, exp.evaluation.mirroring, exp.evaluation.tile_step_size)
            for cid in t.test_cases:
                case = t.cases[cid]
                image, props = seg.read(list(case.images))
                if gate is not None:  # this image's decoders, from the stages' image descriptions
                    record = gate(seg.preprocess(image, props))
                    gated["cases"] += 1
                    gated["gated"] += bool(record["gated_out"])
                    gated["ood"] += record["ood"]
                pred = seg.predict_arrays(image, props)
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
            ctx.run.write_cell(index, t.name, df)
            session.save()  # after every cell: a kill keeps the time of the cells already scored
            means[t.short_name] = df[df.metric == "dice"].value.mean()
    ctx.log(f"Stage {index} evaluated in {time.time() - started:.0f} s: "
            + ", ".join(f"{k} Dice {v:.3f}" for k, v in means.items()))
    if gate is not None:
        ctx.log(f"Stage {index} merge gate: {gated['gated']} of {gated['cases']} test case(s) left out at least one "
                f"decoder, {gated['ood']} fit no task's images (every decoder kept)")


def merge_gate(ctx: RunContext, net, index: int):
    """`deploy.part_gate` for stage ``index``'s model, or None (logged when a stage lacks its description, or when
    the tasks normalise their images differently, so that one image's statistics cannot be set against every task's
    description)."""
    from ..deploy import part_gate, plans_for_images
    from ..errors import UserInputError
    from ..run_folder import RunFolderError
    seen = ctx.tasks_trained_by(index)
    try:
        gate = part_gate(ctx.run, ctx.method, net, seen, up_to_stage=index)
    except RunFolderError:
        ctx.log(f"Stage {index}: every decoder takes part in every image's merge (no gate): a stage up to {index} "
                f"has no description of its images (trained before the descriptions existed, or imported)")
        return None
    if gate is not None:
        try:
            plans_for_images(ctx.run.root, None, seen)  # refuses when the tasks normalise differently
        except UserInputError:
            ctx.log(f"Stage {index}: every decoder takes part in every image's merge (no gate): the tasks normalise "
                    f"their images differently")
            return None
    return gate
