"""A model folder written by stock nnU-Net v2 (``nnUNetv2_train``'s output, or our own ``export``), read safely.

Such a folder is ``<Trainer>__<Plans>__<configuration>/`` with ``dataset.json``, ``plans.json`` and
``fold_K/checkpoint_final.pth``. The checkpoint is loaded with ``weights_only=True``: nnU-Net stores numpy scalars
in its ``logging`` and ``_best_ema`` entries, which plain ``weights_only`` refuses, so exactly those numpy types
(the scalar reconstructor and the dtypes) are allowed through ``torch.serialization.safe_globals``. Nothing that
needs code to unpickle is ever loaded. The network must be the architecture nnU-Net builds from the plans, so our
methods can adapt it; a custom trainer's network is refused by name (checked on the weights, not on the trainer's
name: ``nnUNetTrainer_250epochs`` and friends build the same network).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError

CHECKPOINT = "checkpoint_final.pth"

#: The globals a stock nnU-Net checkpoint needs beyond torch's weights-only set: numpy scalars and their dtypes.
NUMPY_SCALAR_GLOBALS = [np._core.multiarray.scalar, np.dtype,
                        *(type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16",
                                                       "int8", "uint8", "bool"))]


@dataclass(frozen=True)
class StockModel:
    """What a stock model folder holds, checked: plans, labels, configuration and the network's weights."""
    folder: Path
    fold: int
    plans: dict
    dataset_json: dict
    configuration: str
    trainer_name: str
    weights: dict[str, torch.Tensor]

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"fold_{self.fold}" / CHECKPOINT

    @property
    def dataset_name(self) -> str:
        """The task the model was trained on (``DatasetXXX_Name``), as nnU-Net recorded it in the plans."""
        return self.plans["dataset_name"]


def load_checkpoint_weights_only(path: Path) -> dict:
    """``torch.load(weights_only=True)`` with numpy scalars allowed; anything else that needs unpickling code is a
    user error (a checkpoint from an unknown source, or one saved with objects nnU-Net does not write)."""
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
        first = str(e).strip().splitlines()[-1 if "Unsupported global" not in str(e) else 0]
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), first)
        raise UserInputError(
            f"{path} does not load as plain weights (torch.load with weights_only=True: {reason[:200]}). "
            f"lifelong-nnunet never unpickles code from a checkpoint. Give a checkpoint written by nnU-Net v2's "
            f"nnUNetTrainer (nnUNetv2_train) or by 'lifelong-nnunet export'.") from None


def read_stock_model(folder: str | Path, fold: int = 0) -> StockModel:
    """Read and check a stock nnU-Net v2 model folder; every gap is a one-paragraph ``UserInputError``."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise UserInputError(f"--start-from {folder} does not exist. Give a stock nnU-Net v2 model folder "
                             f"(nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>) or the output "
                             f"of 'lifelong-nnunet export'.")
    plans, djson = (_read_json(folder / name, folder) for name in ("plans.json", "dataset.json"))
    checkpoint = folder / f"fold_{fold}" / CHECKPOINT
    if not checkpoint.is_file():
        folds = sorted(p.parent.name for p in folder.glob(f"fold_*/{CHECKPOINT}"))
        have = f"it has {', '.join(folds)}; choose one with --fold" if folds else \
            f"it has no fold_K/{CHECKPOINT} at all: finish that nnU-Net training first"
        raise UserInputError(f"{checkpoint} is missing: {folder} holds no final checkpoint for fold {fold} ({have}).")
    ckpt = load_checkpoint_weights_only(checkpoint)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise UserInputError(f"{checkpoint} has no 'network_weights': it is not an nnU-Net v2 checkpoint. Give the "
                             f"checkpoint_final.pth that nnUNetv2_train wrote.")
    configuration = (ckpt.get("init_args") or {}).get("configuration") or _configuration_from_name(folder)
    if configuration not in plans.get("configurations", {}):
        raise UserInputError(f"{folder}: configuration '{configuration}' is not in its plans.json (it has "
                             f"{', '.join(plans.get('configurations', {}))}). The folder's plans and checkpoint do "
                             f"not belong together; copy the folder again from nnUNet_results.")
    if "dataset_name" not in plans:
        raise UserInputError(f"{folder / 'plans.json'} lacks 'dataset_name'. It is not a plans file written by "
                             f"nnU-Net v2's planner; copy the model folder again from nnUNet_results.")
    labels = djson.get("labels", {})
    if not labels or any(not isinstance(v, int) for v in labels.values()):
        raise UserInputError(f"{folder / 'dataset.json'}: the model's 'labels' must be plain integers (region-based "
                             f"models, with lists of labels, cannot be trained further by continual methods).")
    model = StockModel(folder, fold, plans, djson, configuration, str(ckpt.get("trainer_name", "unknown")),
                       ckpt["network_weights"])
    _check_architecture(model)
    return model


def _read_json(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise UserInputError(f"{path} is missing: {folder} is not a complete nnU-Net v2 model folder (it needs "
                             f"plans.json, dataset.json and fold_K/{CHECKPOINT}). Give the folder that "
                             f"nnUNetv2_train wrote under nnUNet_results, or the output of 'lifelong-nnunet export'.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} is not valid JSON ({e}). Copy the model folder again.") from None


def _configuration_from_name(folder: Path) -> str | None:
    parts = folder.name.split("__")
    return parts[2] if len(parts) == 3 else None


def _check_architecture(model: StockModel) -> None:
    """The weights must fit the network nnU-Net builds from the plans: that is the network our methods adapt."""
    from .trainer import build_network
    expected = build_network(model.plans, model.configuration, model.dataset_json, deep_supervision=True).state_dict()
    got = model.weights
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    mismatched = [k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape)]
    if missing or extra or mismatched:
        example = (missing or extra or mismatched)[0]
        raise UserInputError(
            f"{model.checkpoint}: its network (trainer '{model.trainer_name}') is not the architecture nnU-Net builds "
            f"from its plans.json ({len(missing)} weight(s) missing, {len(extra)} unexpected, {len(mismatched)} of "
            f"another shape, e.g. '{example}'). Continual methods can only adapt nnU-Net's own network; a model "
            f"trained with a custom trainer class cannot be continued. Retrain it with nnUNetTrainer.")
