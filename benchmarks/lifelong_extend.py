"""Lifelong use measured on the demo benchmark: the three hippocampus sites learned in three steps (`run` on site A,
then `extend` with B and with C), with A's training images deleted and the cache cleared before B arrives, against the
batch run that knew the whole sequence. Same method, seed and budget, one invocation, one machine.

It reports whether every stage model is bitwise the batch run's, both result matrices, and the wall time of each
step, with the planning that `extend` avoids (it preprocesses the new site with the run's plans).

    .venv/bin/python benchmarks/lifelong_extend.py [--epochs 7 --iterations 50 --method sequential]

Writes benchmarks/results/lifelong_extend.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lifelong_nnunet.datasets import build
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.lifelong import extend_run
from lifelong_nnunet.nnunet.planning import clear_cache
from lifelong_nnunet.run_folder import RunFolder
from lifelong_nnunet.runner import run_experiment

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--epochs", type=int, default=7)
    args.add_argument("--iterations", type=int, default=50)
    args.add_argument("--method", default="sequential")
    args.add_argument("--data", type=Path, default=Path("data/raw"))
    args.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = args.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="lifelong_extend_"))
    sites = [Path(p) for p in build("hippocampus-sites", a.data, seed=0, spacing=2.0)]
    copies = [Path(shutil.copytree(s, work / "raw" / s.name, dirs_exist_ok=True)) for s in sites]
    training = {"epochs": a.epochs, "iterations_per_epoch": a.iterations}

    def spec(tasks, cache):
        return experiment_from_dict({"tasks": [str(t) for t in tasks], "method": a.method, "seed": 0,
                                     "training": training, "cache_dir": str(cache)}, "benchmark")

    times = {}
    started = time.time()
    batch = run_experiment(spec(copies, work / "cache_batch"), work / "batch", quiet=True)
    times["batch run (3 sites)"] = time.time() - started

    grown = work / "grown"
    started = time.time()
    run_experiment(spec(copies[:1], work / "cache_grown"), grown, quiet=True)
    times["run A"] = time.time() - started
    test_a = RunFolder(grown).read_splits()[copies[0].name]
    deleted = 0
    for f in [*(copies[0] / "imagesTr").iterdir(), *(copies[0] / "labelsTr").iterdir()]:
        if not any(f.name.startswith(c + "_0") or f.name == c + ".nii.gz" for c in test_a):
            f.unlink()
            deleted += 1
    clear_cache(work / "cache_grown")
    for site, step in ((copies[1], "extend B"), (copies[2], "extend C")):
        started = time.time()
        summary = extend_run(grown, [str(site)], cache_dir=str(work / "cache_grown"), quiet=True)
        times[step] = time.time() - started

    stages = [0, 1, 2, 3]
    bitwise = {}
    for i in stages:
        a_w, b_w = (torch.load(r / "stages" / f"stage_{i}" / "model.pt", weights_only=True)["network_weights"]
                    for r in (work / "batch", grown))
        bitwise[i] = a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    record = {"method": a.method, "training": training, "sites": [s.name for s in sites],
              "deleted_training_files_of_A": deleted, "bitwise_equal_stage_models": bitwise,
              "R_batch": batch["R"], "R_grown": summary["R"], "final_average": {"batch": batch["final_average"],
                                                                               "grown": summary["final_average"]},
              "bwt": {"batch": batch["bwt"], "grown": summary["bwt"]}, "wall_seconds": times,
              "history": summary["history"], "device": "cpu" if not torch.cuda.is_available() else "cuda"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lifelong_extend.json").write_text(json.dumps(record, indent=2) + "\n")
    short = [s.name.split("_", 1)[1] for s in sites]
    lines = [f"# Lifelong use on hippocampus-sites ({a.method}, {a.epochs} x {a.iterations} iterations per stage)", "",
             f"`run` on A, then `extend` with B and C; A's {deleted} training files deleted and the cache cleared "
             f"before B. Stage models bitwise equal to the batch run's: "
             + ", ".join(f"stage {i} {'yes' if ok else 'NO'}" for i, ok in bitwise.items()) + ".", "",
             "| stage | " + " | ".join(f"{t} batch | {t} grown" for t in short) + " |",
             "|---|" + "---|---|" * len(short)]
    labels = ["before training", *(f"after {t}" for t in short)]
    for i, label in enumerate(labels):
        cells = []
        for j in range(len(short)):
            for R in (batch["R"], summary["R"]):
                v = R[i][j]
                cells.append("—" if v is None or v != v else f"{v:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| step | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    (RESULTS / "lifelong_extend.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
