"""Mechanism tests of the distillation methods (lwf, mib, plop) on a tiny real PlainConvUNet.

Each test targets one way a distillation term can be silently wrong, in particular the nnU-Net v1 framework's
mistake of terms that carry no gradient (student outputs detached / computed under no_grad).
"""
from __future__ import annotations

import io
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from fakes import FakeTrainer
from lifelong_nnunet.labels import LabelSpace
from lifelong_nnunet.methods import available_methods, create_method
from lifelong_nnunet.methods.base import Stage
from lifelong_nnunet.methods.distillation import FeatureCapture, snapshot_teacher, softened_kl
from lifelong_nnunet.methods.lwf import lwf_loss
from lifelong_nnunet.methods.mib import unbiased_cross_entropy, unbiased_kd
from lifelong_nnunet.methods.distillation import DistillationMethod
from lifelong_nnunet.methods.plop import (
    adaptive_factor,
    local_pod_embedding,
    local_pod_loss,
    logits_in_teacher_classes,
    median_entropy_thresholds,
    normalized_entropy,
    pod_schedule,
    pseudo_labels,
)
from lifelong_nnunet.networks.output_head import resize_output
from lifelong_nnunet.nnunet.loss import loss_with_ignore_label
from lifelong_nnunet.nnunet.network import deep_supervision_weights

METHODS = ["lwf", "mib", "plop"]
STAGE2 = Stage(2, ("B",), "previous")


def tiny_unet() -> PlainConvUNet:
    return PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 8], conv_op=torch.nn.Conv3d,
                         kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1, num_classes=3,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=True)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = tiny_unet()
    trainer = FakeTrainer(net)
    data = torch.randn(1, 1, 16, 16, 16)
    target = [torch.randint(0, 3, (1, 1, 16, 16, 16)).float(), torch.randint(0, 3, (1, 1, 8, 8, 8)).float()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared 2-core machine
    yield trainer, data, target
    torch.set_num_threads(threads)


def perturb(net: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def step_terms(method, trainer, data, target):
    output = trainer.network(data)  # the trainer's forward: live output, hooks fire here
    return method.loss_terms(trainer, data, target, output)


def test_methods_are_discovered():
    assert set(METHODS) <= set(available_methods())


@pytest.mark.parametrize("name", METHODS)
def test_term_has_student_gradient_and_teacher_stays_frozen(name, setup):
    trainer, data, target = setup
    method = create_method(name)
    method.before_stage(trainer, STAGE2)
    teacher = method.teacher
    assert teacher is not None and teacher is not trainer.network
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    perturb(trainer.network)
    terms = step_terms(method, trainer, data, target)
    assert set(terms) == {"lwf": {"lwf"}, "mib": {"mib_kd"}, "plop": {"plop_pod"}}[name]
    loss = sum(terms.values())
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    grads = {n: p.grad for n, p in trainer.network.named_parameters()}
    nonzero = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    encoder = {n for n in grads if n.startswith("encoder.")}
    assert encoder <= nonzero, sorted(encoder - nonzero)  # every encoder parameter (POD acts on encoder stages)
    if name != "plop":  # logit terms reach every parameter except the weight-0 lowest-resolution head
        assert nonzero == set(grads) - {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}, \
            sorted(set(grads) - nonzero)
    for p in teacher.parameters():
        assert not p.requires_grad and p.grad is None
    torch.optim.SGD(trainer.network.parameters(), lr=0.1).step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not teacher.training


@pytest.mark.parametrize("name", METHODS)
def test_term_is_zero_when_student_equals_teacher(name, setup):
    trainer, data, target = setup
    method = create_method(name)
    method.before_stage(trainer, STAGE2)
    terms = step_terms(method, trainer, data, target)
    for value in terms.values():
        assert abs(value.item()) < 1e-6
    sum(terms.values()).backward()  # no NaN gradient at the minimum (POD's norm at 0)
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", METHODS)
def test_no_teacher_means_no_terms(name, setup):
    trainer, data, target = setup
    method = create_method(name)
    method.before_stage(trainer, Stage(1, ("A",), "previous"))
    assert method.teacher is None and step_terms(method, trainer, data, target) == {}
    method.before_stage(trainer, Stage(2, ("B",), "initial"))  # starts from theta_0: nothing to distil from
    assert step_terms(method, trainer, data, target) == {}


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_loads_with_weights_only(name, setup):
    trainer = setup[0]
    method = create_method(name)
    method.before_stage(trainer, STAGE2)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    method.load_state_dict(state)
    assert state["config"] == method.config


def test_teacher_rebuilt_identically_on_resume(setup):
    trainer = setup[0]
    first, second = create_method("lwf"), create_method("lwf")
    first.before_stage(trainer, STAGE2)
    second.before_stage(trainer, STAGE2)  # a resumed stage: same previous weights loaded before before_stage
    for (k, a), (_, b) in zip(first.teacher.state_dict().items(), second.teacher.state_dict().items()):
        assert torch.equal(a, b), k


# ---- LwF ------------------------------------------------------------------------------------------------------------
def test_softened_kl_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0]]).view(1, 3, 1)
    t = torch.tensor([[0.0, 2.0, 0.5]]).view(1, 3, 1)
    for temp in (1.0, 2.0, 4.0):
        ps = [math.exp(v / temp) for v in (1.0, 0.0, -1.0)]
        pt = [math.exp(v / temp) for v in (0.0, 2.0, 0.5)]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        hand = sum(b * math.log(b / a) for a, b in zip(ps, pt))
        assert softened_kl(s, t, temp).item() == pytest.approx(hand, rel=1e-5)
        # the LwF term carries lambda * T^2 on one output
        assert lwf_loss([s], [t], temp, 0.5).item() == pytest.approx(0.5 * temp ** 2 * hand, rel=1e-5)


