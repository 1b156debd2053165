"""Lifelong use: add stages to a finished run when new data arrive, months later, after the old training data may
be gone (``lifelong-nnunet extend RUN --task T``).

The run folder holds everything the next stage needs: the plans (the new task is preprocessed with exactly them,
so the architecture never changes), the task records (labels, channels, case IDs, where the test files are), the
method's state in the last stage's model (importances, anchors, teachers, heads, decoders) and, for rehearsal
only, its declared buffer. Earlier tasks are re-evaluated on their held-out test cases while those still exist.
``run --tasks A`` followed by ``extend --task B`` gives the same stage models as ``run --tasks A B`` (tested).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .console import RunLog, progress_bar
from .errors import UserInputError
from .experiment import experiment_from_dict
from .labels import LabelSpace
from .run_folder import RunFolder
from .runner import advance, default_cache_dir, is_complete, method_for, model_dataset_json, write_run_records
from .tasks import (Task, check_case, check_sequence, load_task, resolve_task_folder, scored_cases, task_from_record,
                    task_record)


def extend_run(run_dir: str | os.PathLike, new_tasks: list[str], *, epochs: int | None = None,
               iterations: int | None = None, device: str | None = None, cache_dir: str | None = None,
               raw_root: str | None = None, keep_cache: bool = False, quiet: bool = False) -> dict:
    """Train ``new_tasks`` as new stages of the finished run in ``run_dir`` (or resume an interrupted extension),
    evaluate every task after each new stage, and update the results, summary and report.

    The new tasks' preprocessed data leave the cache once their stages are trained, unless ``keep_cache``: the
    cache then never holds arrays of a task the model has already learned (the privacy promise of lifelong use)."""
    from .nnunet.planning import Workspace

    run = RunFolder(Path(run_dir).resolve())
    log = RunLog(None, quiet)
    run.require_run()
    stored = run.read_experiment()
    exp = experiment_from_dict({**stored.identity(), "device": device or "auto", "cache_dir": cache_dir,
                                "raw_root": raw_root}, str(run.spec))
    records = run.read_task_records() or _records_of_format_1(run, stored)
    schedule = run.read_schedule()
    trained = {t for s in schedule if run.model(s.index).is_file() for t in s.train_tasks}
    if not new_tasks:
        raise UserInputError("Give the new task(s) with --task (an nnU-Net raw dataset folder, name or ID).")
    raw = Path(raw_root) if raw_root else (Path(os.environ["nnUNet_raw"]) if os.environ.get("nnUNet_raw") else None)
    folders = [resolve_task_folder(t, raw) for t in new_tasks]
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise UserInputError(f"--task lists a dataset twice ({', '.join(names)}). Give each new task once.")
    resuming = all(n in records for n in names) and not all(n in trained for n in names)
    if not resuming:
        done = [n for n in names if n in records]
        if done:
            raise UserInputError(f"{done[0]} is already a task of the run in {run.root} (it has: "
                                 f"{', '.join(records)}). A task is trained once; give a new dataset.")
        if not is_complete(run, schedule, [task_from_record(r) for r in records.values()]):
            raise UserInputError(f"The run in {run.root} is not finished. Repeat the command that started it (or the "
                                 f"last 'extend') first; it resumes where it stopped. Then extend it.")
    # tasks already trained are taken from the run's records (their training data may be gone); the others are
    # read from their folders and checked like any task of `run`
    old = [task_from_record(records[n]) for n in records if n in trained]
    pending = [n for n in records if n not in trained] if resuming else []
    fresh = [load_task(Path(records[n]["folder"])) for n in pending] if resuming else [load_task(f) for f in folders]
    check_sequence([*old, *fresh], exp.scenario)
    if exp.scenario == "class" and not resuming:
        _check_adds_structures(old, fresh)
    _check_cases(fresh, log, records if resuming else {}, exp)
    tasks = [*old, *fresh]
    labels = LabelSpace.from_tasks(tasks, exp.scenario)
    method = method_for(exp, labels)
    stages = _extended_schedule(method, schedule, tasks, epochs, iterations, run, resuming)
    exp.tasks = [str(t.folder) for t in tasks]

    log.path = run.log
    write_run_records(run, exp, tasks, stages, labels)
    run.write_dataset_json(model_dataset_json(dict(tasks[0].dataset_json, numTraining=len(tasks[0].train_cases)),
                                              labels))
    log(f"Extending {run.root} with {', '.join(t.name for t in fresh)}: method '{method.name}', "
        f"{len(stages) - len([s for s in stages if run.model(s.index).is_file()])} new stage(s), the run's plans")
    plans = run.read_plans()
    workspace = Workspace(Path(exp.cache_dir) if exp.cache_dir else default_cache_dir(), fresh, exp.configuration,
                          plans=plans)
    workspace.ensure_planned(log)
    summary = advance(exp, run, workspace, tasks, method, stages, labels, log, origin="extend")
    if not keep_cache:  # trained: their preprocessed copies leave the cache (the raw data are the user's to keep)
        workspace.remove()
        log(f"Removed the new task(s)' preprocessed data from the cache ({workspace.root})")
    return summary


def _records_of_format_1(run: RunFolder, exp) -> dict[str, dict]:
    """A run written before tasks.json existed: its task records rebuilt from the task folders, which must still
    hold every case the run knew (the test split is the stored one)."""
    splits = run.read_splits()
    records = {}
    for folder in exp.tasks:
        try:
            task = load_task(Path(folder))
        except UserInputError:
            raise UserInputError(
                f"{run.root} was written by an older lifelong-nnunet that kept no task records (tasks.json), and its "
                f"task {folder} cannot be read any more, so the run cannot be extended. Restore that dataset, or start "
                f"a new run.") from None
        task.test_cases = list(splits.get(task.name, []))
        records[task.name] = task_record(task)
    return records


def _check_adds_structures(old: list[Task], fresh: list[Task]) -> None:
    """Class scenario: a new task must bring at least one structure the model does not segment yet."""
    known = {name for t in old for name in t.labels}
    for t in fresh:
        new = sorted(set(t.labels) - known - {"background"})
        if not new:
            raise UserInputError(
                f"{t.folder / 'dataset.json'} annotates only structures the run already segments "
                f"({', '.join(sorted(set(t.labels) - {'background'}))}). In the class scenario a new task must add a "
                f"structure; for new images of known structures, start a domain-incremental run.")
        known |= set(t.labels)


def _check_cases(tasks: list[Task], log: RunLog, records: dict, exp) -> None:
    """Every image and label of the new tasks, as `run` checks them; the test split is drawn as `run` draws it (or
    kept from the record when an interrupted extension resumes)."""
    with progress_bar(log.quiet) as bar:
        job = bar.add_task("Checking data", total=sum(len(t.cases) for t in tasks), info="")
        for t in tasks:
            for case in t.cases.values():
                check_case(t, case)
                bar.advance(job)
            held_out = scored_cases(t, exp.test_split.fraction, exp.test_split.min_cases, exp.seed, exp.score_on)
            t.test_cases = list(records[t.name]["test_cases"]) if t.name in records else held_out


def _extended_schedule(method, stored: list, tasks: list[Task], epochs: int | None, iterations: int | None,
                       run: RunFolder, resuming: bool) -> list:
    """The method's schedule over every task, whose first stages must be the ones already run; the new stages
    get this extension's budget (or, resuming, keep the one recorded when the extension started)."""
    full = method.schedule([t.name for t in tasks])
    done = [s for s in stored if run.model(s.index).is_file()] if resuming else stored
    if [s.plan for s in full[: len(done)]] != [s.plan for s in done]:
        raise UserInputError(
            f"Method '{method.name}' does not train one stage after another on the tasks as they arrive (its "
            f"schedule for the longer sequence changes stages already trained), so the run in {run.root} cannot be "
            f"extended. Start a new run with the whole sequence.")
    if resuming:
        return stored
    added = [replace(s, epochs=epochs, iterations_per_epoch=iterations) for s in full[len(done):]]
    return [*done, *added]


