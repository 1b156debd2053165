"""Choose the regularisation and distillation methods' defaults with `lifelong-nnunet tune`, on synthetic-sites.

    .venv/bin/python benchmarks/tune_defaults.py [--out runs/tune_defaults] [--methods ewc rw lwf mib]
        [--configuration 3d_fullres] [--epochs 4] [--iterations 25] [--sites 3] [--cases 10]
        [--grid METHOD:NAME=V1,V2 ...]

Each method is tuned over its grid (GRIDS) on the synthetic-sites sequence, every setting scored on validation cases
carved from the training split (the test cases are never used). The `sequential` reference runs first (so a
sequence on which it forgets nothing is seen before any tuning) and is shared by every method's tune: the same run
(`score_on: validation`, same spec and seed), given to each tune with `--reference`. Writes
benchmarks/results/tune_defaults.{md,json}: per method its table and the chosen setting. The defaults in the
methods' code come from this table (their docstrings say so) and are checked on the demo by benchmarks/methods.py.
Resumable: every run is an ordinary run folder, and a finished one is skipped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lifelong_nnunet.datasets.synthetic import build_synthetic_sites
from lifelong_nnunet.io_utils import read_json, write_json, write_text

#: The grids: each spans two orders of magnitude or more around the earlier default, in factor steps.
GRIDS = {
    "ewc": ["lambda=100,1000,10000,100000"],
    "rw": ["lambda=0.4,4,40"],
    "lwf": ["lambda=1,4,16"],
    "mib": ["lambda=1,10,100"],
    "plop": ["pod_lambda=0.01,0.1,1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tune_defaults"))
    parser.add_argument("--methods", nargs="*", default=["ewc", "rw", "lwf", "mib"])
    parser.add_argument("--configuration", default="3d_fullres", choices=["3d_fullres", "2d"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--grid", nargs="*", default=[], help="METHOD:NAME=V1,V2: replaces METHOD's grid")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    for item in args.grid:
        method, grid = item.split(":", 1)
        GRIDS[method] = [grid]
    out = args.out.resolve()
    tasks = [str(p) for p in build_synthetic_sites(out / "raw", n_sites=args.sites, cases_per_site=args.cases)]
    common = ["--configuration", args.configuration, "--epochs", str(args.epochs), "--iterations",
              str(args.iterations), "--cache-dir", str(out / "cache"), "-q"]
    reference = out / "sequential"
    spec = out / "sequential.yaml"
    write_text(spec, json.dumps({"tasks": tasks, "score_on": "validation"}))  # JSON is YAML
    print("== sequential (the reference)", flush=True)
    subprocess.run([sys.executable, "-m", "lifelong_nnunet.cli", "run", str(spec), *common, "-o", str(reference)],
                   check=True)
    results = {}
    for method in args.methods:
        folder = out / f"tune_{method}"
        grid = [a for g in GRIDS[method] for a in ("--grid", g)]
        print(f"== tune {method}: {' '.join(GRIDS[method])}", flush=True)
        subprocess.run([sys.executable, "-m", "lifelong_nnunet.cli", "tune", "--tasks", *tasks, *common, "--method",
                        method, *grid, "--reference", str(reference), "-o", str(folder)], check=True)
        record = read_json(folder / "tune.json")
        results[method] = {"grid": GRIDS[method], "chosen": record["chosen"], "scores": record["scores"],
                           "report": str(folder / "tune.md")}
    budget = (f"synthetic-sites ({args.sites} sites x {args.cases} cases, 32^3), {args.configuration}, {args.epochs} "
              f"epochs x "
              f"{args.iterations} iterations per stage, seed 0, CPU; scored on validation cases carved from the "
              f"training split (the test cases were never used)")
    lines = ["# Defaults chosen with `lifelong-nnunet tune`", "", budget + ".", ""]
    for method, r in results.items():
        lines += [f"## {method}: chosen {r['chosen']}", "", "| setting | final average | mean forgetting | "
                  "forgetting cut vs sequential | plasticity |", "|---|---|---|---|---|"]
        for e in r["scores"]:
            def f(v, spec=".3f"):
                return "—" if v is None else format(v, spec)
            lines.append(f"| {e['label']}{' (chosen)' if e['label'] == r['chosen'] else ''} | "
                         f"{f(e['final_average'])} | {f(e['mean_forgetting'])} | {f(e['forgetting_cut'], '.0%')} | "
                         f"{f(e['plasticity'])} |")
        lines.append("")
    write_text(args.results / "tune_defaults.md", "\n".join(lines))
    write_json(args.results / "tune_defaults.json", {"conditions": budget, "methods": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