def test_lwf_uses_nnunet_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    torch.manual_seed(1)
    s = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2), torch.randn(1, 3, 1, 1)]
    t = [torch.randn_like(x) for x in s]
    expected = 4 * (2 / 3 * softened_kl(s[0], t[0], 2) + 1 / 3 * softened_kl(s[1], t[1], 2))
    assert lwf_loss(s, t, 2.0, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_lwf_temperature_and_lambda_enter_the_term(setup):
    trainer, data, target = setup
    values = {}
    for temp, lam in ((1.0, 1.0), (3.0, 1.0), (3.0, 2.0)):
        torch.manual_seed(0)
        trainer.network = tiny_unet()
        method = create_method("lwf", {"temperature": temp, "lambda": lam})
        method.before_stage(trainer, STAGE2)
        torch.manual_seed(5)
        perturb(trainer.network)
        out = trainer.network(data)
        values[(temp, lam)] = method.loss_terms(trainer, data, target, out)["lwf"].item()
        with torch.no_grad():
            t_out = method.teacher(data)
        w = deep_supervision_weights(len(out))
        hand = sum(wk * softened_kl(o.detach(), to, temp) for wk, o, to in zip(w, out, t_out)) * lam * temp ** 2
        assert values[(temp, lam)] == pytest.approx(hand.item(), rel=1e-5)
    assert values[(3.0, 2.0)] == pytest.approx(2 * values[(3.0, 1.0)], rel=1e-6)
    assert values[(1.0, 1.0)] != pytest.approx(values[(3.0, 1.0)], rel=1e-2)


# ---- MiB ------------------------------------------------------------------------------------------------------------
def _probs(logits):
    e = [math.exp(v) for v in logits]
    return [v / sum(e) for v in e]


def test_mib_unbiased_ce_matches_hand_computation():
    z = [0.5, 1.0, -0.5, 2.0]  # classes 0 (bg), 1, 2 old; 3 new
    logits = torch.tensor(z).view(1, 4, 1)
    p = _probs(z)
    old, new = [0, 1, 2], [0, 3]  # current task annotates only class 3: classes 1, 2 are hidden in background
    bg = unbiased_cross_entropy(logits, torch.tensor([[0]]), old, new)
    assert bg.item() == pytest.approx(-math.log(p[0] + p[1] + p[2]), rel=1e-5)
    fg = unbiased_cross_entropy(logits, torch.tensor([[3]]), old, new)
    assert fg.item() == pytest.approx(-math.log(p[3]), rel=1e-5)
    # class 1 annotated again in the current task: it is not merged into background
    partial = unbiased_cross_entropy(logits, torch.tensor([[0]]), old, [0, 1, 3])
    assert partial.item() == pytest.approx(-math.log(p[0] + p[2]), rel=1e-5)
    # domain scenario (all old classes annotated): plain cross-entropy, also on a [B, 1, ...] nnU-Net target.
    # Ours and torch's are different float32 computations (log-softmax, gather, mean of 50 terms in their own order):
    # they may differ by a few ulps per term, ~1e-6 on a mean of ~1.6. rel 1e-5 covers that; merging a class into
    # background by mistake would change the value by > 1e-2.
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 1, 5, 5)).float()
    torch.testing.assert_close(unbiased_cross_entropy(x, y, [0, 1, 2], [0, 1, 2]), F.cross_entropy(x, y[:, 0].long()),
                               rtol=1e-5, atol=0)
    # ignored voxels do not count
    y2 = y.clone()
    y2[0, 0, 0, 0] = 9
    keep = y2[:, 0] != 9
    ce = F.cross_entropy(x.movedim(1, -1)[keep], y2[:, 0][keep].long())
    # the same two computations over 50 vs 49 voxels (tolerance as above): counting the ignored voxel moves it ~1e-2
    assert unbiased_cross_entropy(x, y2, [0, 1, 2], [0, 1, 2], ignore_index=9).item() == pytest.approx(ce.item(),
                                                                                                       rel=1e-5)


