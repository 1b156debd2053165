"""Class-incremental scenario: label space, growing output layer, target mapping, the frozen-encoder/decoders method
(mechanisms and an end-to-end run), and MiB's background initialisation."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from lifelong_nnunet.datasets.synthetic_structures import build_synthetic_structures
from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.experiment import Experiment, Training
from lifelong_nnunet.labels import LabelSpace
from fakes import FakeTrainer
from lifelong_nnunet.methods import Stage, create_method
from lifelong_nnunet.methods.mib import init_new_from_background
from lifelong_nnunet.methods.compression import StudentSearch
from lifelong_nnunet.networks.encoder_decoders import CompactDecoder, EncoderDecoders, parameter_count, without_encoder
from lifelong_nnunet.networks.output_head import num_outputs, resize_output
from lifelong_nnunet.nnunet.trainer import map_targets
from lifelong_nnunet.tasks import Task


def _task(name: str, labels: dict[str, int], dataset_id: int) -> Task:
    djson = {"channel_names": {"0": "MRI"}, "labels": labels, "file_ending": ".nii.gz"}
    return Task(Path(f"/nonexistent/{name}"), djson, {})


@pytest.fixture
def space() -> LabelSpace:
    tasks = [_task("Dataset001_A", {"background": 0, "alpha": 1, "beta": 2}, 1),
             _task("Dataset002_B", {"background": 0, "gamma": 1, "delta": 2}, 2),
             _task("Dataset003_C", {"background": 0, "beta": 1, "epsilon": 2}, 3)]
    return LabelSpace.from_tasks(tasks, "class")


def _unet(num_classes: int = 3, deep_supervision: bool = True) -> PlainConvUNet:
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 1, num_classes, 1, True,
                         torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=deep_supervision)


# ---- label space ----------------------------------------------------------------------------------------------
def test_label_space_maps_reannotated_structures_by_name_and_lists_every_structure(space):
    assert space.dataset_labels() == {"background": 0, "alpha": 1, "beta": 2, "gamma": 3, "delta": 4, "epsilon": 5}
    assert space.lut("Dataset003_C") == [0, 2, 5]  # beta (local 1) is the known beta, global 2
    assert space.introduced_by["beta"] == "Dataset001_A" and space.introduced_by["epsilon"] == "Dataset003_C"
    assert space.num_outputs([]) == 3 and space.num_outputs(["Dataset001_A", "Dataset002_B"]) == 5
    assert space.eval_labels("Dataset003_C") == {"beta": 2, "epsilon": 5}
    assert LabelSpace.from_dict(space.to_dict()) == space


# ---- expanded segmentation head -------------------------------------------------------------------------------
def test_resize_output_keeps_old_channels_bitwise_and_shares_the_rest():
    net = _unet(3)
    grown = resize_output(net, 5)
    assert grown is not net and num_outputs(grown) == 5 and num_outputs(net) == 3
    for old, new in zip(net.decoder.seg_layers, grown.decoder.seg_layers):
        assert torch.equal(new.weight[:3], old.weight) and torch.equal(new.bias[:3], old.bias)
        assert not torch.equal(new.weight[3:], torch.zeros_like(new.weight[3:]))
    assert grown.encoder is net.encoder and grown.decoder.stages is net.decoder.stages
    assert resize_output(grown, 5) is grown
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        old, kept = net(x)[0], grown(x)[0][:, :3]
    # Not bitwise: the shared body gives both heads the same features, but a 1x1x1 convolution with 5 output
    # channels and one with 3 may take different CPU kernels (blocking, vector width, FMA), which add the 4 products
    # and the bias in another order. Two float32 orderings of a 5-term sum differ by at most 2 * 5 * 2^-24 * sum|w x|;
    # here sum|w x| + |b| <= 2.9, so <= 2e-6. atol 1e-5 (rtol 0: logits near 0 come from cancellation, so a relative
    # tolerance means nothing there) is far below the gap between two channels (up to 1.5), so a lost, shuffled or
    # re-initialised old channel still fails.
    torch.testing.assert_close(kept, old, rtol=0, atol=1e-5)
    assert (old[:, 0] - old[:, 1]).abs().max() > 1e3 * 1e-5


def test_mib_background_init_keeps_the_old_models_predictions():
    """With w_new = w_bg and b shifted by log(N+1), p_old(bg) = p(bg) + sum p(new): old predictions unchanged."""
    net = _unet(3, deep_supervision=False)
    grown = resize_output(net, 5)
    init_new_from_background(grown, n_old=3)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        p_old, p_new = net(x).softmax(1), grown(x).softmax(1)
    # Equal in exact arithmetic only: two softmaxes over 3 and 5 channels of differently shaped convolutions, and the
    # log(N+1) shift, each round in float32 (probabilities <= 1, a few ulps = 1e-7 each); 1e-5 keeps a wide margin
    # while a wrong shift (log 2 instead of log 3 here) moves them by up to 0.1.
    torch.testing.assert_close(p_new[:, 0] + p_new[:, 3:].sum(1), p_old[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(p_new[:, 1:3], p_old[:, 1:3], rtol=0, atol=1e-5)


def test_distillation_teacher_keeps_only_the_previous_models_channels(space):
    method = create_method("mib", {}, labels=space)
    grown = resize_output(_unet(3), 5)
    trainer = FakeTrainer(grown, stage=Stage(2, ("Dataset002_B",), "previous"), tasks_before=["Dataset001_A"])
    method.before_stage(trainer, trainer.stage_state.stage)
    assert num_outputs(method.teacher) == 3
    teacher_seg, student_seg = method.teacher.decoder.seg_layers[0], grown.decoder.seg_layers[0]
    assert torch.equal(teacher_seg.weight, student_seg.weight[:3])  # the previous model's channels, bitwise
    assert not any(p.requires_grad for p in method.teacher.parameters())
    # the student's new channels start from the background channel (MiB's initialisation)
    assert torch.equal(grown.decoder.seg_layers[0].weight[3], grown.decoder.seg_layers[0].weight[0])


def test_targets_are_mapped_per_sample_through_their_tasks_table():
    luts = {"A": torch.tensor([0, 1, 2]), "C": torch.tensor([0, 2, 5])}
    target = torch.tensor([[[[0, 1, 2, -1]]], [[[0, 1, 2, -1]]]], dtype=torch.float32)  # [B=2, 1, 1, 4]
    batch = {"keys": ["A/case1", "C/case7"], "target": [target, target[..., :2]], "data": None}
    out = map_targets(batch, luts)
    assert out["target"][0][0].flatten().tolist() == [0, 1, 2, -1]
    assert out["target"][0][1].flatten().tolist() == [0, 2, 5, -1]  # padding (-1) stays
    assert out["target"][1][1].flatten().tolist() == [0, 2]
    assert out["target"][0].dtype == torch.float32


def test_importance_batches_are_mapped_like_training_batches():
    """EWC's Fisher and MAS's importance draw `training_batches`: in the class scenario their targets must be the
    global IDs the loss compares the grown head with, as in `train_step` (task 2's local 1 is global 3)."""
    from types import SimpleNamespace

    from lifelong_nnunet.nnunet.trainer import ContinualTrainer

    class Loader:
        data_loader = None

        def __next__(self):
            return {"keys": ["B/case1"], "data": None, "target": [torch.tensor([[[[0.0, 1.0, 2.0]]]])]}

    trainer = SimpleNamespace(dataloader_train=Loader(), target_luts={"B": torch.tensor([0, 3, 4])})
    trainer.map_targets = lambda batch: ContinualTrainer.map_targets(trainer, batch)
    trainer._ensure_loaders = lambda: ContinualTrainer._ensure_loaders(trainer)  # keeps the stage's own loader
    batches = list(ContinualTrainer.training_batches(trainer, 2))
    assert len(batches) == 2 and all(b["target"][0].flatten().tolist() == [0, 3, 4] for b in batches)


# ---- the frozen-encoder / decoders network --------------------------------------------------------------------
def test_compact_decoder_matches_nnunets_decoder_interface_and_is_smaller():
    net = _unet(3)
    skips = net.encoder(torch.randn(2, 1, 16, 16, 16))
    full = UNetDecoder(net.encoder, 3, 1, deep_supervision=True)
    small = CompactDecoder(net.encoder, 3, width=0.5, n_conv=1, deep_supervision=True)
    assert [o.shape for o in small(skips)] == [o.shape for o in full(skips)]
    small.deep_supervision = False
    assert small(skips).shape == full(skips)[0].shape
    assert parameter_count(small) < parameter_count(full)


def test_encoder_runs_once_per_patch_and_every_decoder_contributes(space):
    method = create_method("frozen_encoder_decoders", {}, labels=space)
    net = method.adapt_network(_unet(3, deep_supervision=False), ["Dataset001_A", "Dataset002_B", "Dataset003_C"])
    assert isinstance(net, EncoderDecoders) and net.num_classes == 6
    calls = []
    net.encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))
    assert len(calls) == 1 and out.shape == (1, 6, 16, 16, 16)
    net.active = "Dataset002_B"
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)  # the task's own classes


