"""Every method on the demo benchmark with one budget and seed, in one table.

    .venv/bin/python benchmarks/methods.py [--out runs/methods] [--epochs 7] [--iterations 50] [--jobs 2]
        [--methods ...]

Each method is an ordinary run folder `OUT/<method>` (resumable; a finished run is not recomputed). `sequential`
and `joint` always run too, in the same conditions, since times are reported relative to `sequential`.
Writes benchmarks/results/methods.{md,json}
with final average Dice, BWT, FWT, mean forgetting, the forgetting cut relative to `sequential`, plasticity (each new
site's Dice right after training it) and its loss against `sequential`, the issue's target for the regularisation
and distillation methods (a cut of at least 50% at a plasticity loss of at most 0.05), the gap to `joint`, the final
average with the task inferred (methods with one head per task: `predict` without `--task`), training time
relative to `sequential` and peak memory.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lifelong_nnunet.datasets import build
from lifelong_nnunet.demo import DEMO_SPACING_MM
from lifelong_nnunet.io_utils import read_json, write_json, write_text
from lifelong_nnunet.methods import available_methods, create_method


#: The methods the issue's target applies to: cut sequential's forgetting by >= 50%, losing <= 0.05 plasticity.
TARGETED = ("ewc", "rw", "lwf", "plop", "mib")


def fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--data-root", type=Path, default=Path("data/raw"))
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores // jobs threads")
    args = parser.parse_args()
    methods = args.methods or [m for m in available_methods() if not m.startswith("test-")
                               and "domain" in create_method(m).scenarios]  # the demo is domain-incremental
    methods = ["sequential", "joint"] + [m for m in methods if m not in ("sequential", "joint")]
    tasks = [str(p) for p in build("hippocampus-sites", args.data_root, seed=args.seed, spacing=DEMO_SPACING_MM)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if args.jobs > 1 else None

    def run(m: str) -> None:
        print(f"== {m}", flush=True)
        cmd = [sys.executable, "-m", "lifelong_nnunet.cli", "run", "--tasks", *tasks, "--method", m,
               "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--seed", str(args.seed),
               "-o", str(args.out / m), "-q"]
        subprocess.run(cmd, check=True, env=env)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run, ["joint"] + [m for m in methods if m != "joint"]))  # the longest run first
    summaries = {m: read_json(args.out / m / "summary.json") for m in methods}
    seq, joint = summaries["sequential"], summaries["joint"]
    rows = []
    for m, s in summaries.items():
        cut = None
        if s.get("mean_forgetting") is not None and seq.get("mean_forgetting"):
            cut = 1 - s["mean_forgetting"] / seq["mean_forgetting"]
        loss = None if s.get("plasticity") is None or m == "joint" else seq["plasticity"] - s["plasticity"]
        target = None if m not in TARGETED or cut is None else bool(cut >= 0.5 and loss <= 0.05)
        inferred = (s.get("task_agnostic") or {}).get("final_average_inferred")
        rows.append({"method": m, "final_average": s["final_average"], "bwt": s.get("bwt"), "fwt": s.get("fwt"),
                     "mean_forgetting": s.get("mean_forgetting"), "forgetting_cut_vs_sequential": cut,
                     "plasticity": None if m == "joint" else s.get("plasticity"), "plasticity_loss": loss,
                     "target_met": target, "final_average_task_inferred": inferred,
                     "gap_to_joint": s["final_average"] - joint["final_average"],
                     "train_time_vs_sequential": s["train_seconds"] / seq["train_seconds"],
                     "peak_rss_mb": s.get("peak_rss_mb")})
    lines = ["| method | final avg Dice | BWT | FWT | mean forgetting | forgetting cut vs sequential | plasticity | "
             "plasticity loss | target (cut >= 50%, loss <= 0.05) | gap to joint | final avg, task inferred | "
             "train time vs sequential | peak memory (MiB) |", "|" + "---|" * 13]
    for r in rows:
        target = "—" if r["target_met"] is None else "✓" if r["target_met"] else "✗"
        lines.append(f"| {r['method']} | {fmt(r['final_average'])} | {fmt(r['bwt'])} | {fmt(r['fwt'])} | "
                     f"{fmt(r['mean_forgetting'])} | {fmt(r['forgetting_cut_vs_sequential'], '.0%')} | "
                     f"{fmt(r['plasticity'])} | {fmt(r['plasticity_loss'], '+.3f')} | {target} | "
                     f"{fmt(r['gap_to_joint'], '+.3f')} | {fmt(r['final_average_task_inferred'])} | "
                     f"{fmt(r['train_time_vs_sequential'], '.2f')}x | {fmt(r['peak_rss_mb'], '.0f')} |")
    text = "\n".join(lines) + (f"\n\nhippocampus-sites (3 sites), {args.epochs} epochs x {args.iterations} iterations "
                               f"per stage (joint: the whole sequence's budget), seed {args.seed}, CPU, "
                               f"{args.jobs} run(s) at once with {threads if args.jobs > 1 else 'default'} thread(s) "
                               "each.\n")
    write_text(args.results / "methods.md", text)
    write_json(args.results / "methods.json", rows)
    print(text)


if __name__ == "__main__":
    main()