def test_mib_unbiased_kd_matches_hand_computation():
    zs, zt = [0.2, -1.0, 0.7, 1.5], [1.0, 0.3, -0.4]  # student: 0,1,2 old + 3 new; teacher: 0,1,2
    qs, pt = _probs(zs), _probs(zt)
    q_hat = [qs[0] + qs[3], qs[1], qs[2]]
    hand = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, q_hat)) / 3  # / |C_old|, the authors' scale
    got = unbiased_kd(torch.tensor(zs).view(1, 4, 1), torch.tensor(zt).view(1, 3, 1), [0, 1, 2], [0, 3])
    assert got.item() == pytest.approx(hand, rel=1e-5)
    # no new class: exactly the plain KD (KL at T = 1) over the three old classes
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    assert unbiased_kd(s, t, [0, 1, 2], [0, 1, 2]).item() == pytest.approx(softened_kl(s, t, 1.0).item() / 3,
                                                                           rel=1e-6)
    assert unbiased_kd(t, t, [0, 1, 2], [0, 1, 2]).abs().item() < 1e-6


def test_mib_domain_mode_adds_only_weighted_kd(setup):
    trainer, data, target = setup
    method = create_method("mib", {"lambda": 3.0})
    method.before_stage(trainer, STAGE2)
    perturb(trainer.network)
    out = trainer.network(data)
    terms = method.loss_terms(trainer, data, target, out)
    with torch.no_grad():
        t_out = method.teacher(data)
    hand = 3.0 / 3 * sum(w * softened_kl(o.detach(), to, 1.0)  # lambda / |C_old| (three channels)
                         for w, o, to in zip(deep_supervision_weights(len(out)), out, t_out))
    assert list(terms) == ["mib_kd"] and terms["mib_kd"].item() == pytest.approx(hand.item(), rel=1e-5)


def test_mib_class_mode_swaps_ce_for_unbiased_ce(setup):
    trainer, data, target = setup
    trainer.stage_state = replace(trainer.stage_state, annotated_classes=(0, 2))  # class 1: old, not annotated
    method = create_method("mib")
    method.before_stage(trainer, STAGE2)
    out = trainer.network(data)
    corr = method.loss_terms(trainer, data, target, out)["mib_unce_correction"]
    w = deep_supervision_weights(len(out))
    hand = sum(wk * (unbiased_cross_entropy(o, t, [0, 1, 2], [0, 2]) - F.cross_entropy(o, t[:, 0].long()))
               for wk, o, t in zip(w, out, target))
    assert corr.item() == pytest.approx(hand.item(), rel=1e-5) and corr.item() < 0


