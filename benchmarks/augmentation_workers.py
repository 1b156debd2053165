"""Seconds per training iteration with 0, 1 and 2 data-augmentation workers (``nnUNet_n_proc_DA``), on the demo's
data (hippocampus sites, 2 mm, 3d_fullres), to choose the CPU default (`nnunet.env.CPU_AUGMENTATION_WORKERS`).

Each measurement is one short `run` of the first site; what is timed is nnU-Net's training loop of every epoch after
the first (augmenters started, first batches cached): from the epoch's first training iteration to its last, data
waiting included, per iteration. The worker counts take turns round by round, so machine noise hits all alike.

    .venv/bin/python benchmarks/augmentation_workers.py --rounds 2 --epochs 2 --iterations 4

Writes benchmarks/results/augmentation_workers.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lifelong_nnunet.datasets import build
from lifelong_nnunet.demo import DEMO_SPACING_MM
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.io_utils import write_json, write_text
from lifelong_nnunet.nnunet.trainer import ContinualTrainer
from lifelong_nnunet.runner import run_experiment


def time_epochs(record: dict[int, list[float]]) -> None:
    """Wrap the trainer's epoch so that every epoch's training loop (after the first) is timed into
    ``record[workers]``."""
    start_epoch, end_epoch = ContinualTrainer.on_train_epoch_start, ContinualTrainer.on_train_epoch_end

    def on_start(self):
        start_epoch(self)
        self._timing_started = time.perf_counter()

    def on_end(self, outputs):
        if self.current_epoch > 0:
            seconds = time.perf_counter() - self._timing_started
            record[int(os.environ["nnUNet_n_proc_DA"])].append(seconds / self.num_iterations_per_epoch)
        end_epoch(self, outputs)
    ContinualTrainer.on_train_epoch_start, ContinualTrainer.on_train_epoch_end = on_start, on_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="per run; the first is not timed")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations per epoch")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    per_iteration: dict[int, list[float]] = {w: [] for w in args.workers}
    time_epochs(per_iteration)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        task = build("hippocampus-sites", scratch / "raw", seed=0, spacing=DEMO_SPACING_MM)[0]
        for r in range(args.rounds):
            for w in args.workers[r % len(args.workers):] + args.workers[: r % len(args.workers)]:
                os.environ["nnUNet_n_proc_DA"] = str(w)
                exp = experiment_from_dict({"tasks": [str(task)], "method": "sequential", "device": "cpu",
                                            "cache_dir": str(scratch / "cache"),
                                            "evaluation": {"metrics": ["dice"]},  # not what is measured
                                            "training": {"epochs": args.epochs, "iterations_per_epoch":
                                                         args.iterations, "val_iterations": 1}})
                run_experiment(exp, scratch / f"run_{r}_{w}", quiet=True)
                print(f"round {r} workers {w}: {per_iteration[w][-1]:.3f} s/iteration", flush=True)
    rows = [{"workers": w, "median_s_per_iteration": statistics.median(v), "min": min(v), "max": max(v),
             "samples": v} for w, v in per_iteration.items()]
    fastest = min(rows, key=lambda r: r["median_s_per_iteration"])
    load = os.getloadavg()[0]
    machine = f"CPU ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads), load average {load:.2f} " \
              f"when it finished"
    lines = ["| augmentation workers | s / training iteration (median) | min | max |", "|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['median_s_per_iteration']:.3f} | {r['min']:.3f} | {r['max']:.3f} |"
              for r in rows]
    text = "\n".join(lines) + (
        f"\n\n{args.rounds} rounds, worker counts interleaved; per run {args.epochs - 1} timed epochs of "
        f"{args.iterations} iterations (demo data, 3d_fullres, batch size of the plans). Machine: {machine}. "
        f"Fastest: {fastest['workers']} worker(s).\n")
    write_text(args.out / "augmentation_workers.md", text)
    write_json(args.out / "augmentation_workers.json", {"machine": machine, "rounds": args.rounds,
                                                       "epochs": args.epochs, "iterations": args.iterations,
                                                       "rows": rows, "fastest": fastest["workers"]})
    print(text)


if __name__ == "__main__":
    main()