def run_from_stock_model(exp, run_dir: str | os.PathLike, quiet: bool = False) -> dict:
    """``run --start-from MODEL_FOLDER``: a model trained with stock nnU-Net v2 is stage 1 (recorded as imported,
    not trained here), its plans are the run's plans and its task is the first task; the tasks given train the next
    stages as in any run. Its own training data are not needed, so methods whose state comes from that data
    (importances, calibrations, a replay buffer) are refused."""
    from .methods import available_methods, create_method
    from .nnunet.planning import Workspace
    from .nnunet.stock_model import read_stock_model
    from .runner import prepare

    run = RunFolder(Path(run_dir).resolve())
    log = RunLog(None, quiet)
    stock = read_stock_model(exp.start_from["folder"], exp.start_from.get("fold", 0))
    method = create_method(exp.method, exp.method_params)  # its parameters checked before anything is read
    if method.keeps_old_data or method.learns_state_from_task_data:
        from_model = [m for m in available_methods() if not (create_method(m).keeps_old_data
                                                            or create_method(m).learns_state_from_task_data)]
        raise UserInputError(
            f"Method '{method.name}' computes its state from the first task's training data (importances, a "
            f"calibration or a replay buffer), which a model imported with --start-from does not bring. Methods that "
            f"start from the model alone: {', '.join(from_model)}.")
    if exp.configuration != stock.configuration:
        log(f"Configuration {stock.configuration}: the imported model's (the spec's {exp.configuration} does not "
            f"apply to a model that was trained as {stock.configuration})")
        exp.configuration = stock.configuration
    imported = Task(stock.folder / stock.dataset_name, {**stock.dataset_json, "file_ending":
                    stock.dataset_json.get("file_ending", ".nii.gz")}, {}, [], recorded_train=[])
    if not exp.tasks or Path(exp.tasks[0]).name != stock.dataset_name:
        exp.tasks = [str(imported.folder), *exp.tasks]
    if len(exp.tasks) < 2:
        raise UserInputError("Give the new task(s) to train with --tasks; the imported model is the first stage.")
    tasks, labels = prepare(exp, run.root, log, imported=imported)
    method = method_for(exp, labels)
    stages = method.schedule([t.name for t in tasks])
    if is_complete(run, stages, tasks):
        log(f"Run in {run.root} is already complete; nothing to do.")
        return run.read_summary()
    log.path = run.log
    write_run_records(run, exp, tasks, stages, labels)
    run.write_plans(stock.plans)
    run.write_dataset_json(model_dataset_json(dict(stock.dataset_json, numTraining=0), labels))
    log(f"Run {run.root}: stage 1 imported from {stock.checkpoint} (trainer {stock.trainer_name}), method "
        f"'{method.name}', {len(tasks) - 1} new task(s)")
    workspace = Workspace(Path(exp.cache_dir) if exp.cache_dir else default_cache_dir(), tasks[1:],
                          exp.configuration, plans=stock.plans)
    workspace.ensure_planned(log)
    _import_first_stage(run, stock, method, stages[0], labels, exp)
    return advance(exp, run, workspace, tasks, method, stages, labels, log, origin="run")