# ---- PLOP -----------------------------------------------------------------------------------------------------------
def test_pod_reads_features_of_both_networks_at_configured_layers(setup):
    trainer, data, target = setup
    method = create_method("plop")
    method.before_stage(trainer, STAGE2)
    assert method.student_capture.names == ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2"]
    seen = {}
    orig = method.pod_term

    def spy(*args):
        seen["s"] = {k: v for k, v in method.student_capture.features.items()}
        seen["t"] = {k: v for k, v in method.teacher_capture.features.items()}
        return orig(*args)

    method.pod_term = spy
    step_terms(method, trainer, data, target)
    shapes = {"encoder.stages.0": (1, 4, 16, 16, 16), "encoder.stages.1": (1, 8, 8, 8, 8),
              "encoder.stages.2": (1, 8, 4, 4, 4)}
    for who in ("s", "t"):
        assert {k: tuple(v.shape) for k, v in seen[who].items()} == shapes
    assert all(v.requires_grad for v in seen["s"].values())  # live student features
    assert not any(v.requires_grad for v in seen["t"].values())
    for k in shapes:  # different networks were read: the student's features are not the teacher's tensors
        assert seen["s"][k] is not seen["t"][k]
    # other layers: only those are captured, on both networks
    other = create_method("plop", {"pod_layers": ["decoder.stages.*", "encoder.stages.0"]})
    method.after_stage(trainer, STAGE2)
    other.before_stage(trainer, STAGE2)
    assert other.student_capture.names == other.teacher_capture.names == \
        ["decoder.stages.0", "decoder.stages.1", "encoder.stages.0"]
    step_terms(other, trainer, data, target)
    trainer.network(data)
    assert set(other.student_capture.features) == set(other.student_capture.names)
    assert not other.teacher_capture.features  # the teacher only runs inside loss_terms
    with torch.no_grad():  # validation/inference forwards of the student record nothing
        other.student_capture.pop()
        trainer.network(data)
    assert not other.student_capture.features
    other.after_stage(trainer, STAGE2)  # hooks removed
    trainer.network(data)
    assert not other.student_capture and all(not m._forward_hooks for m in trainer.network.modules())


def test_feature_capture_ignores_copies_of_hooked_network():
    net = tiny_unet()
    cap = FeatureCapture(net, ["encoder.stages.*"])
    copy_ = snapshot_teacher(net)  # deepcopy after hooks: the copy shares the closures
    copy_(torch.randn(1, 1, 16, 16, 16))
    assert cap.features == {}
    cap.remove()


def test_local_pod_embedding_by_hand():
    """PLOP's embedding pools the *squared* features and is not normalised (the reference's ``pod_prepro="pow"``
    and its ``normalize = False``). Squares of small integers, their sums and the divisions by 2 and 4 are exact in
    float32, so the embedding is compared bitwise."""
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1  # 2D, one channel
    sq = x[0, 0] ** 2
    emb = local_pod_embedding(x, scales=[1])
    torch.testing.assert_close(emb[0], torch.cat([sq.mean(1), sq.mean(0)]), rtol=0, atol=0)
    e2 = local_pod_embedding(x, scales=[2])
    # scale 2: four 2x2 regions; layout: axis-0 profiles [C, 4 rows, 2 column parts], then axis-1 profiles
    # [C, 2 row parts, 4 columns]
    assert e2.shape == (1, 4 * 4)
    region = sq[:2, 2:]
    torch.testing.assert_close(e2[0, [1, 3, 10, 11]], torch.cat([region.mean(1), region.mean(0)]), rtol=0, atol=0)
    # the reference's norm switch divides the whole embedding by its L2 norm (float32 rounding of a norm over
    # entries up to ~240: 1e-6 is a few ulps and far below any mix-up of entries)
    torch.testing.assert_close(local_pod_embedding(x, [1, 2], normalize=True)[0],
                               F.normalize(local_pod_embedding(x, [1, 2]), dim=1)[0], rtol=0, atol=1e-6)
    # 3D, scales 1, 2, 4 on 16^3 with C channels: 3 profiles per region, sizes sum to 3 * C * 16 * s^2
    y = torch.randn(2, 5, 16, 16, 16)
    assert local_pod_embedding(y, [1, 2, 4]).shape == (2, sum(3 * 5 * 16 * s * s for s in (1, 2, 4)))
    assert local_pod_embedding(-y, [1, 2, 4]).equal(local_pod_embedding(y, [1, 2, 4]))  # squared: sign-blind
    assert local_pod_loss([y], [y], [1.0]).item() == 0.0
    # unnormalised: features three times as large are far away (they were at distance 0 when normalised) ...
    assert local_pod_loss([y], [y * 3.0], [1.0]).item() > 1.0
    assert local_pod_loss([y], [y * 3.0], [1.0], normalize=True).item() < 1e-5  # ... unless normalize is set


