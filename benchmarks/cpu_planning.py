"""What nnU-Net plans for a native-resolution dataset at each planner memory target, and what one training
iteration of that plan costs on this CPU: the measurement behind `planning.memory_target_gb: auto` on a CPU.

A synthetic dataset of 0.8 mm isotropic volumes (the resolution a user's real crops had, for which nnU-Net planned a
40x160x160 patch whose first 10-iteration epoch had not finished after 12 minutes on 2 cores) is planned at memory
targets of 8 GB (nnU-Net's default, sized for a GPU), 4, 2 and 1 GB. For each plan, the network nnU-Net builds is
timed for forward + backward on a batch of the planned patch size (random input, the data loading left out, so this
is a lower bound of an iteration), interleaved over rounds.

    .venv/bin/python benchmarks/cpu_planning.py [--rounds 2] [--shape 64 192 192]

Writes benchmarks/results/cpu_planning.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lifelong_nnunet.console import silenced_stdout
from lifelong_nnunet.datasets._common import write_raw_dataset
from lifelong_nnunet.datasets.synthetic import SYNTHETIC_LABELS, site_appearance, synthetic_image, synthetic_label_map
from lifelong_nnunet.nnunet.env import nnunet_env

RESULTS = Path(__file__).parent / "results"
TARGETS_GB = [8.0, 4.0, 2.0, 1.0]


def plans_at(raw: Path, preprocessed: Path, dataset_id: int, targets_gb: list[float]) -> dict[float, dict]:
    """nnU-Net's plans at each memory target (one fingerprint)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)
    with nnunet_env(raw, preprocessed), silenced_stdout():
        extract_fingerprint_dataset(dataset_id, num_processes=2, verbose=False, show_progress_bar=False)
        return {gb: plan_experiment_dataset(dataset_id, gpu_memory_target_in_gb=gb)[0] for gb in targets_gb}


def iteration_seconds(plans: dict, djson: dict) -> float:
    from lifelong_nnunet.nnunet.trainer import build_network
    cm = plans["configurations"]["3d_fullres"]
    net = build_network(plans, "3d_fullres", djson, deep_supervision=False)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(cm["batch_size"], 1, *cm["patch_size"])
    started = time.perf_counter()
    out = net(x)
    out.float().mean().backward()
    opt.step()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 192, 192])
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        cases = []
        for i in range(2):
            label = synthetic_label_map(tuple(args.shape), rng)
            cases.append((f"native_{i:03d}", synthetic_image(label, site_appearance(0, 0), rng), label))
        raw = tmp / "raw"
        folder = write_raw_dataset(raw / "Dataset990_Native", cases, (0.8, 0.8, 0.8), SYNTHETIC_LABELS)
        djson = json.loads((folder / "dataset.json").read_text())
        plans = plans_at(raw, tmp / "pre", 990, TARGETS_GB)
        times = {gb: [] for gb in TARGETS_GB}
        for _ in range(args.rounds):
            for gb in TARGETS_GB:
                times[gb].append(iteration_seconds(plans[gb], djson))
    rows = []
    for gb in TARGETS_GB:
        cm = plans[gb]["configurations"]["3d_fullres"]
        rows.append({"memory_target_gb": gb, "patch_size": cm["patch_size"], "batch_size": cm["batch_size"],
                     "voxels_per_batch": int(np.prod(cm["patch_size"]) * cm["batch_size"]),
                     "seconds_per_iteration_median": float(np.median(times[gb])), "seconds": times[gb]})
    record = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "shape": args.shape, "spacing_mm": [0.8, 0.8, 0.8], "rounds": args.rounds, "rows": rows,
              "note": "forward+backward+step on random input (no data loading or augmentation): a lower bound"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_planning.json").write_text(json.dumps(record, indent=2))
    lines = [f"Native-resolution plans ({' x '.join(map(str, args.shape))} voxels at 0.8 mm) by planner memory target; "
             f"{record['machine']}; median of {args.rounds} interleaved rounds; forward + backward + step only.", "",
             "| memory target | patch | batch | voxels per batch | s per iteration (lower bound) | 250 iterations |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds_per_iteration_median"]
        lines.append(f"| {r['memory_target_gb']:g} GB | {'x'.join(map(str, r['patch_size']))} | {r['batch_size']} | "
                     f"{r['voxels_per_batch']:,} | {s:.1f} | {250 * s / 60:.0f} min |")
    (RESULTS / "cpu_planning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