def test_a_new_decoder_has_its_own_parameters_and_the_method_rejects_the_domain_scenario(space):
    method = create_method("frozen_encoder_decoders", {}, labels=space)
    net = method.adapt_network(_unet(3), ["Dataset001_A"])
    bigger = method.adapt_network(net, ["Dataset001_A", "Dataset002_B"])
    assert bigger is not net and bigger.encoder is net.encoder
    assert bigger.decoder("Dataset001_A") is net.decoder("Dataset001_A")
    first = {id(p) for p in bigger.decoder("Dataset001_A").parameters()}
    assert not first & {id(p) for p in bigger.decoder("Dataset002_B").parameters()}
    assert "encoder" not in dict(bigger.decoder("Dataset001_A").decoder.named_children())
    assert method.scenarios == ("class",)


def test_a_full_size_decoder_exports_as_nnunets_own_network_with_its_tasks_own_labels(space):
    """Task C's decoder (full size, a copy of nnU-Net's) with the encoder loads strictly into nnU-Net's own U-Net and
    computes exactly what the decoder computes in the run's network; the labels are C's own values (beta 1,
    epsilon 2), not the global IDs 2 and 5 of the merged model. Every weight is perturbed first, so an encoder or a
    decoder body left at its initial values, or another task's decoder, gives other outputs."""
    tasks = ["Dataset001_A", "Dataset002_B", "Dataset003_C"]
    method = create_method("frozen_encoder_decoders", {}, labels=space)
    net = method.adapt_network(_unet(3, deep_supervision=False), tasks)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert method.stock_network(net, None) is None  # the merged model: export refuses it
    stock = method.stock_network(net, "Dataset003_C")
    assert stock.task == "Dataset003_C" and stock.labels == {"background": 0, "beta": 1, "epsilon": 2}
    plain = _unet(3, deep_supervision=False)
    plain.load_state_dict(stock.weights)  # strict: exactly nnU-Net's keys and shapes
    x = torch.randn(1, 1, 16, 16, 16)
    net.active = "Dataset003_C"
    with torch.no_grad():
        # bitwise: the same modules' weights run through the same operations in the same order
        assert torch.equal(plain(x), net(x))
        net.active = "Dataset002_B"
        assert not torch.equal(plain(x), net(x))