def test_local_pod_loss_weights_each_map_and_averages_over_maps():
    """(1/L) sum_l f_l mean_b ||POD(s_l) - POD(t_l)||: each map its factor, the sum divided by the number of maps
    (a map with factor 0 still counts, as in the reference). float32 norms of ~1e3 entries: rel 1e-5."""
    g = torch.Generator().manual_seed(1)
    s1, t1 = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    s2, t2 = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)

    def dist(a, b):
        return (local_pod_embedding(a) - local_pod_embedding(b)).norm(dim=1).mean().item()

    got = local_pod_loss([s1, s2], [t1, t2], [0.5, 2.0]).item()
    assert got == pytest.approx((0.5 * dist(s1, t1) + 2.0 * dist(s2, t2)) / 2, rel=1e-5)
    assert local_pod_loss([s1, s2], [t1, t2], [0.5, 0.0]).item() == pytest.approx(0.5 * dist(s1, t1) / 2, rel=1e-5)


def test_logits_of_new_classes_are_summed_into_background_for_pod():
    z = torch.arange(5.0).view(1, 5, 1, 1)  # channels 0..4; the teacher has 3
    assert logits_in_teacher_classes(z, 3).flatten().tolist() == [0.0 + 3.0 + 4.0, 1.0, 2.0]
    assert logits_in_teacher_classes(z, 5) is z


def test_pod_schedule_is_sqrt_of_classes_over_new_classes():
    assert pod_schedule(5, 2) == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert pod_schedule(17, 1) == pytest.approx(math.sqrt(17), rel=1e-12)
    assert pod_schedule(3, 0) == 1.0  # no class added (domain scenario): every class counts as new


def class_stage(annotated=(0, 3, 4)):
    """A class-incremental stage 2: the student has 5 channels (task B added global 3 and 4), the teacher the 3 of
    task A; task B annotates ``annotated``. The trainer's loss is nnU-Net's own Dice + CE with deep supervision."""
    space = LabelSpace("class", {"background": 0, "a": 1, "b": 2, "c": 3, "d": 4},
                       {"a": "A", "b": "A", "c": "B", "d": "B"},
                       {"A": {0: 0, 1: 1, 2: 2}, "B": {0: 0, 1: 3, 2: 4}})
    torch.manual_seed(0)
    trainer = FakeTrainer(resize_output(tiny_unet(), 5), stage=STAGE2, tasks_before=("A",),
                          annotated_classes=annotated, loss=nnunet_loss())
    data = torch.randn(1, 1, 16, 16, 16)
    target = [torch.randint(0, 5, (1, 1, 16, 16, 16)).float(), torch.randint(0, 5, (1, 1, 8, 8, 8)).float()]
    for t in target:
        t[(t == 1) | (t == 2)] = 0  # task B does not annotate a and b
    return space, trainer, data, target


