"""How well a multi-head model picks its head by itself at prediction time, on its runs' test cases.

    .venv/bin/python benchmarks/head_choice.py runs/demo/multihead runs/demo/frozen_body [--name head_choice]

For every task's held-out test cases and both rules `predict` offers without `--task` (the stages' image
descriptions, the default, and the least uncertain head, the baseline): the head chosen, whether it is the case's
own task, the Dice with that head against the oracle head, the time the choice adds per case against the
prediction itself, whether the case was flagged out-of-distribution, and the storage of the descriptions per stage.
One image of uniform noise per run, and each site's test cases against the other sites' descriptions only (a site
never seen), check the OOD alarm. A run trained before task inference existed has its stages described here from
the cache workspace (each task's training cases, leave-one-out calibration, as `run` does).
Writes benchmarks/results/head_choice.{md,json}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lifelong_nnunet.deploy import _load_run_network, select_model, task_chooser
from lifelong_nnunet.evaluation.metrics import score_case
from lifelong_nnunet.io_utils import write_json, write_text
from lifelong_nnunet.names import short_task_name
from lifelong_nnunet.nnunet.env import resolve_device
from lifelong_nnunet.nnunet.planning import Workspace
from lifelong_nnunet.nnunet.predictor import Segmenter, read_label
from lifelong_nnunet.run_folder import RunFolder
from lifelong_nnunet.runner import default_cache_dir
from lifelong_nnunet.stages.description import describe_task
from lifelong_nnunet.tasks import load_task
from lifelong_nnunet.task_inference import TASK_CHOICES, choose, image_features


def mean_dice(pred, ref, labels) -> float:
    return float(np.mean([r["value"] for r in score_case(pred, ref, labels) if r["metric"] == "dice"]))


def describe_missing_stages(run: RunFolder, tasks: dict, cache_dir: Path | None) -> list[int]:
    """Describe the stages of a run trained before task inference existed, from its cache workspace."""
    exp, schedule = run.read_experiment(), run.read_schedule()
    missing = [s for s in schedule if not run.task_description(s.index).is_file()]
    if missing:
        workspace = Workspace(cache_dir or default_cache_dir(), list(tasks.values()),
                              exp.configuration, plan_with=exp.plan_with)
        for stage in missing:
            run.write_task_description(stage.index, {
                name: describe_task(name, workspace.preprocessed_folder(tasks[name]), tasks[name].train_cases,
                                    tasks[name].test_cases) for name in stage.train_tasks})
    return [s.index for s in missing]


def evaluate(run_dir: Path, cache_dir: Path | None = None) -> dict:
    run = RunFolder(run_dir)
    exp, splits = run.read_experiment(), run.read_splits()
    tasks = {}
    for folder, (name, cases) in zip(exp.tasks, splits.items()):
        tasks[name] = load_task(Path(folder))
        tasks[name].test_cases = cases
    described_here = describe_missing_stages(run, tasks, cache_dir)
    method, net, seen, plans, djson, _ = _load_run_network(run_dir, select_model(run_dir))
    device = resolve_device("auto")

    def make(module):
        return Segmenter(module, plans, exp.configuration, djson, device)
    segmenters = {t: make(method.network_for_task(net, t)) for t in seen}
    choosers = {rule: task_chooser(run, method, net, seen, rule, make) for rule in TASK_CHOICES}
    rows = []
    for name, t in tasks.items():
        labels = {k: v for k, v in t.labels.items() if v}
        for cid in t.test_cases:
            image, props = segmenters[name].read(list(t.cases[cid].images))
            ref = read_label(t.cases[cid].label)
            started = time.perf_counter()
            oracle = segmenters[name].predict_arrays(image, props)
            predict_seconds = time.perf_counter() - started
            dice = {name: mean_dice(oracle, ref, labels)}
            row = {"task": name, "case": cid, "dice_oracle": dice[name], "predict_seconds": predict_seconds}
            for rule, chooser in choosers.items():
                started = time.perf_counter()
                choice = chooser(image, props)
                row[f"{rule}_seconds"] = time.perf_counter() - started
                if choice.task not in dice:
                    dice[choice.task] = mean_dice(segmenters[choice.task].predict_arrays(image, props), ref, labels)
                row.update({f"{rule}_chosen": choice.task, f"{rule}_correct": choice.task == name,
                            f"{rule}_margin": choice.margin, f"{rule}_ood": choice.ood,
                            f"{rule}_dice": dice[choice.task]})
            rows.append(row)
    # an unseen site: each task's test cases against the other tasks' descriptions only
    described = run.read_task_descriptions([s.index for s in run.read_schedule()])
    unseen = {}
    for name, t in tasks.items():
        others = {k: v for k, v in described.items() if k != name}
        flags = []
        for cid in t.test_cases:
            image, props = segmenters[name].read(list(t.cases[cid].images))
            flags.append(choose(others, image_features(segmenters[name].preprocess(image, props))).ood)
        unseen[name] = float(np.mean(flags))
    noise = np.random.default_rng(0).uniform(image.min(), image.max(), image.shape).astype(np.float32)
    unlike = choosers["description"](noise, props)
    storage = [run.task_description(s.index).stat().st_size for s in run.read_schedule()]
    result = {"run": str(run_dir), "method": exp.method, "described_by_this_script": described_here,
              "dice_oracle": float(np.mean([r["dice_oracle"] for r in rows])),
              "predict_seconds": float(np.mean([r["predict_seconds"] for r in rows])),
              "description_bytes_per_stage": storage, "noise_image_flagged": bool(unlike.ood),
              "unseen_site_flagged": unseen,
              "noise_image_distance_over_threshold": unlike.scores[unlike.task] / unlike.threshold, "cases": rows}
    for rule in TASK_CHOICES:
        result[rule] = {"accuracy": float(np.mean([r[f"{rule}_correct"] for r in rows])),
                        "dice": float(np.mean([r[f"{rule}_dice"] for r in rows])),
                        "seconds": float(np.mean([r[f"{rule}_seconds"] for r in rows])),
                        "ood_test_cases": int(sum(bool(r[f"{rule}_ood"]) for r in rows))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="The runs' cache (their --cache-dir), to describe stages trained before task inference.")
    parser.add_argument("--note", default="", help="What the runs were (budget, machine), for the results file.")
    parser.add_argument("--name", default="head_choice", help="results file name (without extension)")
    args = parser.parse_args()
    results = [evaluate(r, args.cache_dir) for r in args.runs]
    lines = ["| method | rule | right head chosen | mean Dice, chosen head | mean Dice, oracle head (--task) | "
             "added time per case (vs prediction) | stored per stage | test cases flagged OOD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = len(r["cases"])
        for rule in TASK_CHOICES:
            x = r[rule]
            stored = f"{max(r['description_bytes_per_stage']) / 1024:.1f} KiB" if rule == "description" else "0"
            lines.append(f"| {r['method']} | {rule} | {x['accuracy']:.0%} ({round(x['accuracy'] * n)}/{n}) | "
                         f"{x['dice']:.3f} | {r['dice_oracle']:.3f} | {x['seconds']:.2f} s "
                         f"({x['seconds'] / r['predict_seconds']:.0%} of {r['predict_seconds']:.2f} s) | {stored} | "
                         + (f"{x['ood_test_cases']}/{n}" if rule == "description" else "— (no OOD test)") + " |")
    noise = ", ".join(f"{r['method']}: {'flagged' if r['noise_image_flagged'] else 'NOT flagged'} "
                      f"(distance {r['noise_image_distance_over_threshold']:.0f}x the threshold)" for r in results)
    unseen = "; ".join(f"{r['method']}: " + ", ".join(f"{short_task_name(t)} {v:.0%}" for t, v in
                                                      r["unseen_site_flagged"].items()) for r in results)
    sites = ", ".join(short_task_name(t) for t in results[0]["unseen_site_flagged"])
    text = ("\n".join(lines) + f"\n\nAll test cases of the tasks ({sites}), final model of each run. "
            "Entropy: every head segments the image, so its added time is the other heads' predictions. "
            f"One image of uniform noise per run: {noise}. A site the model never saw (each task's test cases "
            f"against the other tasks' descriptions only), share flagged OOD: {unseen}.\n"
            + (f"\n{args.note}\n" if args.note else ""))
    write_text(args.results / f"{args.name}.md", text)
    write_json(args.results / f"{args.name}.json", {"note": args.note, "runs": results})
    print(text)


if __name__ == "__main__":
    main()