def test_a_compressed_decoder_is_refused_for_export(space):
    from lifelong_nnunet.networks.encoder_decoders import TaskDecoder
    method = create_method("frozen_encoder_decoders", {}, labels=space)
    net = method.adapt_network(_unet(3, deep_supervision=False), ["Dataset001_A", "Dataset002_B"])
    student = CompactDecoder(net.encoder, 3, width=0.5, n_conv=1, deep_supervision=False)
    net.replace("Dataset002_B", TaskDecoder(student, space.lut("Dataset002_B")))
    with pytest.raises(UserInputError, match=r"compressed into a student \(0.5 x .*Export a task whose decoder is "
                                             r"full size \(Dataset001_A\)"):
        method.stock_network(net, "Dataset002_B")


def _deep_supervision_batches(net, n: int = 2, seed: int = 0) -> list[dict]:
    """Fixed patches with nnU-Net's deep-supervision targets (one per resolution), labelled 0..2 at random."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g).float()
        out.append({"data": torch.randn(2, 1, 16, 16, 16, generator=g) + t,
                    "target": [t, t[..., ::2, ::2, ::2], t[..., ::4, ::4, ::4]]})
    return out


def test_stage_two_trains_only_its_new_decoder_then_fits_its_temperature(space, tmp_path):
    """The mechanism without a training run: in stage 2 the encoder and decoder 1 are frozen (an optimiser step
    leaves them bitwise unchanged) while the new decoder learns; after the stage its temperature is the one fitted
    on the validation patches (an overconfident decoder gets T > 1), not the initial 1."""
    from lifelong_nnunet.methods.compression import validation_logits
    from lifelong_nnunet.networks.merge import fit_temperature
    method = create_method("frozen_encoder_decoders", {"compress": False, "val_batches": 2}, labels=space)
    net = method.adapt_network(_unet(3), ["Dataset001_A", "Dataset002_B"])
    batches = _deep_supervision_batches(net)
    stage = Stage(2, ("Dataset002_B",), "previous")
    trainer = FakeTrainer(net, stage=stage, tasks_before=["Dataset001_A"], stage_dir=tmp_path, batches=batches,
                          patch_size=(16, 16, 16))
    method.before_stage(trainer, stage)
    frozen = [*net.encoder.parameters(), *net.decoder("Dataset001_A").parameters()]
    new = list(net.decoder("Dataset002_B").parameters())
    assert not any(p.requires_grad for p in frozen) and all(p.requires_grad for p in new)
    before = [p.clone() for p in frozen]
    new_before = [p.clone() for p in new]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for b in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(b["data"])[0], b["target"][0][:, 0].long()).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(frozen, before))
    assert any(not torch.equal(p, q) for p, q in zip(new, new_before))

    with torch.no_grad():  # make the new decoder overconfident: its logits x 20
        for conv in net.decoder("Dataset002_B").decoder.seg_layers:
            conv.weight.mul_(20)
            conv.bias.mul_(20)
    decoder = net.decoder("Dataset002_B")
    expected = fit_temperature(*validation_logits(net.encoder, decoder.decoder, batches, torch.device("cpu")))
    method.after_stage(trainer, stage)
    assert expected > 1.5 and float(decoder.temperature) == pytest.approx(expected, rel=1e-6)
    assert method.records["Dataset002_B"]["temperature"] == pytest.approx(expected, rel=1e-6)
    assert not any(p.requires_grad for p in decoder.parameters())  # a finished decoder is frozen too


# ---- decoder compression --------------------------------------------------------------------------------------
def _teacher_and_batches(n: int = 4, seed: int = 0):
    """A tiny nnU-Net's encoder and decoder (the teacher) and fixed patches labelled with the teacher's own argmax,
    so the teacher's validation Dice is 1 and a student is judged only by how well it copies the teacher."""
    net = _unet(3, deep_supervision=False)
    g = torch.Generator().manual_seed(seed)
    batches = []
    with torch.no_grad():
        for _ in range(n):
            data = torch.randn(2, 1, 16, 16, 16, generator=g)
            batches.append({"data": data, "target": net(data).argmax(1, keepdim=True).float()})
    return net.encoder, without_encoder(net.decoder), batches


