"""How well a multi-head model picks its head by itself at prediction time, on the demo's test cases.

    .venv/bin/python benchmarks/head_choice.py runs/demo/multihead runs/demo/frozen_body

For every task's held-out test cases: the head the method chooses without `--task` (the least uncertain head),
whether it is the case's own task, and the Dice with that choice against the oracle head. Writes
benchmarks/results/head_choice.{md,json}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lifelong_nnunet.deploy import _load_run_network, select_model
from lifelong_nnunet.evaluation.metrics import score_case
from lifelong_nnunet.io_utils import read_json, write_json, write_text
from lifelong_nnunet.nnunet.env import resolve_device
from lifelong_nnunet.nnunet.predictor import Segmenter, read_label
from lifelong_nnunet.tasks import load_task


def mean_dice(pred, ref, labels) -> float:
    return float(np.mean([r["value"] for r in score_case(pred, ref, labels) if r["metric"] == "dice"]))


def evaluate(run_dir: Path) -> dict:
    exp = read_json(run_dir / "experiment.json")
    method, net, seen, plans, djson, _ = _load_run_network(run_dir, select_model(run_dir))
    device = resolve_device("auto")
    segmenters = {t: Segmenter(method.network_for_task(net, t), plans, exp["configuration"], djson, device)
                  for t in seen}
    rows = []
    for folder, (task, cases) in zip(exp["tasks"], read_json(run_dir / "splits.json").items()):
        t = load_task(Path(folder))
        labels = {k: v for k, v in t.labels.items() if v}
        for cid in cases:
            seg = segmenters[task]
            image, props = seg.read(list(t.cases[cid].images))
            chosen = method.choose_task(net, lambda m: Segmenter(m, plans, exp["configuration"], djson, device)
                                        .predict_arrays(image, props, probabilities=True)[1], seen)
            ref = read_label(t.cases[cid].label)
            rows.append({"task": task, "case": cid, "chosen": chosen, "correct": chosen == task,
                         "dice_oracle": mean_dice(seg.predict_arrays(image, props), ref, labels),
                         "dice_auto": mean_dice(segmenters[chosen].predict_arrays(image, props), ref, labels)})
    return {"run": str(run_dir), "method": exp["method"], "accuracy": float(np.mean([r["correct"] for r in rows])),
            "dice_oracle": float(np.mean([r["dice_oracle"] for r in rows])),
            "dice_auto": float(np.mean([r["dice_auto"] for r in rows])), "cases": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = [evaluate(r) for r in args.runs]
    lines = ["| method | right head chosen | mean Dice, automatic head | mean Dice, oracle head (--task) |",
             "|---|---|---|---|"]
    for r in results:
        n = len(r["cases"])
        lines.append(f"| {r['method']} | {r['accuracy']:.0%} ({round(r['accuracy'] * n)}/{n}) | "
                     f"{r['dice_auto']:.3f} | {r['dice_oracle']:.3f} |")
    text = "\n".join(lines) + "\n\nAll test cases of the three hippocampus-sites tasks, final model of each run.\n"
    write_text(args.results / "head_choice.md", text)
    write_json(args.results / "head_choice.json", results)
    print(text)


if __name__ == "__main__":
    main()
