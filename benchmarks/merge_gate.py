"""The merge gate of frozen_encoder_decoders, measured: the merged Dice with and without it, and what it costs.

    .venv/bin/python benchmarks/merge_gate.py [--out runs/merge_gate] [--epochs 4] [--iterations 25]
        [--configuration 2d]

Two class-incremental sequences of synthetic-structures (tasks A, B, C, each new structures):

- "shared": as built, every task imaged alike. The brain sequence is this case too: each task brings new
  structures on the same six brains, so every task's images look alike;
- "mixed": task B's images with inverted contrast (another scanner or protocol), A and C as built.

Each is one ordinary frozen_encoder_decoders run (resumable; ``compress: false``, since the gate concerns the merge,
not the students). Then, in this process, the final model predicts every task's test cases twice, with the gate (the
default) and without it (``gate: false``), and the table gives per task: the merged Dice both ways, how many cases
had a decoder gated out, how many kept their own task's decoder, how many fit no task, and the time the gate adds
per case (nnU-Net's preprocessing once more, the image statistics, the distances) against the prediction itself.
Writes benchmarks/results/merge_gate.{md,json}.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lifelong_nnunet.datasets import build
from lifelong_nnunet.io_utils import write_json, write_text

SEQUENCES = ("shared", "mixed")


def inverted_copy(folder: Path, dest: Path) -> Path:
    """``folder`` with every image's contrast inverted (voxels negated), labels unchanged: the same structures as
    another scanner shows them. nnU-Net z-scores each image, so this is a swapped-tissue contrast after
    normalisation."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    for path in sorted((tmp / "imagesTr").glob("*.nii.gz")):
        img = nib.load(path)
        data = -np.asarray(img.dataobj, dtype=np.float32)
        nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    tmp.rename(dest)
    return dest


def sequence(name: str, root: Path, seed: int, subjects: int) -> list[Path]:
    folders = build("synthetic-structures", root / "shared", seed=seed, subjects=subjects)
    if name == "shared":
        return folders
    return [inverted_copy(f, root / "mixed" / f.name) if i == 1 else f for i, f in enumerate(folders)]


def measure(run_dir: Path, folders: list[Path]) -> dict:
    """Per task: merged Dice with and without the gate on its test cases, the gate's decisions and its time."""
    from lifelong_nnunet.deploy import _load_run_network, part_gate, select_model
    from lifelong_nnunet.evaluation.metrics import score_case
    from lifelong_nnunet.io_utils import read_json
    from lifelong_nnunet.nnunet.env import resolve_device
    from lifelong_nnunet.nnunet.predictor import Segmenter, read_label
    from lifelong_nnunet.run_folder import RunFolder
    from lifelong_nnunet.tasks import load_task
    run = RunFolder(run_dir)
    method, net, seen, _, djson, exp = _load_run_network(run_dir, select_model(run_dir))
    gate = part_gate(run, method, net, seen)
    labels, splits, device = run.read_labels(), read_json(run_dir / "splits.json"), resolve_device("cpu")
    rows, gate_s, predict_s = [], [], []
    for folder in folders:
        task = load_task(folder)
        seg = Segmenter(net, run.task_plans(task.name, exp.configuration), exp.configuration, djson, device)
        wanted = labels.eval_labels(task.name)
        dice = {"gated": [], "ungated": []}
        counts = {"cases": 0, "gated_out_any": 0, "own_kept": 0, "ood": 0}
        changed = []  # share of voxels whose merged label the gate changes
        for cid in splits[task.name]:
            case = task.cases[cid]
            image, props = seg.read(list(case.images))
            ref = np.asarray(labels.lut(task.name))[read_label(case.label).astype(np.int64)]
            start = time.perf_counter()
            record = gate(seg.preprocess(image, props))
            gate_s.append(time.perf_counter() - start)
            counts["cases"] += 1
            counts["gated_out_any"] += bool(record["gated_out"])
            counts["own_kept"] += task.name in record["kept"].split(";")
            counts["ood"] += record["ood"]
            start = time.perf_counter()
            gated = seg.predict_arrays(image, props)
            predict_s.append(time.perf_counter() - start)
            method.gate_parts(net, {})  # lifted: every decoder merges
            ungated = seg.predict_arrays(image, props)
            changed.append(float(np.mean(gated != ungated)))
            for key, pred in (("gated", gated), ("ungated", ungated)):
                scores = score_case(pred, ref, wanted, ("dice",), spacing=props["spacing"])
                dice[key].append(statistics.mean(r["value"] for r in scores if r["metric"] == "dice"))
        rows.append({"task": task.name, **counts, "changed_voxels": statistics.mean(changed),
                     "dice_gated": statistics.mean(dice["gated"]),
                     "dice_ungated": statistics.mean(dice["ungated"])})
    return {"tasks": rows, "gate_seconds_per_case": statistics.median(gate_s),
            "predict_seconds_per_case": statistics.median(predict_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/merge_gate"))
    parser.add_argument("--data-root", type=Path, default=Path("data/raw/merge_gate"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", type=int, default=8, help="subjects per task, 2 cases each")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    result = {"subjects": args.subjects, "epochs": args.epochs, "iterations": args.iterations,
              "configuration": args.configuration, "seed": args.seed, "sequences": {}}
    for name in SEQUENCES:
        folders = sequence(name, args.data_root, args.seed, args.subjects)
        out = args.out / name
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, "-m", "lifelong_nnunet.cli", "run", "--scenario", "class", "--tasks",
                        *map(str, folders), "--method", "frozen_encoder_decoders", "--param", "compress=false",
                        "--configuration", args.configuration, "--epochs", str(args.epochs), "--iterations",
                        str(args.iterations), "--seed", str(args.seed), "-o", str(out), "-q"], check=True)
        result["sequences"][name] = measure(out, folders)
    write_json(args.results / "merge_gate.json", result)
    lines = ["| sequence | task | test cases | Dice without gate | Dice with gate | cases with a decoder gated out | "
             "own decoder kept | fit no task | voxels the gate changes |", "|---|---|---|---|---|---|---|---|---|"]
    for name, seq in result["sequences"].items():
        for r in seq["tasks"]:
            lines.append(f"| {name} | {r['task']} | {r['cases']} | {r['dice_ungated']:.3f} | {r['dice_gated']:.3f} | "
                         f"{r['gated_out_any']} | {r['own_kept']} | {r['ood']} | {r['changed_voxels']:.2%} |")
    lines += ["", "| sequence | mean Dice without gate | with gate | gate time per case | prediction per case | "
              "added |", "|---|---|---|---|---|---|"]
    for name, seq in result["sequences"].items():
        without = statistics.mean(r["dice_ungated"] for r in seq["tasks"])
        with_ = statistics.mean(r["dice_gated"] for r in seq["tasks"])
        g, p = seq["gate_seconds_per_case"], seq["predict_seconds_per_case"]
        lines.append(f"| {name} | {without:.3f} | {with_:.3f} | {g * 1000:.0f} ms | {p * 1000:.0f} ms | {g / p:.0%} |")
    text = "\n".join(lines) + (
        f"\n\nsynthetic-structures (A, B, C, {args.subjects} subjects x 2 variants each; \"mixed\": B's images "
        f"contrast-inverted), frozen_encoder_decoders with "
        f"compress: false, nnU-Net {args.configuration}, {args.epochs} epochs x {args.iterations} iterations per "
        f"stage, seed {args.seed}, CPU. Times are medians over every test case.\n")
    write_text(args.results / "merge_gate.md", text)
    print(text)


if __name__ == "__main__":
    main()