def _search(tolerance: float, iterations: int = 1, kd_weight: float = 0.0, init: str = "scratch") -> StudentSearch:
    return StudentSearch(widths=(0.25, 0.5), convs=(1,), max_parameters=1e9, tolerance=tolerance,
                         iterations=iterations, lr=1e-2, temperature=2.0, kd_weight=kd_weight, deep_supervision=False,
                         init=init)


def _no_task_loss(output, target):
    return 0.0 * output.sum()


def test_a_student_learns_its_teachers_predictions_by_distillation_alone():
    """No task loss: whatever the student learns comes through the KD term (a detached student learns nothing)."""
    from lifelong_nnunet.methods.compression import distil_decoder
    from lifelong_nnunet.methods.distillation import softened_kl
    encoder, teacher, batches = _teacher_and_batches()
    before_enc = {k: v.clone() for k, v in encoder.state_dict().items()}
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = CompactDecoder(encoder, 3, width=0.5, n_conv=1, deep_supervision=False)

    def gap() -> float:
        with torch.no_grad():
            return sum(float(softened_kl(student(encoder(b["data"])), teacher(encoder(b["data"])), 1.0))
                       for b in batches)

    start, turn = gap(), iter(range(10**6))
    distil_decoder(encoder, teacher, student, lambda: batches[next(turn) % len(batches)], _no_task_loss,
                   iterations=60, lr=1e-2, temperature=2.0, kd_weight=1.0, device=torch.device("cpu"))
    assert gap() < 0.3 * start
    assert all(torch.equal(v, before_enc[k]) for k, v in encoder.state_dict().items())  # both stay frozen
    assert all(torch.equal(v, before_teacher[k]) for k, v in teacher.state_dict().items())