def pod_terms(trainer, data, target, configs, labels=None, full_teacher=False) -> list[float]:
    """``plop_pod`` of one PLOP per config, all with the same teacher (the unperturbed network) on the same
    perturbed student forward."""
    methods = [create_method("plop", c, labels=labels) for c in configs]
    for m in methods:
        m.before_stage(trainer, STAGE2)
    perturb(trainer.network, 0.05)
    output = trainer.network(data)
    terms = [(DistillationMethod.loss_terms if full_teacher else type(m).loss_terms)(m, trainer, data, target, output)
             ["plop_pod"].item() for m in methods]
    for m in methods:
        m.after_stage(trainer, STAGE2)
    return terms


def test_pod_factor_follows_the_schedule_in_class_and_domain_stages(setup):
    space, trainer, data, target = class_stage()
    with_schedule, without = pod_terms(trainer, data, target, [{}, {"pod_schedule": False}], labels=space)
    # 5 classes known, 2 of them new: sqrt(5/2) (float32 terms: rel 1e-5)
    assert without > 0 and with_schedule == pytest.approx(math.sqrt(5 / 2) * without, rel=1e-5)
    trainer, data, target = setup  # domain: no channel added, factor 1
    with_schedule, without = pod_terms(trainer, data, target, [{}, {"pod_schedule": False}])
    assert with_schedule == without > 0


def test_pod_on_logits_has_its_own_factor(setup):
    """POD on the final logits weighs pod_logits_lambda, the feature maps pod_lambda, and the sum is divided by
    the number of maps (3 encoder stages + the logits)."""
    trainer, data, target = setup
    with torch.no_grad():
        teacher = trainer.network(data)[0]  # the teacher is the network before pod_terms perturbs it
    every, features, logits = pod_terms(trainer, data, target, [{}, {"pod_logits_lambda": 0.0}, {"pod_lambda": 0.0}],
                                        full_teacher=True)
    assert features > 0 and logits > 0
    # the same float32 terms summed in another grouping: rel 1e-5
    assert every == pytest.approx(features * 3 / 4 + logits, rel=1e-5)
    # the logits part by hand: 0.0005 x POD distance of the highest-resolution logits, over 4 maps
    with torch.no_grad():
        student = trainer.network(data)[0]
    hand = 0.0005 * (local_pod_embedding(student) - local_pod_embedding(teacher)).norm(dim=1).mean().item() / 4
    assert logits == pytest.approx(hand, rel=1e-5)


def test_plop_pseudo_labels():
    # 5 voxels, teacher classes 0, 1, 2; current task annotates 0 and 2 -> class 1 may be pseudo-labelled
    teacher = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 9.0],
                             [9.0, 0.2, 9.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 9.0, 0.0]]])  # [1, 3, 5]
    target = torch.tensor([[[0.0, 0.0, 2.0, 0.0, 0.0]]])   # [1, 1, 5] as nnU-Net gives it
    thresholds = torch.full((3,), 0.5)
    out = pseudo_labels(target, teacher, thresholds, pseudo_classes=[1], ignore=7)
    # voxel 0: background, confident teacher says 1 -> 1; voxel 1: teacher says 1, uncertain -> ignored;
    # voxel 2: annotated 2 -> unchanged though the teacher says 1; voxel 3: teacher says 2 (annotated class) -> 0;
    # voxel 4: teacher confidently says background -> 0
    assert out.tolist() == [[[1.0, 7.0, 2.0, 0.0, 0.0]]] and out.dtype == target.dtype
    # uncertain background: the teacher says background but is unsure -> ignored as well
    assert pseudo_labels(target, teacher, torch.tensor([0.0, 0.5, 0.5]), [1], 7).tolist() == \
        [[[1.0, 7.0, 2.0, 0.0, 7.0]]]
    # domain scenario: no class to pseudo-label, nothing changes
    assert torch.equal(pseudo_labels(target, teacher, thresholds, pseudo_classes=[], ignore=7), target)


