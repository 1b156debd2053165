"""Frozen encoder + one compressed decoder per task, merged by calibrated confidence (class-incremental).

Stage 1 trains a normal nnU-Net on task 1. From stage 2 on the encoder is frozen and a new full-size decoder (built
from the same plans, its body copied from decoder 1, new segmentation layers) learns task k's structures plus
background; then it is distilled into the smallest student decoder within a Dice tolerance (`methods.compression`;
when no student comes that close the full-size decoder is kept, recorded as ``kept_teacher``) and calibrated by
temperature scaling on the task's validation patches. Earlier decoders never change, so nothing learned is forgotten;
predictions of all decoders are merged by `networks.merge`. Each stage also describes its task's images
(`task_inference`), and a decoder whose task's images an image does not resemble takes no part in that image's merge
(`gate_parts`). See docs/methods/frozen_encoder_decoders.md.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import UserInputError
from ..io_utils import write_json
from ..networks.encoder_decoders import (
    CompactDecoder,
    EncoderDecoders,
    TaskDecoder,
    decoder_flops,
    encoder_flops,
    fresh_segmentation_layers,
    parameter_count,
    without_encoder,
)
from ..networks.merge import fit_temperature
from ..networks.multihead import unwrap
from ..networks.output_head import resize_output
from ..seeding import seed_everything
from .base import Method, Stage, StockNetwork
from .compression import StudentSearch, search_student, validation_logits
from .params import Param, flag, integer, number, numbers, one_of


class FrozenEncoderDecoders(Method):
    name = "frozen_encoder_decoders"
    scenarios = ("class",)
    learns_state_from_task_data = True  # each decoder's temperature is fitted on its task's validation patches
    describes_images = True  # the merge gate's per-stage image descriptions
    params: ClassVar[dict[str, Param]] = {
        "compress": flag(True),  # distil each new decoder (stage 2 on) into a smaller student
        # The student recipe's defaults were chosen on the validation patches of task B of synthetic-structures (2d,
        # 4 epochs x 25 iterations per stage; never its test cases): docs/methods/frozen_encoder_decoders.md,
        # "How the student recipe was chosen".
        # candidate student widths, as fractions of the encoder's features per stage
        "widths": numbers([0.25, 0.375, 0.5], min=0, min_open=True),
        # candidate convolutions per decoder stage: nnU-Net's plans' 2, so that a student starts from its teacher
        "convs": numbers([2], min=1, whole=True),
        # a student may have at most this fraction of one nnU-Net's parameters
        "size_budget": number(0.15, min=0, max=1, min_open=True),
        # "teacher": a student of the teacher's depth starts from the teacher's most important channels
        "student_init": one_of("teacher", ("teacher", "scratch")),
        # accept the smallest student within this Dice of its teacher (validation patches)
        "dice_tolerance": number(0.01, min=0),
        # student training iterations, as a fraction of the stage's
        "student_budget": number(0.5, min=0, min_open=True),
        "kd_temperature": number(2.0, min=0, min_open=True),
        "kd_weight": number(1.0, min=0),
        # merge: a decoder claims a voxel only with at least this calibrated probability
        "min_confidence": number(0.5, min=0, max=1),
        "calibrate": flag(True),  # fit a temperature per decoder on its task's validation patches
        "val_batches": integer(10, min=1),  # validation patches (batches) for the student choice and the calibration
        # merge: only the decoders of tasks whose images the image fits (their stages' descriptions) may claim its
        # voxels; measured with and without on synthetic-structures: docs/methods/frozen_encoder_decoders.md
        "gate": flag(True),
    }

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        self.arch: dict[str, dict] = {}  # task -> {"width", "n_conv"} of its compressed decoder
        self.records: dict[str, dict] = {}  # task -> parameters, FLOPs, Dice, temperature of its decoder

    # ---- architecture ---------------------------------------------------------------------------------------
    def _num_local(self, task: str) -> int:
        return len(self.labels.lut(task))

    def adapt_network(self, network: torch.nn.Module, tasks_so_far: list[str]) -> torch.nn.Module:
        """Stage 0: nnU-Net's network sized for task 1. Otherwise an `EncoderDecoders` with one decoder per task:
        task 1's is nnU-Net's own decoder, later ones are full-size (while they train) or the recorded student."""
        tasks = list(dict.fromkeys(tasks_so_far))
        network = unwrap(network)
        n_global = self.labels.num_outputs(tasks)
        if isinstance(network, EncoderDecoders):
            if network.tasks == tasks:
                return network
            if network.tasks != tasks[:len(network.tasks)]:
                raise ValueError(f"decoders {network.tasks} are not a prefix of the tasks {tasks}")
            new = network.extended(n_global)
            for task in tasks[len(network.tasks):]:
                new.add(task, self._new_decoder(new, task))
            return new
        first = self.labels.tasks[0] if not tasks else tasks[0]
        base = resize_output(network, self._num_local(first))
        if not tasks:
            return base
        net = EncoderDecoders(base.encoder, n_global, float(self.config["min_confidence"]))
        net.add(first, TaskDecoder(without_encoder(base.decoder), self.labels.lut(first)))
        for task in tasks[1:]:
            net.add(task, self._new_decoder(net, task))
        return net

    def _new_decoder(self, net: EncoderDecoders, task: str) -> TaskDecoder:
        first = net.decoder(net.tasks[0]).decoder
        deep_supervision = bool(getattr(first, "deep_supervision", False))
        if task in self.arch:
            a = self.arch[task]
            decoder = CompactDecoder(net.encoder, self._num_local(task), a["width"], a["n_conv"], deep_supervision)
        else:  # full size, body copied from decoder 1 (a trained starting point), new segmentation layers
            decoder = fresh_segmentation_layers(first, self._num_local(task))
        return TaskDecoder(decoder.to(next(net.encoder.parameters()).device), self.labels.lut(task))

    def network_for_task(self, network: torch.nn.Module, task: str | None) -> torch.nn.Module:
        """Every task is segmented by the merged model (one model for everything learned)."""
        network = unwrap(network)
        if isinstance(network, EncoderDecoders):
            network.active = None
        return network

    def stock_network(self, network: torch.nn.Module, task: str | None) -> StockNetwork | None:
        """The encoder and ``task``'s decoder as nnU-Net's own U-Net, predicting the task's own label values.

        That is the task's decoder alone: nnU-Net's argmax over (background, the task's structures), without the
        merge (no other decoder competes for a voxel, and no ``min_confidence`` threshold; the calibration
        temperature does not change an argmax). The first task's decoder is nnU-Net's decoder and later full-size
        ones are copies of it, so their weights fit stock nnU-Net's network exactly. A compressed student does not
        (its stages are narrower than the plans' features): refused, since any stock network in its place would be
        another model. No ``task``: None, and `export` refuses the merged model, which no stock network can be."""
        network = unwrap(network)
        if task is None or not isinstance(network, EncoderDecoders):
            return None
        decoder = network.decoder(task).decoder
        if isinstance(decoder, CompactDecoder):
            full = [t for t in network.tasks if not isinstance(network.decoder(t).decoder, CompactDecoder)]
            raise UserInputError(
                f"Task {task}'s decoder was compressed into a student ({decoder.width:g} x the encoder's features, "
                f"{decoder.n_conv} convolution(s) per stage), narrower than the decoder nnU-Net builds from the plans, "
                f"so a stock nnU-Net model cannot hold it, and exporting another network in its place would not be "
                f"this model. Export a task whose decoder is full size ({', '.join(full)}), use 'lifelong-nnunet "
                f"predict' for the merged model, or train with the method parameter compress: false to keep every "
                f"decoder exportable.")
        encoder = network.encoder.state_dict()
        weights = {**{f"encoder.{k}": v for k, v in encoder.items()},
                   **{f"decoder.encoder.{k}": v for k, v in encoder.items()},  # nnU-Net's decoder keeps the encoder
                   **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
        labels = dict(sorted(self.labels.task_labels[task].items(), key=lambda kv: kv[1]))
        return StockNetwork(weights, labels, task)

    def gate_parts(self, network: torch.nn.Module, fits: Mapping[str, bool]) -> list[str] | None:
        """The decoders that may claim this image's voxels: those of the tasks it fits (a task without a
        description is kept). An image that fits no task keeps every decoder (there is no better-founded subset;
        the per-case record flags it as out of distribution); an empty ``fits`` lifts the gate. None for the untrained
        stage-0 network (no decoders) or with ``gate: false``."""
        network = unwrap(network)
        if not isinstance(network, EncoderDecoders) or not self.config["gate"]:
            return None
        kept = [t for t in network.tasks if fits.get(t, True)]
        network.allowed = kept if fits and kept else None
        return network.merged_tasks()

    def training_label_map(self, task: str) -> None:
        return None  # each decoder learns its task's own (local) labels

    # ---- training -------------------------------------------------------------------------------------------
    def before_stage(self, trainer, stage: Stage) -> None:
        net = unwrap(trainer.network)
        if isinstance(net, EncoderDecoders):
            task = stage.train_tasks[0]
            net.active = task
            net.freeze([t for t in net.tasks if t != task], freeze_encoder=len(net.tasks) > 1)

    def after_stage(self, trainer, stage: Stage) -> None:
        net = unwrap(trainer.network)
        if not isinstance(net, EncoderDecoders):
            return
        task, device = stage.train_tasks[0], trainer.device
        val = list(trainer.validation_batches(int(self.config["val_batches"])))
        full = net.decoder(task)
        record: dict[str, Any] = {"teacher_parameters": parameter_count(full.decoder)}
        patch, n_in = trainer.patch_size, trainer.num_input_channels
        record["teacher_flops"] = decoder_flops(net.encoder, full.decoder, patch, n_in)
        if stage.index > 1 and self.config["compress"]:
            base = parameter_count(net.encoder) + parameter_count(net.decoder(net.tasks[0]).decoder)
            train_batches = trainer.training_batches(10**9)
            search = StudentSearch(
                widths=tuple(self.config["widths"]), convs=tuple(self.config["convs"]),
                max_parameters=float(self.config["size_budget"]) * base, tolerance=float(self.config["dice_tolerance"]),
                iterations=max(1, round(float(self.config["student_budget"]) * trainer.num_epochs
                                        * trainer.num_iterations_per_epoch)),
                lr=trainer.initial_lr, temperature=float(self.config["kd_temperature"]),
                kd_weight=float(self.config["kd_weight"]),
                deep_supervision=bool(getattr(full.decoder, "deep_supervision", False)),
                init=self.config["student_init"])
            found = search_student(
                net.encoder, full.decoder, self._num_local(task), search, val, lambda: next(train_batches),
                trainer.loss, device, seed=lambda i: seed_everything(trainer.seed, stage.index, 1000 + i),
                log=lambda s: trainer.print_to_log_file(s), progress=trainer.progress)
            record.update(teacher_dice=found.teacher_dice, candidates=found.tried, base_parameters=base,
                          kept_teacher=found.kept_teacher)
            if found.student is not None:
                self.arch[task] = {"width": found.student.width, "n_conv": found.student.n_conv}
                replacement = TaskDecoder(found.student, full.class_map.tolist()).to(device)
                net.replace(task, replacement)
            else:  # never a decoder worse than its teacher: the full-size one stays, and the record says why
                trainer.print_to_log_file(f"{task}: kept the full-size decoder: {found.kept_teacher}")
        decoder = net.decoder(task)
        record.update(parameters=parameter_count(decoder.decoder),
                      flops=decoder_flops(net.encoder, decoder.decoder, patch, n_in),
                      encoder_parameters=parameter_count(net.encoder),
                      encoder_flops=encoder_flops(net.encoder, patch, n_in), compressed=task in self.arch)
        if self.config["calibrate"]:
            logits, target = validation_logits(net.encoder, decoder.decoder, val, device)
            decoder.temperature.fill_(fit_temperature(logits, target))
        record["temperature"] = float(decoder.temperature)
        decoder.requires_grad_(False)
        net.active = None
        self.records[task] = record
        write_json(Path(trainer.stage_state.stage_dir) / "decoder.json", {task: record})

    def notes(self) -> list[str]:
        return [f"{task}: the full-size decoder was kept, not compressed: {r['kept_teacher']}"
                for task, r in self.records.items() if r.get("kept_teacher")]

    # ---- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"arch": json.loads(json.dumps(self.arch)), "records": json.loads(json.dumps(self.records))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.arch = {k: dict(v) for k, v in state.get("arch", {}).items()}
            self.records = {k: dict(v) for k, v in state.get("records", {}).items()}
