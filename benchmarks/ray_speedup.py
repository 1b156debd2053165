"""Wall time of the same two tiny runs, one after the other (the default executor) and in parallel with Ray.

All sweeps run in this one process, on the same data, with the planning done beforehand (not timed), so the
comparison is the executors only: local sequential runs use torch's default threads (all cores), Ray runs get one
CPU (one torch thread) each on a local Ray instance with 2 CPUs. The Ray time includes starting Ray and its worker
processes, as a user would see it. A third, sequential sweep with one torch thread separates the gain of running
in parallel from the gain of one thread per process.

    .venv/bin/python benchmarks/ray_speedup.py [--epochs 2] [--iterations 10] [--repeats 1]

The numbers are medians over the interleaved repeats. Ray's gain depends on how busy the machine is: under
oversubscription a 2-thread torch process loses far more than two 1-thread ones, so the result records the load
average. Writes benchmarks/results/ray_speedup.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lifelong_nnunet.console import RunLog
from lifelong_nnunet.datasets.synthetic import build_synthetic_sites
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.io_utils import write_json
from lifelong_nnunet.runner import prepare
from lifelong_nnunet.sweep import plan_runs, run_sweep, sweep_spec_from_dict
from lifelong_nnunet.sweep.ray_backend import plan_shared_workspaces

RESULTS = Path(__file__).parent / "results" / "ray_speedup.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions (sequential, Ray, ...)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ray_speedup_") as tmp:
        tmp = Path(tmp)
        sites = build_synthetic_sites(tmp / "raw", n_sites=2, cases_per_site=6)
        spec = sweep_spec_from_dict({
            "tasks": [str(p) for p in sites], "methods": ["sequential"], "orderings": "reverse", "device": "cpu",
            "training": {"epochs": args.epochs, "iterations_per_epoch": args.iterations, "val_iterations": 2},
            "cache_dir": str(tmp / "cache")}, "benchmark")
        runs, _ = plan_runs(spec)
        tasks, _ = prepare(experiment_from_dict(dict(runs[0].experiment)), tmp / "probe", RunLog(None, True))
        plan_shared_workspaces(runs, tasks, print)  # not timed: both executors reuse it

        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"sequential": [], "ray": [], "sequential_1_thread": []}
        default_threads = torch.get_num_threads()
        for i in range(args.repeats):  # interleaved, so a change in machine load hits every executor
            started = time.perf_counter()
            sequential = run_sweep(spec, tmp / f"sequential{i}", quiet=True)
            times["sequential"].append(time.perf_counter() - started)
            started = time.perf_counter()
            parallel = run_sweep(spec, tmp / f"ray{i}", use_ray=True, ray_num_cpus=2, cpus_per_run=1, quiet=True)
            times["ray"].append(time.perf_counter() - started)
            torch.set_num_threads(1)  # the Ray runs' thread count, one run at a time: parallelism alone
            started = time.perf_counter()
            run_sweep(spec, tmp / f"sequential_1_thread{i}", quiet=True)
            times["sequential_1_thread"].append(time.perf_counter() - started)
            torch.set_num_threads(default_threads)
        load_after = os.getloadavg()
    t_sequential, t_ray = statistics.median(times["sequential"]), statistics.median(times["ray"])
    t_one = statistics.median(times["sequential_1_thread"])

    finals = {name: [r["final_average"] for r in result["runs"]]
              for name, result in (("sequential", sequential), ("ray", parallel))}
    result = {
        "what": "2 runs (sequential method, given and reversed order of 2 synthetic sites, 6 cases of 32^3 each), "
                f"{args.epochs} epochs x {args.iterations} iterations per stage, CPU",
        "sequential_seconds": round(t_sequential, 1), "ray_seconds": round(t_ray, 1),
        "speedup": round(t_sequential / t_ray, 2), "repeats": args.repeats,
        "sequential_1_thread_seconds": round(t_one, 1), "speedup_vs_sequential_1_thread": round(t_one / t_ray, 2),
        "all_seconds": {k: [round(t, 1) for t in v] for k, v in times.items()},
        "sequential_threads": f"torch default ({default_threads})", "ray": "local instance, 2 CPUs, 1 CPU per run",
        "final_average": finals,  # not bit-identical: torch's thread count changes the order of float sums
        "max_final_average_difference": max(abs(a - b) for a, b in zip(finals["sequential"], finals["ray"])),
        "cpu_count": os.cpu_count(), "load_average_1min_before_after": [load_before[0], load_after[0]],
        "python": platform.python_version(),
    }
    write_json(args.output, result)
    print(f"sequential {t_sequential:.1f} s, Ray {t_ray:.1f} s: {t_sequential / t_ray:.2f}x; sequential with one "
          f"thread {t_one:.1f} s: {t_one / t_ray:.2f}x. Wrote {args.output}")


if __name__ == "__main__":
    main()