def test_a_student_cut_from_its_teacher_computes_the_teacher_without_its_weakest_channels():
    """Where the teacher's dropped channels contribute nothing (zero norm scale and shift: the block outputs 0;
    zero weights where the first conv reads an upsampled channel), the pruned student computes exactly the teacher's
    function: every kept index (outputs, inputs, skips, segmentation layers, the next stage) lines up, and the
    kept channels are the strongest ones. A student as wide as the teacher is the teacher, bitwise (same weights,
    same operations)."""
    from lifelong_nnunet.methods.compression import inherits_teacher, init_from_teacher
    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, [8, 16, 32], torch.nn.Conv3d, 3, [1, 2, 2], 1, 3, 2, True, torch.nn.InstanceNorm3d,
                        {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                        deep_supervision=True)
    encoder, teacher = net.encoder.eval(), without_encoder(net.decoder).eval()
    data = torch.randn(2, 1, 16, 16, 16)
    skips = encoder(data)
    whole = CompactDecoder(encoder, 3, width=1.0, n_conv=2, deep_supervision=True).eval()
    init_from_teacher(whole, teacher)
    assert all(torch.equal(a, b) for a, b in zip(whole(skips), teacher(skips)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for s, stage in enumerate(teacher.stages):  # stage 0: 16 -> 8 channels, stage 1: 8 -> 4
            half = stage.convs[0].conv.out_channels // 2
            up_dropped = torch.randperm(teacher.transpconvs[s].out_channels, generator=g)[:half]
            stage.convs[0].conv.weight[:, up_dropped] = 0
            for block in stage.convs:
                dropped = torch.randperm(block.conv.out_channels, generator=g)[:half]
                block.norm.weight[dropped] = 0
                block.norm.bias[dropped] = 0
                block.norm.weight.add_(torch.rand(block.norm.weight.shape, generator=g) * (block.norm.weight != 0))
    student = CompactDecoder(encoder, 3, width=0.5, n_conv=2, deep_supervision=True).eval()
    assert inherits_teacher(student, teacher)
    init_from_teacher(student, teacher)
    assert parameter_count(student) < 0.4 * parameter_count(teacher)
    with torch.no_grad():
        for out, ref in zip(student(skips), teacher(skips)):
            # float32 sums over fewer (zero) terms: equal up to rounding, far below the outputs' scale (~1)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # a student of another depth has no teacher layer for each of its own: it is not cut from the teacher
    assert not inherits_teacher(CompactDecoder(encoder, 3, width=0.5, n_conv=1, deep_supervision=True), teacher)


def test_a_student_cut_from_its_teacher_reaches_the_teachers_dice_where_one_from_scratch_does_not():
    """The same search, budget and seeds on the constructed case (teacher Dice 1, KD only), with a teacher whose
    channels matter unequally, as a trained decoder's do (half of each block's norm scales and shifts x0.8): the
    student started from the teacher's strongest channels comes within the tolerance (Dice 0.960; one cut from its
    weakest channels: 0.926); the freshly initialised one stays far below, the failure the benchmark showed."""
    from lifelong_nnunet.methods.compression import search_student
    encoder, teacher, batches = _teacher_and_batches()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in teacher.stages:
            for block in stage.convs:
                weak = torch.randperm(block.norm.weight.numel(), generator=g)[:block.norm.weight.numel() // 2]
                block.norm.weight[weak] *= 0.8
                block.norm.bias[weak] *= 0.8
        for b in batches:  # labels: the changed teacher's own argmax again (its Dice stays 1)
            b["target"] = teacher(encoder(b["data"])).argmax(1, keepdim=True).float()
    found = {}
    for init in ("teacher", "scratch"):
        turn = iter(range(10**6))
        search = dataclasses.replace(_search(0.05, iterations=5, kd_weight=1.0, init=init), widths=(0.5,))
        found[init] = search_student(encoder, teacher, 3, search, batches, lambda: batches[next(turn) % len(batches)],
                                     _no_task_loss, torch.device("cpu"), seed=torch.manual_seed)
    cut, fresh = found["teacher"], found["scratch"]
    assert cut.teacher_dice == 1.0 and cut.student is not None and cut.kept_teacher is None
    assert cut.tried[-1]["init"] == "teacher" and cut.tried[-1]["dice"] >= 0.95
    assert fresh.student is None and all(c["init"] == "scratch" and c["dice"] < 0.95 for c in fresh.tried)


def test_the_search_keeps_the_teacher_when_no_student_comes_within_tolerance():
    """An untrained student is far below a teacher of validation Dice 1: no decoder is replaced by a worse one."""
    from lifelong_nnunet.methods.compression import search_student
    encoder, teacher, batches = _teacher_and_batches()
    args = (encoder, teacher, 3)
    kept = search_student(*args, _search(0.01), batches, lambda: batches[0], _no_task_loss, torch.device("cpu"),
                          seed=torch.manual_seed)
    assert kept.teacher_dice == 1.0 and kept.student is None
    assert len(kept.tried) == 2 and all(c["dice"] < 0.99 and not c["accepted"] for c in kept.tried)
    assert "no student came within 0.01 Dice" in kept.kept_teacher
    # the same students pass a tolerance they meet: the smallest one is taken
    bars: dict[str, list[int]] = {}

    def progress(description: str, total: int):
        bars[description] = [0, total]
        return lambda: bars[description].__setitem__(0, bars[description][0] + 1)

    taken = search_student(*args, _search(1.0, iterations=3), batches, lambda: batches[0], _no_task_loss,
                           torch.device("cpu"), seed=torch.manual_seed, progress=progress)
    assert taken.student is not None and taken.student.width == 0.25 and taken.kept_teacher is None
    # the distillation of the one candidate tried showed its progress, one step per iteration
    assert bars == {"student 1/2 (width 0.25 x1 conv) distillation": [3, 3]}
    # patches without any structure cannot judge a student: none is trained, the teacher stays
    for b in batches:
        b["target"] = torch.zeros_like(b["target"])
    with torch.no_grad():
        teacher.seg_layers[-1].bias[0] = 1e4  # the teacher predicts background everywhere
    blind = search_student(*args, _search(1.0), batches, lambda: batches[0], _no_task_loss, torch.device("cpu"),
                           seed=torch.manual_seed)
    assert blind.student is None and not blind.tried and "none of the task's structures" in blind.kept_teacher


def test_a_kept_teacher_is_a_note_for_the_record_and_the_report(space):
    method = create_method("frozen_encoder_decoders", {}, labels=space)
    assert method.notes() == []
    method.records = {"Dataset001_A": {"kept_teacher": None},
                      "Dataset002_B": {"kept_teacher": "no student came within 0.01 Dice of the teacher's 0.940"}}
    assert method.notes() == ["Dataset002_B: the full-size decoder was kept, not compressed: no student came within "
                              "0.01 Dice of the teacher's 0.940"]


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def structure_tasks(tmp_path_factory) -> list[Path]:
    return build_synthetic_structures(tmp_path_factory.mktemp("structures"), subjects=3, variants=2,
                                      shape=(24, 24, 24))


@pytest.fixture(scope="module")
def class_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("class_cache")


def _class_run(tasks, method, params, out, cache):
    from lifelong_nnunet.runner import run_experiment
    exp = Experiment(tasks=[str(t) for t in tasks], method=method, method_params=params, scenario="class",
                     training=Training(epochs=1, iterations_per_epoch=3, val_iterations=1, batch_size=2),
                     device="cpu", cache_dir=str(cache))
    return run_experiment(exp, out, quiet=True)


@pytest.fixture(scope="module")
def fed_run(structure_tasks, class_cache, tmp_path_factory) -> Path:
    """A three-task frozen_encoder_decoders run whose later decoders were compressed (shared by the tests below)."""
    run = tmp_path_factory.mktemp("fed") / "run"
    _class_run(structure_tasks, "frozen_encoder_decoders",
               {"widths": [0.25, 0.5], "convs": [2], "size_budget": 0.25, "val_batches": 2, "student_budget": 1.0,
                "dice_tolerance": 1.0},  # a tiny budget: accept a student, whose mechanics are checked here
               run, class_cache)
    return run


@pytest.mark.slow
def test_frozen_encoder_decoders_end_to_end(fed_run, structure_tasks, tmp_path):
    run = fed_run
    models = [torch.load(run / "stages" / f"stage_{i}" / "model.pt", weights_only=True) for i in (1, 2, 3)]
    w = [m["network_weights"] for m in models]
    # the encoder is bitwise unchanged after stage 1, and every decoder is unchanged by later stages
    enc = [k for k in w[0] if k.startswith("encoder.")]
    assert enc and all(torch.equal(w[0][k], w[i][k]) for i in (1, 2) for k in enc)
    names = [p.name for p in structure_tasks]
    for i, task in enumerate(names[:2]):
        keys = [k for k in w[i] if k.startswith(f"decoders.{task}.")]
        assert keys and all(torch.equal(w[i][k], w[2][k]) for k in keys)
    # each added decoder was distilled into a smaller student within the size budget, with its records
    for stage, task in ((2, names[1]), (3, names[2])):
        rec = models[stage - 1]["method_state"]["records"][task]
        assert rec["compressed"] and rec["parameters"] < rec["teacher_parameters"]
        assert [c["init"] for c in rec["candidates"]] == ["teacher"]  # the plans' depth: cut from the teacher
        assert models[stage - 1]["info"]["notes"] == []  # compressed: nothing the method could not do
        assert rec["parameters"] <= 0.25 * rec["base_parameters"] and rec["flops"] < rec["teacher_flops"]
        assert rec["temperature"] > 0
    # one model: the union label map, and predict writes every structure's ID with the input's geometry
    import json
    labels = json.loads((run / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "alpha": 1, "beta": 2, "gamma": 3, "delta": 4, "epsilon": 5}
    from lifelong_nnunet.deploy import predict
    case = sorted((structure_tasks[0] / "imagesTr").iterdir())[0]
    out = predict(run, case.parent, tmp_path / "pred")
    assert len(out) == len(list(case.parent.iterdir()))
    pred, img = nib.load(out[0]), nib.load(case)
    assert pred.shape == img.shape and np.allclose(pred.affine, img.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= set(labels.values())
    results = (run / "results.csv").read_text()
    assert "epsilon" in results and "alpha" in results
    # the merge gate: every stage described its task's images, evaluation gated each test case, predict records it
    assert all((run / "stages" / f"stage_{i}" / "task_description.json").is_file() for i in (1, 2, 3))
    assert "Stage 3 merge gate: " in (run / "run.log").read_text()
    import pandas as pd
    gates = pd.read_csv(tmp_path / "pred" / "task_choices.csv")
    assert len(gates) == len(out) and set(gates.rule) == {"description-gate"}
    assert all(set(str(k).split(";")) <= set(names) for k in gates.kept)


@pytest.mark.slow
def test_one_task_of_the_class_model_exports_to_stock_nnunet(fed_run, structure_tasks, tmp_path):
    """`export --task` of the first task: stock nnU-Net's own loading (trainer class by name, network from the plans,
    torch.load of the checkpoint) and predictor give exactly the label map and probabilities of that task's decoder
    in our run's network. The merged model and a compressed decoder are refused, with nothing written."""
    import json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from lifelong_nnunet.deploy import _load_run_network, export_model_folder, select_model
    from lifelong_nnunet.nnunet.predictor import Segmenter
    first, second = structure_tasks[0].name, structure_tasks[1].name
    with pytest.raises(UserInputError, match="--task"):
        export_model_folder(fed_run, tmp_path / "merged")
    with pytest.raises(UserInputError, match="compressed"):
        export_model_folder(fed_run, tmp_path / "student", task=second)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "student").exists()

    folder = export_model_folder(fed_run, tmp_path / "model", task=first)
    own = json.loads((structure_tasks[0] / "dataset.json").read_text())["labels"]
    assert json.loads((folder / "dataset.json").read_text())["labels"] == own
    case = sorted((structure_tasks[0] / "imagesTr").iterdir())[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nnU-Net predicts with min(threads, nnUNet_def_n_proc): the same split of work in both
    try:
        stock = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        stock.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
        method, net, seen, plans, djson, exp = _load_run_network(fed_run, select_model(fed_run))
        net.active = first  # the task's decoder alone, as our run's network computes it
        ours = Segmenter(net, plans, exp.configuration, {**djson, "labels": own}, torch.device("cpu"))
        image, props = ours.read([case])
        stock_seg, stock_prob = stock.predict_single_npy_array(image, props, None, None, True)
        our_seg, our_prob = ours.predict_arrays(image, props, probabilities=True)
    finally:
        torch.set_num_threads(threads)
    # bitwise: the same weights through the same predictor and operations, on one thread
    assert np.array_equal(stock_seg, our_seg) and np.array_equal(stock_prob, our_prob)
    assert set(np.unique(stock_seg)) <= set(own.values())


@pytest.mark.slow
def test_sequential_with_expanded_head_in_the_class_scenario(structure_tasks, class_cache, tmp_path):
    """All three tasks, as `fed_run`: the same tasks share its planning (a planning costs more than a stage here)."""
    run = tmp_path / "seq"
    summary = _class_run(structure_tasks, "sequential", {}, run, class_cache)
    seg = "decoder.seg_layers.0.weight"
    channels = [torch.load(run / "stages" / f"stage_{i}" / "model.pt", weights_only=True)["network_weights"][seg]
                .shape[0] for i in (1, 2, 3)]
    # the head grew by task B's two structures, then by C's epsilon alone (its beta is A's, already segmented)
    assert channels == [3, 5, 6]
    assert summary["scenario"] == "class" and len(summary["R"]) == 4  # stage 0 + three stages


def test_domain_only_methods_are_refused_in_the_class_scenario(structure_tasks, tmp_path):
    from lifelong_nnunet.runner import run_experiment
    exp = Experiment(tasks=[str(t) for t in structure_tasks[:2]], method="joint", scenario="class",
                     device="cpu", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserInputError, match="class scenario"):
        run_experiment(exp, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_stored_parameter_count_counts_nnunets_doubly_registered_convolutions_once(tmp_path):
    from lifelong_nnunet.run_folder import load_model, save_model, stored_parameter_count
    net = _unet(3)
    assert len(net.state_dict()) > len(dict(net.named_parameters()))  # conv weights appear under two keys
    save_model(tmp_path / "m.pt", net.state_dict(), {})
    assert stored_parameter_count(load_model(tmp_path / "m.pt")["network_weights"]) == parameter_count(net)