def test_uncertain_voxels_give_no_gradient_confident_ones_do():
    """Class stage: the loss the trainer minimises (nnU-Net's loss plus PLOP's correction) is nnU-Net's loss on the
    pseudo-labels with the uncertain background voxels ignored: at those the student's logits get no gradient at
    all (Dice and CE), at every other voxel they do (before, uncertain voxels were trained as background)."""
    space, trainer, data, target = class_stage()
    method = create_method("plop", {"pod_lambda": 0.0, "pod_logits_lambda": 0.0}, labels=space)
    method.before_stage(trainer, STAGE2)
    perturb(trainer.network, 0.05)
    seen = {}
    real = trainer.loss_ignoring

    def spy(label):
        seen["ignore"] = label
        loss = real(label)
        return lambda out, tgt: (seen.setdefault("pseudo", tgt), loss(out, tgt))[1]

    trainer.loss_ignoring = spy
    output = trainer.network(data)
    for o in output:
        o.retain_grad()
    terms = method.loss_terms(trainer, data, target, output)
    (trainer.loss(output, target) + terms["plop_pseudo_correction"]).backward()
    assert seen["ignore"] == 5  # the dataset has no ignore label: the first value past the 5 classes
    pseudo = seen["pseudo"][0][:, 0]
    grad = output[0].grad.abs().sum(1)  # [B, *spatial]
    uncertain, confident_old = pseudo == 5, (pseudo == 1) | (pseudo == 2)
    assert uncertain.sum() > 0 and confident_old.sum() > 0
    # the task loss enters once with + and once with -: where the pseudo loss is 0 they cancel up to float32
    # round-off of gradients ~1e-4 per voxel (measured ~1e-11); every other voxel keeps one of 1e-5 or more
    assert grad[uncertain].max().item() < 1e-9
    assert grad[~uncertain].min().item() > 1e-6


def test_plop_class_mode_pseudo_correction_is_nnunet_loss_on_pseudo_labels():
    space, trainer, data, target = class_stage()
    method = create_method("plop", labels=space)
    off = create_method("plop", {"classif_adaptive_factor": False}, labels=space)
    method.before_stage(trainer, STAGE2)
    off.before_stage(trainer, STAGE2)  # the same teacher
    perturb(trainer.network, 0.05)
    output = trainer.network(data)
    terms = method.loss_terms(trainer, data, target, output)
    assert set(terms) == {"plop_pod", "plop_pseudo_correction"}
    with torch.no_grad():
        teacher = method.teacher(data)
    pseudo = [pseudo_labels(t, tl, median_entropy_thresholds(tl, t[:, 0] == 0), [1, 2], 5)
              for t, tl in zip(target, teacher)]
    changed = pseudo[0] != target[0]
    assert changed.any() and (target[0][changed] == 0).all()
    # only the confident half of them: the voxels the teacher calls class 1 above that class's median entropy are
    # ignored (a threshold of 1 would accept every one of them)
    candidates = (teacher[0].argmax(1, keepdim=True) == 1) & (target[0] == 0)
    assert 0 < int((pseudo[0] == 1).sum()) < int(candidates.sum())
    # the reference's classif_adaptive_factor: the share of background voxels not ignored, by hand
    background = target[0] == 0
    share = ((pseudo[0] != 5) & background).sum().item() / background.sum().item()
    assert 0.2 < share < 0.8  # about half of them are uncertain (the medians)
    ignoring = loss_with_ignore_label(trainer.loss, 5)
    hand = share * ignoring(output, pseudo) - trainer.loss(output, target)
    # the same float32 operations on the same tensors, the share computed in float64 here: rel 1e-6
    assert terms["plop_pseudo_correction"].item() == pytest.approx(hand.item(), rel=1e-6)
    plain = off.loss_terms(trainer, data, target, output)["plop_pseudo_correction"]  # the same forward's features
    assert plain.item() == pytest.approx((ignoring(output, pseudo) - trainer.loss(output, target)).item(), rel=1e-6)


def test_adaptive_factor_by_hand():
    target = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 2.0]]])
    pseudo = torch.tensor([[[1.0, 7.0, 0.0, 7.0, 2.0]]])  # two of the four background voxels ignored
    assert adaptive_factor(target, pseudo, 7).item() == 0.5
    assert adaptive_factor(target[..., 4:], pseudo[..., 4:], 7).item() == 1.0  # no background voxel


