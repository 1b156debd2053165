"""Per-iteration cost of each method's training step relative to a plain nnU-Net step.

Same trainer, same pre-drawn batches, one process, plain and method steps interleaved, so machine noise hits both
alike; the number reported is the ratio of median step times. Targets: regularisation methods <= 1.10x,
distillation methods <= 1.6x.

    .venv/bin/python benchmarks/step_overhead.py --run runs/demo/sequential --steps 20

It needs a finished run (for its plans, planned data and stage-1 model; `make demo` makes one) and simulates the
run's second stage for every method. Writes benchmarks/results/step_overhead.{md,json}.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lifelong_nnunet.console import RunLog
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.io_utils import read_json, write_json, write_text
from lifelong_nnunet.methods import Stage, available_methods, create_method
from lifelong_nnunet.nnunet.env import resolve_device
from lifelong_nnunet.nnunet.planning import Workspace
from lifelong_nnunet.nnunet.trainer import build_network
from lifelong_nnunet.run_folder import RunFolder, load_model, save_model
from lifelong_nnunet.runner import default_cache_dir, planning_for, prepare
from lifelong_nnunet.stages import RunContext, StageTraining

TARGETS = {"regularisation": 1.10, "distillation": 1.6}
KIND = {"ewc": "regularisation", "mas": "regularisation", "rw": "regularisation",
        "lwf": "distillation", "mib": "distillation", "plop": "distillation"}


def timed(step, batch) -> float:
    start = time.perf_counter()
    step(batch)
    return time.perf_counter() - start


def measure(run_dir: Path, method: str, steps: int, scratch: Path) -> dict:
    spec = read_json(run_dir / "experiment.json")
    spec.update(method=method, method_params={})
    exp = experiment_from_dict(spec, "benchmark")
    folder = scratch / method
    tasks, labels = prepare(exp, folder, RunLog(quiet=True))
    (folder / "stages").mkdir(parents=True)
    shutil.copytree(run_dir / "stages" / "stage_0", folder / "stages" / "stage_0",
                    ignore=shutil.ignore_patterns("nnunet"))
    # the run's trained stage-1 weights, in the method's own architecture (e.g. with its first head)
    method_impl = create_method(method, labels=labels)
    net = build_network(read_json(run_dir / "plans.json"), exp.configuration, read_json(run_dir / "dataset.json"),
                        deep_supervision=True)
    net.load_state_dict(load_model(run_dir / "stages" / "stage_1" / "model.pt")["network_weights"])
    save_model(folder / "stages" / "stage_1" / "model.pt",
               method_impl.adapt_network(net, [tasks[0].name]).state_dict(), {})
    stages = [Stage(1, (tasks[0].name,)), Stage(2, (tasks[1].name,))]
    write_json(folder / "schedule.json", [{"index": s.index, "train_tasks": list(s.train_tasks), "init": s.init,
                                            "budget": 1.0} for s in stages])
    workspace = Workspace(Path(exp.cache_dir) if exp.cache_dir else default_cache_dir(), tasks, exp.configuration,
                          plan_with=exp.plan_with, planning=planning_for(RunFolder(run_dir), exp))  # the run's
    training = StageTraining(RunContext(exp, RunFolder(folder), workspace, tasks, method_impl,
                                        resolve_device(exp.device), RunLog(quiet=True), labels, stages))
    with training.stage_env(stages[0]):  # importances/teachers of the finished first task, as in a real run
        first = training.build_stage_trainer(stages[0], epochs=1)
        method_impl.after_stage(first, stages[0])
    with training.stage_env(stages[1]):
        trainer = training.build_stage_trainer(stages[1], epochs=1)
        trainer.on_train_start()
        batches = [next(trainer.dataloader_train) for _ in range(steps)]
        plain_step = lambda b: nnUNetTrainer.train_step(trainer, b)  # noqa: E731 - nnU-Net's own step
        for b in batches[:2]:  # warm-up
            plain_step(b), trainer.train_step(b)
        plain, ours = [], []
        for b in batches:
            plain.append(timed(plain_step, b))
            ours.append(timed(trainer.train_step, b))
        trainer.on_train_end()
    ratio = statistics.median(ours) / statistics.median(plain)
    return {"method": method, "plain_ms": 1000 * statistics.median(plain), "method_ms": 1000 * statistics.median(ours),
            "ratio": ratio, "kind": KIND.get(method, "other"),
            "target": TARGETS.get(KIND.get(method, ""), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo/sequential"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    methods = args.methods or [m for m in available_methods() if m not in ("joint", "separate")]
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for m in methods:
            rows.append(measure(args.run, m, args.steps, Path(scratch)))
            print(f"{m:12s} plain {rows[-1]['plain_ms']:.0f} ms  method {rows[-1]['method_ms']:.0f} ms  "
                  f"ratio {rows[-1]['ratio']:.2f}", flush=True)
    lines = ["| method | kind | plain nnU-Net step (ms) | method step (ms) | ratio | target |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        target = f"<= {r['target']:.2f}" if r["target"] else "—"
        ok = "" if not r["target"] else (" ✓" if r["ratio"] <= r["target"] else " ✗")
        lines.append(f"| {r['method']} | {r['kind']} | {r['plain_ms']:.0f} | {r['method_ms']:.0f} | "
                     f"{r['ratio']:.2f}{ok} | {target} |")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    text = "\n".join(lines) + f"\n\nMedian of {args.steps} interleaved steps per method on {device}, batches of " \
                              f"the demo's second task.\n"
    write_text(args.out / "step_overhead.md", text)
    write_json(args.out / "step_overhead.json", rows)
    print(text)


if __name__ == "__main__":
    main()
