"""The deployable model of a run: `predict` on new NIfTI files and `export` to a stock nnU-Net v2 model folder."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import UserInputError
from .io_utils import atomic_directory, atomic_write, write_json
from .names import names_task
from .run_folder import (
    NnunetModelFolder,
    PredictionFolder,
    RunFolder,
    RunFolderError,
    is_one_model_per_task,
    load_model,
)
from .task_inference import TASK_CHOICES, TaskChoice, choose, image_features


def select_model(run_dir: Path, task: str | None = None) -> Path:
    """The model a run delivers: the last stage's, or for one-model-per-task methods the given task's."""
    run = RunFolder(Path(run_dir))
    run_dir = run.root
    run.require_run()
    exp = run.read_experiment()
    tasks = run.read_tasks()
    schedule = run.read_schedule()
    separate = is_one_model_per_task(schedule)
    models = run.stage_models()
    if task is not None:
        matches = [s for s in schedule if any(names_task(t, task) for t in s.train_tasks)]
        if not matches:
            raise UserInputError(f"--task '{task}' is not a task of the run in {run_dir}; its tasks are "
                                 f"{', '.join(tasks)}.")
        index = matches[-1].index if separate else schedule[-1].index
    else:
        if separate:
            raise UserInputError(f"The run in {run_dir} ('{exp.method}') holds one specialist model per task; "
                                 f"choose one with --task (one of {', '.join(tasks)}).")
        index = schedule[-1].index
    if index not in models:
        raise UserInputError(f"{run_dir} has no trained model for stage {index} yet. Finish the run first "
                             f"(repeat the 'lifelong-nnunet run' command to resume it).")
    return models[index]


def _full_task_name(seen: list[str], task: str | None) -> str | None:
    return next((t for t in seen if names_task(t, task)), task)


def _load_run_network(run_dir: Path, model_path: Path):
    """The run's method and its whole network (all tasks' parts) with the stored weights."""
    from .methods import Method, create_method
    from .nnunet.trainer import build_network
    run = RunFolder(Path(run_dir))
    exp = run.read_experiment()
    plans, djson = run.read_plans(), run.read_dataset_json()
    payload = load_model(model_path)
    labels = run.read_labels()
    try:
        method = create_method(exp.method, exp.method_params, labels=labels)
    except UserInputError:
        method = Method(labels=labels)  # not installed here: fine as long as the weights fit a plain nnU-Net network
    method.load_state_dict(payload["method_state"])  # e.g. the architecture chosen for each task
    seen = payload["info"]["tasks_seen"]
    net = method.adapt_network(build_network(plans, exp.configuration, djson, deep_supervision=False), seen)
    if method.labels is not None:
        from .runner import known_labels_json
        djson = known_labels_json(djson, method.labels, seen)
    try:
        net.load_state_dict(payload["network_weights"])
    except RuntimeError:
        raise UserInputError(f"The weights in {model_path} do not fit the network of method '{exp.method}'. "
                             f"Install the version of lifelong-nnunet that made this run.") from None
    return method, net, seen, plans, djson, exp


def plans_for_images(run_dir: Path, task: str | None, seen: list[str]) -> dict:
    """The plans that preprocess new images: those of ``task`` (its own normalisation on the run's architecture), or
    without a task the run's plans when every task seen is normalised alike. When the tasks' normalisations differ
    (a CT task and an MR task, or two CT windows), an image's task decides how it is normalised, so it must be
    named: refusing beats normalising it with another task's window."""
    from .nnunet.normalisation import describe, same_normalisation, task_normalisation
    run = RunFolder(Path(run_dir))
    configuration = run.read_experiment().configuration
    if task is not None:
        return run.task_plans(task, configuration)
    stored, plans = run.read_normalisation(), run.read_plans()
    own = task_normalisation(plans, configuration)  # what a task without a record was normalised with
    norms = {t: stored.get(t, own) for t in seen}
    first = next(iter(norms.values()), own)
    if any(not same_normalisation(first, n) for n in norms.values()):
        raise UserInputError(
            f"The tasks of the run in {run.root} normalise their images differently ("
            + "; ".join(f"{t}: {describe(n)}" for t, n in norms.items())
            + "), so an image's task decides how it is normalised. Name it with --task.")
    if same_normalisation(first, own):
        return plans  # the run's own plans, as older runs and stock exports have them
    return run.task_plans(next(iter(norms)), configuration)


def find_inputs(folder: Path, n_channels: int, file_ending: str) -> dict[str, list[Path]]:
    """Cases in nnU-Net naming (``case_0000.nii.gz`` per channel); single-channel files may omit the suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"Input folder {folder} does not exist. Give a folder of {file_ending} images.")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(file_ending))
    if not files:
        raise UserInputError(f"{folder} holds no '{file_ending}' images. Put the images to segment there "
                             f"(nnU-Net naming: CASE_0000{file_ending} per channel).")
    cases: dict[str, list[Path]] = {}
    pattern = re.compile(rf"^(.*)_(\d{{4}}){re.escape(file_ending)}$")
    for p in files:
        m = pattern.match(p.name)
        if m:
            cases.setdefault(m.group(1), []).append(p)
        elif n_channels == 1:
            cases[p.name[: -len(file_ending)]] = [p]
        else:
            raise UserInputError(f"{p} does not follow nnU-Net naming (CASE_XXXX{file_ending}), which this "
                                 f"{n_channels}-channel model needs. Rename the channel files.")
    for case, paths in cases.items():
        if len(paths) < n_channels:
            raise UserInputError(f"Case '{case}' in {folder} has {len(paths)} channel file(s) but the model needs "
                                 f"{n_channels}. Add the missing channels named {case}_XXXX{file_ending}.")
        if len(paths) > n_channels:
            raise UserInputError(f"Case '{case}' in {folder} has {len(paths)} channel files but the model takes "
                                 f"{n_channels} ({case}_0000{file_ending} to {case}_{n_channels - 1:04d}"
                                 f"{file_ending}). Remove the extra ones, or use a model trained on "
                                 f"{len(paths)} channels.")
    return cases


def task_chooser(run: RunFolder, method, network, seen: list[str], rule: str,
                 make_segmenter: Callable[[torch.nn.Module], Any],
                 up_to_stage: int | None = None) -> Callable[[Any, dict], TaskChoice] | None:
    """How the task of an image is chosen when none is given: ``None`` when the method has no per-task parts to
    choose between; else a function of (raw image, its properties) that returns a `TaskChoice` by ``rule``:

    - ``"description"`` (default): the stages' image descriptions (`task_inference`), scored on the image as nnU-Net
      preprocesses it; a run without them is refused (UserInputError naming the missing file);
    - ``"entropy"``: the method's own rule (`Method.choose_task`), every head segmenting the image.

    ``up_to_stage``: only the descriptions of stages up to this one (the model of an earlier stage)."""
    if rule not in TASK_CHOICES:
        raise UserInputError(f"--task-choice '{rule}' is not a rule; use one of {', '.join(TASK_CHOICES)}.")
    if not method.infers_task:
        return None
    if rule == "entropy":
        def by_entropy(image, props):
            return method.choose_task(network, lambda m: make_segmenter(m).predict_arrays(
                image, props, probabilities=True)[1], seen)
        return by_entropy
    stages = [s.index for s in run.read_schedule() if set(s.train_tasks) & set(seen)
              and (up_to_stage is None or s.index <= up_to_stage)]
    descriptions = run.read_task_descriptions(stages)
    preprocessor = make_segmenter(method.network_for_task(network, seen[-1]))

    def by_description(image, props):
        return choose(descriptions, image_features(preprocessor.preprocess(image, props)), seen)
    return by_description


def part_gate(run: RunFolder, method, network, seen: list[str], up_to_stage: int | None = None
              ) -> Callable[[Any], dict] | None:
    """For a method that gates its parts by the stages' image descriptions (`Method.gate_parts`): a function of one
    preprocessed image that sets the gate on ``network`` and returns the image's record (the tasks kept and gated
    out, the out-of-distribution flag, the distance to each task). ``None`` when the method does not gate this
    network. A stage without a description (trained before the descriptions existed) raises `RunFolderError`.

    ``up_to_stage``: only the descriptions of stages up to this one (the model of an earlier stage)."""
    if not method.describes_images or method.infers_task or method.gate_parts(network, {}) is None:
        return None
    stages = [s.index for s in run.read_schedule() if set(s.train_tasks) & set(seen)
              and (up_to_stage is None or s.index <= up_to_stage)]
    descriptions = run.read_task_descriptions(stages)

    def gate(preprocessed) -> dict:
        features = image_features(preprocessed)
        distance = {t: d.distance(features) for t, d in descriptions.items()}
        fit = {t: distance[t] <= descriptions[t].threshold for t in descriptions}
        kept = method.gate_parts(network, fit)
        return {"rule": "description-gate", "kept": ";".join(kept),
                "gated_out": ";".join(t for t in seen if t not in kept), "ood": not any(fit.values()),
                **{f"score_{t}": v for t, v in distance.items()},
                **{f"threshold_{t}": d.threshold for t, d in descriptions.items()}}
    return gate


def predict(run_dir: Path, input_dir: Path, output_dir: Path, task: str | None = None, device: str = "auto",
            probabilities: bool = False, mirroring: bool = False, progress=None, task_choice: str = "description",
            warn: Callable[[str], None] = print) -> list[Path]:
    """Segment every case in ``input_dir`` with the run's final model; one label map per case, same geometry.

    Without ``task``, a model with one head per task chooses the head per case (`task_chooser`, rule
    ``task_choice``) and writes every choice, its margin and its out-of-distribution flag to the per-case file
    (`PredictionFolder.task_choices`); ``warn`` gets one line per case that fits no stage."""
    from .nnunet.env import resolve_device
    from .nnunet.predictor import Segmenter
    import numpy as np
    if task_choice not in TASK_CHOICES:
        raise UserInputError(f"--task-choice '{task_choice}' is not a rule; use one of {', '.join(TASK_CHOICES)}.")
    run_dir = Path(run_dir)
    model = select_model(run_dir, task)
    method, full_net, seen, _, djson, exp = _load_run_network(run_dir, model)
    task = None if task is None else _full_task_name(seen, task)
    plans = plans_for_images(run_dir, task, seen)
    net = method.network_for_task(full_net, task)
    cases = find_inputs(input_dir, len(djson["channel_names"]), djson["file_ending"])
    dev = resolve_device(device)

    def make_segmenter(module):
        return Segmenter(module, plans, exp.configuration, djson, dev, mirroring)
    chooser = None if task is not None else task_chooser(RunFolder(run_dir), method, full_net, seen, task_choice,
                                                         make_segmenter)
    seg = make_segmenter(net)
    gate = None
    if chooser is None:
        try:
            gate = part_gate(RunFolder(run_dir), method, net, seen)
        except RunFolderError:
            warn(f"A stage of the run in {run_dir} has no description of its images (it was trained before the "
                 f"merge gate existed), so every decoder takes part in every image's merge.")
    output = PredictionFolder(Path(output_dir))
    output.root.mkdir(parents=True, exist_ok=True)
    written = []
    by_task, choices = {}, []
    for i, (case, files) in enumerate(sorted(cases.items())):
        image, props = seg.read(files)
        if gate is not None:
            record = {"case": case, **gate(seg.preprocess(image, props))}
            choices.append(record)
            if record["ood"]:
                warn(f"Case '{case}' fits no trained task's images (distances beyond every task's threshold), so "
                     f"every decoder takes part in its merge. Check its segmentation before use.")
        if chooser is not None:
            choice = chooser(image, props)
            choices.append(choice.record(case))
            if choice.ood:
                warn(f"Case '{case}' fits no trained task: its distance to the nearest, {choice.task}, is "
                     f"{choice.scores[choice.task]:.1f} (threshold {choice.threshold:.1f}). It looks unlike every "
                     f"site the model was trained on; check its segmentation before use.")
            if choice.task not in by_task:
                by_task[choice.task] = Segmenter(method.network_for_task(full_net, choice.task),
                                                 RunFolder(run_dir).task_plans(choice.task, exp.configuration),
                                                 exp.configuration, djson, dev, mirroring)
            seg = by_task[choice.task]
        out = output.label_map(case, djson["file_ending"])
        if probabilities:
            labels, probs = seg.predict_arrays(image, props, probabilities=True)
            atomic_write(output.probabilities(case),
                         lambda tmp: np.savez_compressed(tmp, probabilities=probs.astype(np.float16),
                                                         labels=np.array(list(djson["labels"]))), suffix=".npz")
        else:
            labels = seg.predict_arrays(image, props)
        atomic_write(out, lambda tmp: seg.write(labels, props, Path(tmp)), suffix=djson["file_ending"])
        written.append(out)
        if progress:
            progress(i + 1, len(cases), case)
    if choices:
        import pandas as pd
        frame = pd.DataFrame(choices)
        atomic_write(output.task_choices, lambda tmp: frame.to_csv(tmp, index=False), suffix=".csv")
    return written


def export_model_folder(run_dir: Path, output: Path, task: str | None = None) -> Path:
    """A stock nnU-Net v2 model folder (trainer ``nnUNetTrainer``) usable by nnUNetv2_predict_from_modelfolder.

    The exported network is the one nnU-Net builds from the plans, so stock nnU-Net can rebuild it: the delivered
    model as it is, or, for a method whose network is not nnU-Net's own (one decoder per task), ``task``'s part
    of it as the method gives it (`Method.stock_network`), with that task's own labels. Every key and shape is
    checked against nnU-Net's network; a model that does not fit is refused, never approximated. Written into a
    temporary sibling and renamed, so a failed export leaves nothing behind."""
    from .nnunet.trainer import build_network
    run, output = RunFolder(Path(run_dir)), Path(output)
    model = select_model(run.root, task)
    if output.exists() and any(output.iterdir()):
        raise UserInputError(f"{output} exists and is not empty. Export into a new folder.")
    method, net, seen, _, djson, exp = _load_run_network(run.root, model)
    full_task = _full_task_name(seen, task)
    stock = method.stock_network(net, full_task)
    # the task's own normalisation (without a task: the one every task shares, or a refusal)
    plans = plans_for_images(run.root, full_task if stock is None else stock.task, seen)
    if stock is None:
        weights = method.network_for_task(net, full_task).state_dict()
    else:
        weights, djson = stock.weights, {**djson, "labels": stock.labels}
        plans = {**plans, "dataset_name": stock.task}
    expected = build_network(plans, exp.configuration, djson).state_dict()
    if set(weights) != set(expected):
        raise UserInputError(f"The model of method '{exp.method}' is not the network nnU-Net builds from the plans "
                             f"(it has parts per task), and a stock nnU-Net model holds exactly that network. Export "
                             f"one task's network with --task (one of {', '.join(run.read_tasks())}).")
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(weights[k].shape)]
    if wrong:
        raise UserInputError(f"The network of method '{exp.method}'{f' for {full_task}' if full_task else ''} does "
                             f"not fit nnU-Net's network for the plans and its {len(djson['labels'])} labels "
                             f"({len(wrong)} weight(s) of another shape, e.g. '{wrong[0]}'), so it cannot be "
                             f"exported as a stock nnU-Net model. Use 'lifelong-nnunet predict' with the run.")
    patch = plans["configurations"][exp.configuration]["patch_size"]
    checkpoint = {
        "network_weights": {k: weights[k] for k in expected},
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": exp.training.epochs,
        "init_args": {"plans": plans, "configuration": exp.configuration, "fold": 0, "dataset_json": djson,
                      "device": "cpu"},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": tuple(range(len(patch))),
    }
    with atomic_directory(output) as tmp:
        folder = NnunetModelFolder(tmp)
        write_json(folder.dataset_json, djson)
        write_json(folder.plans, plans)
        atomic_write(folder.checkpoint(0), lambda path: torch.save(checkpoint, path))
    return output