def _import_first_stage(run: RunFolder, stock, method, stage, labels: LabelSpace, exp) -> None:
    """Stage 1's model is the stock network with its weights, as the method would hold it after that stage."""
    import hashlib
    from datetime import datetime, timezone

    from .nnunet.trainer import build_network
    from .run_folder import save_model
    from .runner import known_labels_json
    from .stages.training import versions
    if run.model(stage.index).is_file():
        return
    djson = known_labels_json(model_dataset_json(dict(stock.dataset_json, numTraining=0), labels), labels, [])
    net = build_network(stock.plans, stock.configuration, djson, deep_supervision=True)
    net.load_state_dict(stock.weights)
    net = method.adapt_network(net, list(stage.train_tasks))
    digest = hashlib.sha256(stock.checkpoint.read_bytes()).hexdigest()[:16]
    save_model(run.model(stage.index), net.state_dict(), method.state_dict(),
               {"stage": stage.index, "trained_on": list(stage.train_tasks), "tasks_seen": list(stage.train_tasks),
                "imported_from": str(stock.checkpoint), "trainer_name": stock.trainer_name, "train_seconds": 0.0})
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.record_history({"stage": stage.index, "origin": "imported", "started": now, "finished": now,
                         "datasets": [{"name": stage.train_tasks[0], "n_cases": None, "n_train": "?",
                                       "n_test": 0, "fingerprint": f"checkpoint {digest}"}],
                         "budget": {}, "imported_from": str(stock.checkpoint), "versions": versions()})
