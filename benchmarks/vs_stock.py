"""Our `run` against the same protocol done by hand with stock nnU-Net, on the same data, interleaved.

The protocol: the demo's 3 hippocampus sites (domain-incremental, 2 mm), ``sequential``, one stage per task, every
task's held-out test cases predicted and scored after every stage. The two ways:

- **ours**: one `run_experiment` (plans once, trains each stage from the previous model, evaluates every cell;
  it also evaluates the untrained stage-0 model, T more test-set predictions than the stock way).
- **stock**: what a user does with nnunetv2 by hand: the same training cases laid out as nnU-Net raw datasets (the
  test cases kept out); ``nnUNetv2_plan_and_preprocess`` on the first site; for the others
  ``nnUNetv2_plan_and_preprocess --no_pp`` (fingerprint, and dataset.json where preprocessing reads it),
  ``nnUNetv2_move_plans_between_datasets`` and ``nnUNetv2_preprocess`` (nnU-Net's command-line
  tools, one process each); each stage an ``nnUNetTrainer`` (constructed directly: nnU-Net's lookup of trainer
  classes by name imports torchvision, which breaks on this CPU torch, so ``nnUNetv2_train`` and
  ``nnUNetv2_predict`` cannot run here) started from the previous stage's ``checkpoint_final.pth`` with nnU-Net's
  ``load_pretrained_weights`` (what ``-pretrained_weights`` does: every weight but the output layer); then
  ``nnUNetPredictor.predict_from_files`` on each task's test images and ``compute_metrics_on_folder``.

Both use the same budget (epochs, iterations, validation iterations), nnU-Net's planned batch size, no test-time
mirroring (our default; ``--disable_tta`` for stock), and each its own default augmentation workers (ours:
`nnunet.env.augmentation_workers`; stock: nnU-Net's ``get_allowed_n_proc_DA``). The stock way leaves out the final
validation ``nnUNetv2_train`` runs after training (our stages do not do it either). The two ways take turns, seed by
seed, so machine noise hits both alike.

Reported: wall time per phase and the ratios ours / stock (planning, training per iteration, evaluation per case,
total), both result matrices R[stage][task] (mean foreground Dice; mean ± sd over seeds), and our Dice against
``compute_metrics_on_folder``'s on the same (stock) predictions: equal where the two conventions agree; a label
absent from both prediction and reference is NaN for nnU-Net (left out of its means) and 1 for us.

    .venv/bin/python benchmarks/vs_stock.py --seeds 0 1 2 --epochs 5 --iterations 20

Writes benchmarks/results/vs_stock.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lifelong_nnunet import stages as stages_module
from lifelong_nnunet.console import RunLog, silenced_stdout
from lifelong_nnunet.datasets import build
from lifelong_nnunet.demo import DEMO_SPACING_MM
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.io_utils import write_json, write_text
from lifelong_nnunet.nnunet.env import augmentation_workers, nnunet_env, resolve_device
from lifelong_nnunet.nnunet.planning import Workspace
from lifelong_nnunet.runner import prepare, run_experiment
from lifelong_nnunet.stages import StageTraining

TARGETS = {"total": 1.05, "training per iteration": 1.05, "evaluation per case": 1.10}
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"


class Timer:
    """Wall seconds spent in wrapped callables, per phase (wrapping only: nothing of the run is changed)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, name: str, phase: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


def spec(tasks: list[Path], seed: int, budget: dict, cache: Path):
    return experiment_from_dict({"tasks": [str(t) for t in tasks], "method": "sequential", "seed": seed,
                                 "configuration": CONFIGURATION, "cache_dir": str(cache), "training": budget})


def run_ours(tasks: list[Path], seed: int, budget: dict, scratch: Path) -> dict:
    timer = Timer()
    undo = [timer.wrap(Workspace, "ensure_planned", "planning"), timer.wrap(StageTraining, "train", "training"),
            timer.wrap(stages_module, "evaluate_stage", "evaluation")]
    started = time.perf_counter()
    try:
        run_experiment(spec(tasks, seed, budget, scratch / "cache"), scratch / "run", quiet=True)
    finally:
        for u in undo:
            u()
    total = time.perf_counter() - started
    results = pd.read_csv(scratch / "run" / "results.csv")
    dice = results[results.metric == "dice"]
    cases = dice.groupby(["stage", "eval_task"]).case.nunique().sum()
    trained = dice[dice.stage > 0]
    matrix = trained.groupby(["stage", "eval_task"]).value.mean().unstack().sort_index()
    return {"seconds": {**timer.seconds, "total": total}, "cases_evaluated": int(cases),
            "R": matrix.values.tolist(), "tasks": list(matrix.columns)}