def test_plop_thresholds_are_each_classes_median_teacher_entropy():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 3, 5, 5, generator=g)
    logits[:, 2] -= 100  # the teacher never predicts class 2
    pred, ent = logits.argmax(1), normalized_entropy(logits)
    got = median_entropy_thresholds(logits)
    for c in (0, 1):  # by hand: the lower middle value, as torch.median takes it
        values = sorted(ent[pred == c].tolist())
        assert got[c].item() == pytest.approx(values[(len(values) - 1) // 2], abs=1e-7)
        assert 0 < got[c].item() < 1
    assert got[2].item() == 1.0  # no voxel of class 2: no pseudo-label can come from it anyway
    # the reference's medians are over the background voxels only
    mask = torch.rand(2, 5, 5, generator=g) < 0.5
    got = median_entropy_thresholds(logits, mask)
    for c in (0, 1):
        values = sorted(ent[mask & (pred == c)].tolist())
        assert got[c].item() == pytest.approx(values[(len(values) - 1) // 2], abs=1e-7)


def test_plop_encoder_only_teacher_pass_equals_full_teacher_pass(setup):
    """With every class annotated, no POD on the logits and encoder-only POD layers, PLOP runs just the teacher's
    encoder: the term must be exactly what the full teacher forward gives."""
    trainer, data, target = setup
    method = create_method("plop", {"pod_logits_lambda": 0.0})
    method.before_stage(trainer, STAGE2)
    calls = []
    hook = method.teacher.decoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.add_(0.01 * torch.randn_like(p))
    output = trainer.network(data)
    fast = method.loss_terms(trainer, data, target, output)["plop_pod"]
    assert not calls  # the teacher's decoder did not run
    output = trainer.network(data)
    full = DistillationMethod.loss_terms(method, trainer, data, target, output)["plop_pod"]
    hook.remove()
    assert fast.item() > 0
    assert torch.allclose(fast, full)


# ---- nnU-Net's loss with another ignore label -----------------------------------------------------------------------
def nnunet_loss(ignore_label=None):
    return DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss),
        deep_supervision_weights(2))


def test_loss_with_ignore_label_changes_only_the_ignore_label():
    from types import SimpleNamespace

    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    from lifelong_nnunet.nnunet.trainer import ContinualTrainer
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(2, 3, 8, 8, generator=g, requires_grad=True), torch.randn(2, 3, 4, 4, generator=g)]
    tgt = [torch.randint(0, 3, (2, 1, 8, 8), generator=g).float(),
           torch.randint(0, 3, (2, 1, 4, 4), generator=g).float()]
    original = nnunet_loss()
    copy_ = loss_with_ignore_label(original, 9)
    assert original.loss.ignore_label is None and original.loss.ce.ignore_index == -100  # the original untouched
    bare = loss_with_ignore_label(original.loss, 9)  # without deep supervision
    assert isinstance(bare, DC_and_CE_loss) and bare.ignore_label == 9 == bare.ce.ignore_index
    assert copy_(out, tgt).item() == original(out, tgt).item()  # no voxel marked: the same loss, same operations
    marked = [t.clone() for t in tgt]
    marked[0][0, 0, :4] = 9
    kept = [t.clone() for t in tgt]
    kept[0][0, 0, :4] = 0
    value = copy_(out, marked)
    grad, = torch.autograd.grad(value, out[0])
    assert grad[0, :, :4].abs().max().item() == 0.0 and grad[0, :, 4:].abs().min().item() > 0
    assert value.item() != copy_(out, kept).item()
    # the dataset's own ignore label serves as it is; another one, or a region loss, is refused
    own = nnunet_loss(ignore_label=9)
    assert loss_with_ignore_label(own, 9) is own
    with pytest.raises(ValueError, match="already ignores"):
        loss_with_ignore_label(own, 5)
    with pytest.raises(ValueError, match="DC_and_BCE_loss"):
        loss_with_ignore_label(DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5}), 5)
    # the real trainer builds the copy once per label
    trainer = SimpleNamespace(loss=original, _losses_ignoring={})
    first = ContinualTrainer.loss_ignoring(trainer, 9)
    assert ContinualTrainer.loss_ignoring(trainer, 9) is first and first.loss.ignore_label == 9
