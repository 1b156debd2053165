"""nnU-Net's worker pools during planning: spawned processes (nnU-Net's own) against one thread in the planning process.

Plans and preprocesses the same small synthetic tasks both ways, from the same raw view, and reports the wall time of
each and whether every file written (fingerprint, plans, preprocessed arrays and their properties) is the same bytes.
The properties (.pkl) are compared unpickled, since they hold nothing but numbers, shapes and the case's file names.

    .venv/bin/python benchmarks/planning_pools.py --tasks 2 --configuration 2d

Writes benchmarks/results/planning_pools.{md,json}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import platform
import shutil
import tempfile
import time
from pathlib import Path

from lifelong_nnunet.datasets.synthetic import build_synthetic_sites
from lifelong_nnunet.io_utils import write_json, write_text
from lifelong_nnunet.nnunet import planning
from lifelong_nnunet.tasks import load_task, make_test_split

RESULTS = Path(__file__).parent / "results"


def digest(path: Path) -> str:
    if path.suffix == ".pkl":
        return hashlib.sha256(repr(sorted(pickle.loads(path.read_bytes()).items())).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan(raw_view: Path, root: Path, configuration: str, names: list, in_process: bool) -> tuple[float, dict]:
    shutil.copytree(raw_view, root / "nnUNet_raw", symlinks=True)
    planning.IN_PROCESS_PLANNING_BYTES = 2**62 if in_process else -1  # read by `_pools_for`
    args = json.dumps({"root": str(root), "configuration": configuration, "tasks": names, "given_plans": False,
                       "planning": planning.NNUNET_DEFAULTS.to_dict()})
    start = time.perf_counter()
    planning._child_main([args])
    seconds = time.perf_counter() - start
    pre = root / "nnUNet_preprocessed"
    return seconds, {str(p.relative_to(pre)): digest(p) for p in sorted(pre.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--configuration", default="2d")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="planning_pools_"))
    try:
        sites = build_synthetic_sites(scratch / "raw", n_sites=args.tasks, cases_per_site=4, shape=(24, 24, 24))
        tasks = [load_task(f) for f in sites]
        for t in tasks:
            t.test_cases = make_test_split(t, 0.25, 1, 0)
        ws = planning.Workspace(scratch / "cache", tasks, args.configuration)
        ws._link_training_cases(scratch / "view")
        names = [[t.name, t.dataset_id] for t in tasks]
        # processes first, then in-process, then processes again: machine noise hits both
        runs = [("processes", False), ("in_process", True), ("processes", False), ("in_process", True)]
        seconds: dict[str, list[float]] = {"processes": [], "in_process": []}
        files = {}
        for i, (mode, flag) in enumerate(runs):
            s, files[mode] = plan(scratch / "view", scratch / f"{mode}_{i}", args.configuration, names, flag)
            seconds[mode].append(round(s, 1))
        same = files["processes"] == files["in_process"]
        differ = sorted(k for k in files["processes"] if files["processes"][k] != files["in_process"].get(k))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"tasks": args.tasks, "cases_per_task": 4, "shape": [24, 24, 24], "configuration": args.configuration,
              "seconds": seconds, "files_compared": len(files["processes"]), "identical": same, "differ": differ,
              "machine": f"{platform.processor() or platform.machine()}, shared 2-core machine under load from "
                         "other developers' jobs"}
    write_json(RESULTS / "planning_pools.json", result)
    write_text(RESULTS / "planning_pools.md", "\n".join([
        "# Planning with nnU-Net's worker processes or in the planning process",
        "",
        f"{args.tasks} synthetic tasks of 4 cases (24^3), configuration {args.configuration}, planned and "
        "preprocessed from the same raw view, alternating, twice each. Measured on a shared, loaded 2-core machine "
        "(other developers' jobs ran at the same time), so the times are inflated and noisy.",
        "",
        "| pools | wall seconds |", "|---|---|",
        f"| nnU-Net's spawned processes | {', '.join(map(str, seconds['processes']))} |",
        f"| one thread in the planning process | {', '.join(map(str, seconds['in_process']))} |",
        "",
        f"Files compared: {len(files['processes'])}; identical: {'yes' if same else 'no: ' + ', '.join(differ)}.",
        ""]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