def cli(*args: str) -> None:
    """One of nnU-Net's command-line tools, as a user runs it (a process of its own)."""
    tool = Path(sys.executable).parent / args[0]
    done = subprocess.run([str(tool), *args[1:]], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def lay_out_stock(split_tasks, root: Path) -> dict:
    """nnU-Net raw datasets of the training cases (links), and each task's test images and references apart."""
    layout = {"raw": root / "nnUNet_raw", "preprocessed": root / "nnUNet_preprocessed", "results": root / "results",
              "tasks": []}
    for t in split_tasks:
        ds = layout["raw"] / t.name
        (ds / "imagesTr").mkdir(parents=True)
        (ds / "labelsTr").mkdir()
        test_images, test_labels = root / "test" / t.name / "images", root / "test" / t.name / "labels"
        test_images.mkdir(parents=True)
        test_labels.mkdir(parents=True)
        for cid, case in t.cases.items():
            images, labels = (test_images, test_labels) if cid in t.test_cases else (ds / "imagesTr", ds / "labelsTr")
            for img in case.images:
                (images / img.name).symlink_to(img.resolve())
            (labels / case.label.name).symlink_to(case.label.resolve())
        (ds / "dataset.json").write_text(json.dumps(dict(t.dataset_json, numTraining=len(t.train_cases)), indent=2))
        layout["tasks"].append({"name": t.name, "id": t.dataset_id, "images": test_images, "labels": test_labels,
                                "file_ending": t.file_ending,
                                "labels_map": {k: v for k, v in t.dataset_json["labels"].items() if v}})
    return layout


def stock_workers() -> int:
    """nnU-Net's own default for this machine (its table by host name, at most the CPU count)."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    saved = os.environ.pop("nnUNet_n_proc_DA", None)
    try:
        return get_allowed_n_proc_DA()
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved


def run_stock(split_tasks, seed: int, budget: dict, scratch: Path, device: torch.device,
              transfer: str = "pretrained", plan: bool = True) -> dict:
    """The stock protocol. ``transfer``: how a stage starts from the previous one: ``pretrained`` as
    ``nnUNetv2_train -pretrained_weights`` (every weight but the output layers, which start from scratch), or
    ``full`` (every weight, as our stages do): the one difference in what is carried between stages. ``plan``
    False: the preprocessed folders are already in ``scratch`` (a quick check of the rest)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from lifelong_nnunet.evaluation.metrics import score_case

    seconds = {"planning": 0.0, "training": 0.0, "prediction": 0.0, "scoring": 0.0}
    started = time.perf_counter()
    layout = lay_out_stock(split_tasks, scratch)
    workers = stock_workers()
    # nnU-Net compiles by default on CUDA (never on CPU); the user's own setting wins, as for ours
    env = dict(nnUNet_n_proc_DA=str(workers), nnUNet_def_n_proc="2",
               nnUNet_compile=os.environ.get("nnUNet_compile", "t" if device.type == "cuda" else "f"))
    with nnunet_env(layout["raw"], layout["preprocessed"], layout["results"], **env):
        first, *others = layout["tasks"]
        t0 = time.perf_counter()
        plan and cli("nnUNetv2_plan_and_preprocess", "-d", str(first["id"]), "-c", CONFIGURATION, "-np", "2",
                     "-npfp", "2")
        for t in others if plan else []:
            # fingerprint and its own plans (which also puts dataset.json where preprocessing reads it)
            cli("nnUNetv2_plan_and_preprocess", "-d", str(t["id"]), "--no_pp", "-npfp", "2")
            cli("nnUNetv2_move_plans_between_datasets", "-s", str(first["id"]), "-t", str(t["id"]),
                "-sp", PLANS, "-tp", PLANS)
            cli("nnUNetv2_preprocess", "-d", str(t["id"]), "-plans_name", PLANS, "-c", CONFIGURATION, "-np", "2")
        seconds["planning"] = time.perf_counter() - t0

        torch.manual_seed(seed)  # the network's initialisation; nnU-Net seeds nothing else
        previous, previous_weights, matrix, comparison = None, None, [], []
        for stage, t in enumerate(layout["tasks"], start=1):
            pre = layout["preprocessed"] / t["name"]
            # nnUNetTrainer pops continue_training, which run_training.py sets
            plans = dict(json.loads((pre / f"{PLANS}.json").read_text()), continue_training=False)
            dataset_json = json.loads((pre / "dataset.json").read_text())
            t0 = time.perf_counter()
            with silenced_stdout():
                trainer = nnUNetTrainer(plans, CONFIGURATION, 0, dataset_json, device)
                trainer.num_epochs = budget["epochs"]
                trainer.num_iterations_per_epoch = budget["iterations_per_epoch"]
                trainer.num_val_iterations_per_epoch = budget["val_iterations"]
                if previous is not None:
                    trainer.initialize()
                    if transfer == "pretrained":
                        load_pretrained_weights(trainer.network, str(previous))
                    else:
                        trainer.network.load_state_dict(previous_weights)
                trainer.run_training()
            seconds["training"] += time.perf_counter() - t0
            previous = Path(trainer.output_folder) / "checkpoint_final.pth"
            previous_weights = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}

            trainer.set_deep_supervision_enabled(False)
            trainer.network.eval()
            pm = PlansManager(plans)
            row = []
            for target in layout["tasks"]:
                out = scratch / "predictions" / f"stage_{stage}" / target["name"]
                t0 = time.perf_counter()
                with silenced_stdout():
                    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                                perform_everything_on_device=device.type == "cuda", device=device,
                                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
                    predictor.manual_initialization(trainer.network, pm, pm.get_configuration(CONFIGURATION),
                                                    [trainer.network.state_dict()], dataset_json,
                                                    "nnUNetTrainer", trainer.inference_allowed_mirroring_axes)
                    predictor.predict_from_files(str(target["images"]), str(out), save_probabilities=False,
                                                 overwrite=True, num_processes_preprocessing=2,
                                                 num_processes_segmentation_export=2)
                seconds["prediction"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                with silenced_stdout():
                    metrics = compute_metrics_on_folder(str(target["labels"]), str(out), str(out / "summary.json"),
                                                        SimpleITKIO(), target["file_ending"],
                                                        list(target["labels_map"].values()), num_processes=2)
                seconds["scoring"] += time.perf_counter() - t0
                row.append(metrics["foreground_mean"]["Dice"])
                comparison += compare_dice(metrics, target["labels_map"], score_case, SimpleITKIO())
            matrix.append(row)
    seconds["evaluation"] = seconds["prediction"] + seconds["scoring"]
    seconds["total"] = time.perf_counter() - started
    cases = sum(len(list(t["labels"].iterdir())) for t in layout["tasks"]) * len(layout["tasks"])
    return {"seconds": seconds, "cases_evaluated": cases, "R": matrix, "tasks": [t["name"] for t in layout["tasks"]],
            "augmentation_workers": workers, "dice_comparison": comparison}


def compare_dice(metrics: dict, labels_map: dict, score_case, io) -> list[dict]:
    """Our Dice and nnU-Net's of every (case, label) of one folder of predictions."""
    rows = []
    for case in metrics["metric_per_case"]:
        pred, _ = io.read_seg(case["prediction_file"])
        ref, _ = io.read_seg(case["reference_file"])
        ours = {r["label"]: r["value"] for r in score_case(pred[0], ref[0], labels_map, ["dice"])}
        for name, value in labels_map.items():
            theirs = case["metrics"][value]["Dice"]  # nnU-Net's keys: the label values
            rows.append({"ours": ours[name], "nnunet": None if np.isnan(theirs) else theirs,
                         "absent_from_both": bool(not (pred[0] == value).any() and not (ref[0] == value).any())})
    return rows


def phase_table(ours: list[dict], stock: list[dict], iterations: int) -> list[dict]:
    """Per phase: medians over seeds of each way's seconds (per unit), and the ratio ours / stock."""
    def per(runs, phase, unit):
        return statistics.median(r["seconds"][phase] / unit(r) for r in runs)
    rows = [("planning", "planning", "planning", lambda r: 1, lambda r: 1),
            ("training per iteration", "training", "training", lambda r: iterations, lambda r: iterations),
            ("evaluation per case", "evaluation", "prediction", lambda r: r["cases_evaluated"],
             lambda r: r["cases_evaluated"]),
            ("evaluation per case, with scoring", "evaluation", "evaluation", lambda r: r["cases_evaluated"],
             lambda r: r["cases_evaluated"]),
            ("total", "total", "total", lambda r: 1, lambda r: 1)]
    out = []
    for name, ours_phase, stock_phase, ours_unit, stock_unit in rows:
        a, b = per(ours, ours_phase, ours_unit), per(stock, stock_phase, stock_unit)
        out.append({"phase": name, "ours_s": a, "stock_s": b, "ratio": a / b, "target": TARGETS.get(name)})
    return out


def mean_sd(matrices: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    stack = np.array(matrices, dtype=float)
    return stack.mean(0), (stack.std(0, ddof=1) if len(stack) > 1 else np.full(stack.shape[1:], np.nan))


def sequence_measures(R: list[list[float]]) -> dict:
    """The continual-learning numbers of one matrix R[stage][task] (stages 1..T): final average, mean forgetting
    (best earlier value minus final, over every task but the last) and the first task after the last stage."""
    r = np.asarray(R, dtype=float)
    forgetting = [r[:-1, t].max() - r[-1, t] for t in range(r.shape[1] - 1)]
    return {"final_average": float(r[-1].mean()), "mean_forgetting": float(np.mean(forgetting)),
            "first_task_final": float(r[-1, 0])}


def spread(ours: list[dict], stock: list[dict]) -> dict:
    """Per measure: both ways' values per seed, their means and sds, and the difference of the means in units of
    the larger sd (under 2: within the run-to-run spread)."""
    out = {}
    for key in ("final_average", "mean_forgetting", "first_task_final"):
        a = [sequence_measures(r["R"])[key] for r in ours]
        b = [sequence_measures(r["R"])[key] for r in stock]
        sd = max(statistics.stdev(a), statistics.stdev(b)) if len(a) > 1 and len(b) > 1 else float("nan")
        diff = statistics.mean(a) - statistics.mean(b)
        out[key] = {"ours": a, "stock": b, "difference": diff, "larger_sd": sd,
                    "difference_in_sds": diff / sd if sd and np.isfinite(sd) else float("nan")}
    return out


TRANSFER = {"pretrained": "every weight but the output layers (`-pretrained_weights`)", "full": "every weight"}


def render(result: dict) -> str:
    lines = ["# Ours against stock nnU-Net by hand\n", f"Machine: {result['machine']}.\n",
             f"Protocol: {len(result['tasks'])} hippocampus sites (domain, {DEMO_SPACING_MM} mm, {CONFIGURATION}), "
             f"`sequential`, per stage {result['budget']['epochs']} epochs x {result['budget']['iterations_per_epoch']}"
             f" iterations ({result['budget']['val_iterations']} validation iterations per epoch); seeds "
             f"{result['seeds']}, the two ways interleaved. Augmentation workers: ours {result['ours_workers']}, "
             f"stock {result['stock_workers']} (each its default). Stock stages start from the previous one with "
             f"{TRANSFER[result['stock_transfer']]}. Our run also evaluates the untrained stage-0 "
             f"model ({len(result['tasks'])} more test-set predictions); per-case times divide by each way's own "
             f"count.\n",
             "| phase | ours (s) | stock (s) | ours / stock | target |", "|---|---|---|---|---|"]
    for r in result["phases"]:
        target = f"<= {r['target']:.2f}" if r["target"] else "—"
        mark = "" if not r["target"] else (" ✓" if r["ratio"] <= r["target"] else " ✗")
        lines.append(f"| {r['phase']} | {r['ours_s']:.3f} | {r['stock_s']:.3f} | {r['ratio']:.2f}{mark} | {target} |")
    lines.append("\n'evaluation per case': ours = prediction and every metric (Dice, IoU, NSD, HD95); stock = "
                 "`nnUNetPredictor.predict_from_files` alone. 'with scoring' adds `compute_metrics_on_folder` to "
                 "stock.\n")
    for way in ("ours", "stock"):
        mean, sd = np.array(result["R"][way]["mean"]), np.array(result["R"][way]["sd"])
        lines += [f"\nR[stage][task], {way} (mean foreground Dice, mean ± sd over {len(result['seeds'])} "
                  f"seed(s)):\n", "| after stage | " + " | ".join(result["tasks"]) + " | average |",
                  "|---|" + "---|" * (len(result["tasks"]) + 1)]
        for i, (m, s) in enumerate(zip(mean, sd), start=1):
            cells = [f"{a:.3f} ± {b:.3f}" if np.isfinite(b) else f"{a:.3f}" for a, b in zip(m, s)]
            lines.append(f"| {i} | " + " | ".join(cells) + f" | {m.mean():.3f} |")
    if "sequence" in result:
        lines += ["\nPer seed, both ways (ours − stock; in units of the larger of the two sds):\n",
                  "| measure | ours | stock | difference | in sds |", "|---|---|---|---|---|"]
        names = {"final_average": "final average", "mean_forgetting": "mean forgetting",
                 "first_task_final": f"{result['tasks'][0]} after the last stage"}
        for key, m in result["sequence"].items():
            lines.append(f"| {names[key]} | {', '.join(f'{v:.3f}' for v in m['ours'])} | "
                         f"{', '.join(f'{v:.3f}' for v in m['stock'])} | {m['difference']:+.3f} | "
                         f"{m['difference_in_sds']:+.1f} |")
    d = result["dice_agreement"]
    lines.append(
        f"\nOur Dice against `compute_metrics_on_folder`'s on the same (stock) predictions, {d['pairs']} (case, "
        f"label) pairs: where both conventions give a number ({d['comparable']} pairs), the largest difference is "
        f"{d['max_abs_difference']:.2e}. Where they differ by convention (a label absent from both prediction and "
        f"reference: NaN for nnU-Net, left out of its means; 1 for us): {d['absent_from_both']} pairs.\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5, help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=1)
    parser.add_argument("--stock-transfer", choices=("pretrained", "full"), default="pretrained",
                        help="stock stages start from the previous one as -pretrained_weights does (output layers "
                             "from scratch), or with every weight (as ours)")
    parser.add_argument("--machine-note", default="shared with other developers' jobs while it ran (loaded)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    budget = {"epochs": args.epochs, "iterations_per_epoch": args.iterations, "val_iterations": args.val_iterations}
    os.environ.pop("nnUNet_n_proc_DA", None)  # each way its own default
    device = resolve_device("auto")
    ours, stock = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tasks = build("hippocampus-sites", scratch / "raw", seed=0, spacing=DEMO_SPACING_MM)
        for seed in args.seeds:
            split_tasks, _ = prepare(spec(tasks, seed, budget, scratch / "unused"), scratch / f"probe_{seed}",
                                     RunLog(quiet=True))
            ways = [("ours", lambda: ours.append(run_ours(tasks, seed, budget, scratch / f"ours_{seed}"))),
                    ("stock", lambda: stock.append(run_stock(split_tasks, seed, budget, scratch / f"stock_{seed}",
                                                             device, args.stock_transfer)))]
            for name, go in ways if seed % 2 else ways[::-1]:
                go()
                last = (ours if name == "ours" else stock)[-1]
                print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in last["seconds"].items()),
                      flush=True)
            shutil.rmtree(scratch / f"stock_{seed}", ignore_errors=True)
    iterations = args.epochs * args.iterations * len(tasks)
    comparison = [c for s in stock for c in s["dice_comparison"]]
    comparable = [c for c in comparison if c["nnunet"] is not None]
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else
               f"CPU, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads") + f", {args.machine_note}"
    result = {
        "machine": machine, "seeds": args.seeds, "budget": budget, "tasks": ours[0]["tasks"],
        "stock_transfer": args.stock_transfer,
        "ours_workers": augmentation_workers(device), "stock_workers": stock[0]["augmentation_workers"],
        "phases": phase_table(ours, stock, iterations),
        "R": {way: dict(zip(("mean", "sd"), (a.tolist() for a in mean_sd([r["R"] for r in runs]))))
              for way, runs in (("ours", ours), ("stock", stock))},
        "sequence": spread(ours, stock),
        "dice_agreement": {"pairs": len(comparison), "comparable": len(comparable),
                           "max_abs_difference": max((abs(c["ours"] - c["nnunet"]) for c in comparable), default=0.0),
                           "absent_from_both": sum(c["absent_from_both"] for c in comparison),
                           "nan_for_nnunet": len(comparison) - len(comparable)},
        "runs": {"ours": [{k: v for k, v in r.items()} for r in ours],
                 "stock": [{k: v for k, v in r.items() if k != "dice_comparison"} for r in stock]},
    }
    write_json(args.out / "vs_stock.json", result)
    text = render(result)
    write_text(args.out / "vs_stock.md", text)
    print(text)


if __name__ == "__main__":
    main()
