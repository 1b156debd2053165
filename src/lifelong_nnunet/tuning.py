"""`lifelong-nnunet tune`: choose a method's parameters on validation cases, never on test cases.

A grid over one method's parameters (the cartesian product of the values given per parameter), each setting run
for every seed as an ordinary run folder with ``score_on: validation``: every task's test split is drawn as in any
run and then left out of that run entirely, and the result matrix is scored on validation cases carved from the rest
of the training split (`tasks.scored_cases`). The score of a setting is its final average validation score (the
headline metric, Dice by default) averaged over seeds; the highest wins, ties going to the smaller forgetting. The
same protocol with `sequential` is run as the reference that forgetting cuts are measured against.

This is Lifelong nnU-Net's ``nnUNet_parameter_search`` done with the benchmark's own protocol: each setting is
scored after the whole sequence, on every task, so the choice weighs stability (little forgetting) against
plasticity (learning the new task) as a user of the final model would. The trade-off plot shows both, one point
per setting. Every run is resumable and a finished one is skipped, so an interrupted tune continues where it
stopped; tune.json is written before the first run and a resume must repeat the same tune.
"""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .console import RunLog
from .errors import MethodParamError, UserInputError
from .run_folder import RunFolder, TuneFolder

REFERENCE_METHOD = "sequential"
#: The summary keys a setting is described by (means over seeds).
SCORES = ("final_average", "mean_forgetting", "plasticity", "bwt")


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the method's parameters (over the spec's own) and its folder name."""
    method: str
    params: dict[str, Any]
    label: str

    @property
    def is_reference(self) -> bool:
        return self.label == REFERENCE_METHOD


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["lambda=10,100,1000", "alpha=0.5,0.9"]`` -> {"lambda": [10, 100, 1000], "alpha": [0.5, 0.9]}. Values are
    read as numbers where they are numbers (``1e3`` too, which YAML would keep as a string), else as YAML."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[1].strip():
            raise UserInputError(f"--grid '{item}' must look like NAME=V1,V2,... (e.g. --grid lambda=100,1000,10000).")
        name, values = (part.strip() for part in item.split("=", 1))
        if name in grid:
            raise UserInputError(f"--grid names '{name}' twice. Give all its values in one flag: --grid "
                                 f"{name}=V1,V2,...")
        grid[name] = [parse_value(v) for v in values.split(",") if v.strip()]
        if len(set(map(repr, grid[name]))) != len(grid[name]):
            raise UserInputError(f"--grid {item} lists a value twice. Give each value once.")
    if not grid:
        raise UserInputError("Give at least one --grid NAME=V1,V2,... (e.g. --grid lambda=100,1000,10000); see "
                             "`lifelong-nnunet methods` for each method's parameters.")
    return grid


def parse_value(text: str) -> Any:
    """A command-line value: an int, a float (``1e3``, ``.5``), else YAML (``true``, ``[1, 2]``, a string)."""
    import yaml
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def settings_of(method: str, base_params: dict, grid: dict[str, list]) -> list[Setting]:
    """Every grid point as a validated setting (a wrong name or value is refused before anything runs), then the
    reference. The label names the varied values only, so folder names stay short."""
    from .methods import create_method
    if method == REFERENCE_METHOD:
        raise UserInputError(f"'{REFERENCE_METHOD}' has no parameters to tune; it is the reference every tune runs. "
                             f"Give the method to tune with --method (e.g. ewc).")
    names = list(grid)
    out = []
    for values in itertools.product(*(grid[n] for n in names)):
        params = {**base_params, **dict(zip(names, values))}
        try:
            create_method(method, params)
        except MethodParamError as e:
            raise UserInputError(e.message("Fix the --grid value (see `lifelong-nnunet methods`).")) from None
        label = ",".join(f"{n}={_label_value(v)}" for n, v in zip(names, values))
        out.append(Setting(method, params, label))
    return out + [Setting(REFERENCE_METHOD, {}, REFERENCE_METHOD)]


def _label_value(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+\-]+", "_", text).strip("_") or "_"


def tune(base: dict, grid: dict[str, list], seeds: list[int], output: str | os.PathLike, *, quiet: bool = False,
         command: str | None = None, reference: str | os.PathLike | None = None) -> dict:
    """Run (or resume) a tune into ``output``; returns tune.json's record with the scores and the chosen setting.

    ``base``: the experiment fields every run shares (as `run` takes them: tasks, method, method_params, budget,
    ...); ``score_on`` is set to validation for every run here, whatever ``base`` says. Every check (spec, grid,
    folder) happens before anything is written."""
    from .experiment import experiment_from_dict
    from .runner import prepare, run_experiment
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserInputError(f"--seeds must give distinct seeds (got {seeds}).")
    from .tasks import resolve_task_folder
    raw_root = base.get("raw_root") or os.environ.get("nnUNet_raw")
    base = {**base, "score_on": "validation",  # tasks as folders: the runs' identities name folders, as `run` does
            "tasks": [str(resolve_task_folder(t, Path(raw_root) if raw_root else None)) for t in base.get("tasks", [])]}
    method = base.get("method") or "sequential"
    settings = settings_of(method, dict(base.get("method_params") or {}), grid)
    experiments = {(s.label, seed): experiment_from_dict({**base, "method": s.method, "method_params": s.params,
                                                          "seed": seed}, f"tune setting {s.label}")
                   for s in settings for seed in seeds}
    folder = TuneFolder(Path(output).expanduser().resolve())
    given = reference_runs(reference, {seed: experiments[(REFERENCE_METHOD, seed)] for seed in seeds}) \
        if reference is not None else {}
    first = next(iter(experiments.values()))
    prepare(first, folder.run(*next(iter(experiments))).root, RunLog(None, True))  # the data, before any write
    identity = {"method": method, "grid": grid, "seeds": list(seeds),
                "experiment": {k: v for k, v in first.identity().items()
                               if k not in ("seed", "method", "method_params")}}
    stored = folder.read_tune()
    if stored is not None and stored.get("identity") != identity:
        raise UserInputError(f"{folder.root} already holds another tune ({folder.tune_file.name} differs). Use a new "
                             f"output folder, or repeat the original command to resume it.")
    if stored is None and folder.root.exists() and any(folder.root.iterdir()):
        raise UserInputError(f"{folder.root} exists and is not empty, but holds no tune ({folder.tune_file.name} is "
                             f"missing). Choose an empty or new output folder.")
    commands = list((stored or {}).get("commands", []))
    if command and (not commands or commands[-1] != command):
        commands.append(command)
    record = {"identity": identity, "commands": commands, "scored_on": _SCORED_ON,
              "reference_runs": {str(seed): str(run.root) for seed, run in given.items()},
              "settings": [{"label": s.label, "method": s.method, "params": s.params} for s in settings]}
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.write_tune(record)
    log = RunLog(folder.log, quiet)
    n = len(experiments)
    log(f"Tune {folder.root}: {method}, {len(settings) - 1} setting(s) + the {REFERENCE_METHOD} reference x "
        f"{len(seeds)} seed(s) = {n} run(s), scored on validation cases (the test cases are never used).")
    summaries: dict[tuple[str, int], dict] = {}
    for k, ((label, seed), exp) in enumerate(experiments.items(), start=1):
        if label == REFERENCE_METHOD and seed in given:  # another tune's finished run: read, never written to
            log(f"[{k}/{n}] {label}, seed {seed}: the given reference {given[seed].root}")
            summaries[(label, seed)] = given[seed].read_summary()
            continue
        run = folder.run(label, seed)
        log(f"[{k}/{n}] {label}, seed {seed}: {'already done' if run.summary.is_file() else 'running'}")
        summaries[(label, seed)] = run_experiment(exp, run.root, quiet=quiet)
        log(f"[{k}/{n}] {label}, seed {seed}: final average {_fmt(summaries[(label, seed)].get('final_average'))}")
    rows, scores = score_settings(settings, seeds, summaries)
    chosen = choose(scores)
    warnings = grid_edge_warnings(grid, next(s.params for s in settings if s.label == chosen)) if chosen else []
    record.update(scores=scores, chosen=chosen, warnings=warnings)
    folder.write_table(rows)
    from .evaluation.plots import plot_tradeoff
    plot_tradeoff(scores, chosen, folder.tradeoff_plot, method, base.get("evaluation", {}).get("report_metric", "dice"))
    folder.write_report(render_tune(record, folder))
    folder.write_tune(record)
    for warning in warnings:
        log(f"Warning: {warning}")
    if chosen is None:
        log("No setting has a defined final average validation score; nothing was chosen (see tune.md).")
    else:
        params = next(s for s in scores if s["label"] == chosen)["params"]
        log(f"Chosen: {chosen} (final average validation {_fmt(_score(scores, chosen))}). Use it with: "
            + " ".join(f"--param {k}={v}" for k, v in params.items()) + f". Report: {folder.report}")
    return record


def reference_runs(reference: str | os.PathLike, experiments: dict[int, Any]) -> dict[int, RunFolder]:
    """The finished `sequential` run of each seed under ``reference``: ``reference/seed<S>`` (another tune's
    ``runs/sequential``), or ``reference`` itself for a single seed. Each must be the very run this tune would make
    (same experiment identity: tasks, budget, score_on validation, seed), else it is refused."""
    root = Path(reference).expanduser().resolve()
    out = {}
    for seed, exp in experiments.items():
        run = RunFolder(root / f"seed{seed}") if (root / f"seed{seed}").is_dir() or len(experiments) > 1 \
            else RunFolder(root)
        if not run.summary.is_file() or not run.spec.is_file():
            raise UserInputError(f"--reference: {run.root} holds no finished run (summary.json is missing). Give a "
                                 f"finished sequential run scored on validation cases (another tune's "
                                 f"runs/sequential), or leave --reference out to run the reference here.")
        stored = run.read_experiment().identity()
        if stored != exp.identity():
            diff = sorted(k for k in set(stored) | set(exp.identity()) if stored.get(k) != exp.identity().get(k))
            raise UserInputError(f"--reference: {run.root} is not the reference this tune would run (differs in: "
                                 f"{', '.join(diff)}). Give a sequential run of the same tasks, budget and seed with "
                                 f"score_on: validation, or leave --reference out.")
        out[seed] = run
    return out


_SCORED_ON = ("validation cases carved from each task's training split (tasks.scored_cases); each task's test cases "
              "were left out of every run")


def score_settings(settings: list[Setting], seeds: list[int], summaries: dict) -> tuple[list[dict], list[dict]]:
    """tune.csv's rows (one per setting and seed) and each setting's means (and sd) over seeds."""
    rows, scores = [], []
    for s in settings:
        values = {key: [summaries[(s.label, seed)].get(key) for seed in seeds] for key in SCORES}
        for i, seed in enumerate(seeds):
            rows.append({"setting": s.label, "method": s.method, "seed": seed,
                         **{key: values[key][i] for key in SCORES}})
        entry = {"label": s.label, "method": s.method, "params": s.params, "reference": s.is_reference}
        for key in SCORES:
            defined = [v for v in values[key] if v is not None and math.isfinite(v)]
            entry[key] = float(np.mean(defined)) if len(defined) == len(seeds) else None
            entry[f"{key}_sd"] = float(np.std(defined, ddof=1)) if len(defined) == len(seeds) > 1 else None
        scores.append(entry)
    reference = next(e for e in scores if e["reference"])["mean_forgetting"]
    for e in scores:  # a cut is only defined when the reference forgot something
        e["forgetting_cut"] = (1 - e["mean_forgetting"] / reference) if reference is not None and reference > 0 \
            and e["mean_forgetting"] is not None else None
    return rows, scores


def grid_edge_warnings(grid: dict[str, list], chosen: dict[str, Any]) -> list[str]:
    """A chosen value at the end of a numeric range of three or more values: the best setting may lie beyond it."""
    out = []
    for name, values in grid.items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) < 3 or len(numbers) != len(values):
            continue
        if chosen[name] in (min(numbers), max(numbers)):
            end = "largest" if chosen[name] == max(numbers) else "smallest"
            out.append(f"{name}={chosen[name]} is the {end} value tried: the best may lie beyond it. Extend the "
                       f"grid past it and tune again.")
    return out


def choose(scores: list[dict]) -> str | None:
    """The setting with the highest mean final average (ties: the smaller mean forgetting); never the reference."""
    candidates = [e for e in scores if not e["reference"] and e["final_average"] is not None]
    if not candidates:
        return None
    best = max(candidates, key=lambda e: (round(e["final_average"], 6), -(e["mean_forgetting"] or 0.0)))
    return best["label"]


def _score(scores: list[dict], label: str) -> float | None:
    return next(e["final_average"] for e in scores if e["label"] == label)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "undefined" if value is None else format(value, spec)


def render_tune(record: dict, folder: TuneFolder) -> str:
    """tune.md: what was tuned, on which cases, the table of settings, the chosen one and how to use it."""
    ident, scores, chosen = record["identity"], record["scores"], record["chosen"]
    exp = ident["experiment"]
    training = exp.get("training", {})
    lines = [f"# Tuning {ident['method']}", "",
             f"- **Scored on:** {record['scored_on']}.",
             f"- **Tasks (training order):** {', '.join(Path(t).name for t in exp['tasks'])}",
             f"- **Budget per stage:** {training.get('epochs')} epochs x {training.get('iterations_per_epoch')} "
             f"iterations; configuration {exp.get('configuration')}; seeds {', '.join(map(str, ident['seeds']))}",
             "- **Score:** final average validation score (mean over seeds); the highest wins, ties to the smaller "
             "forgetting.", ""]
    if chosen is None:
        lines += ["**Nothing chosen:** no setting has a defined final average validation score.", ""]
    else:
        params = next(e["params"] for e in scores if e["label"] == chosen)
        lines += [f"**Chosen: {chosen}** (final average {_fmt(_score(scores, chosen))}). Use it with `"
                  + " ".join(f"--param {k}={v}" for k, v in params.items()) + "`.", ""]
        lines += [f"**Warning:** {w}" for w in record.get("warnings") or []] + \
            ([""] if record.get("warnings") else [])
    sd = len(ident["seeds"]) > 1

    def cell(e: dict, key: str, spec: str = ".3f") -> str:
        value = _fmt(e[key], spec)
        return f"{value} ± {_fmt(e[key + '_sd'], spec)}" if sd and e.get(key + "_sd") is not None else value
    lines += ["| setting | final average | mean forgetting | forgetting cut vs sequential | plasticity (new task) "
              "| BWT |", "|---|---|---|---|---|---|"]
    for e in scores:
        mark = " (chosen)" if e["label"] == chosen else " (reference)" if e["reference"] else ""
        lines.append(f"| {e['label']}{mark} | {cell(e, 'final_average')} | {cell(e, 'mean_forgetting')} | "
                     f"{_fmt(e['forgetting_cut'], '.0%')} | {cell(e, 'plasticity')} | {cell(e, 'bwt', '+.3f')} |")
    lines += ["", "Plasticity: mean score on each task right after training on it. Forgetting: mean drop from each "
              "earlier task's best score to its final one (docs/metrics.md).", "",
              f"![stability-plasticity trade-off]({folder.relative(folder.tradeoff_plot)})", "",
              "Each setting is an ordinary run folder under `runs/<setting>/seed<seed>/` with its own report."]
    return "\n".join(lines) + "\n"
