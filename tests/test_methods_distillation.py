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

from fakes import FakeTrainer
from lifelong_nnunet.methods import available_methods, create_method
from lifelong_nnunet.methods.base import Stage
from lifelong_nnunet.methods.distillation import FeatureCapture, snapshot_teacher, softened_kl
from lifelong_nnunet.methods.lwf import lwf_loss
from lifelong_nnunet.methods.mib import unbiased_cross_entropy, unbiased_kd
from lifelong_nnunet.methods.plop import (
    local_pod_embedding,
    local_pod_loss,
    median_entropy_thresholds,
    normalized_entropy,
    pseudo_labels,
)
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

    def spy():
        seen["s"] = {k: v for k, v in method.student_capture.features.items()}
        seen["t"] = {k: v for k, v in method.teacher_capture.features.items()}
        return orig()

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
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1  # 2D, one channel
    emb = local_pod_embedding(x, scales=[1])
    width = x[0, 0].mean(1)  # profile along axis 0 (average over axis 1)
    height = x[0, 0].mean(0)
    v = torch.cat([width, height])
    # POD pools and normalises its own way; means of small integers are exact, the norms round in float32 (entries
    # ~0.1-0.5, one ulp ~3e-8). 1e-6 absolute is ~30 ulps and far below any mix-up of profiles or regions (> 1e-2).
    torch.testing.assert_close(emb[0], v / v.norm(), rtol=0, atol=1e-6)
    e2 = local_pod_embedding(x, scales=[2])
    # scale 2: four 2x2 regions, each its own normalised [axis-0 profile, axis-1 profile]
    assert e2.shape == (1, 4 * 4)
    region = x[0, 0, :2, 2:]
    v = torch.cat([region.mean(1), region.mean(0)])
    # layout: axis-0 profiles [C, 4 rows, 2 column parts], then axis-1 profiles [C, 2 row parts, 4 columns]
    torch.testing.assert_close(e2[0, [1, 3, 10, 11]], v / v.norm(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.linalg.vector_norm(e2), torch.tensor(2.0), rtol=0, atol=1e-6)  # 4 unit regions
    # 3D, scales 1, 2, 4 on 16^3 with C channels: 3 profiles per region, sizes sum to 3 * C * 16 * s^2
    y = torch.randn(2, 5, 16, 16, 16)
    assert local_pod_embedding(y, [1, 2, 4]).shape == (2, sum(3 * 5 * 16 * s * s for s in (1, 2, 4)))
    assert local_pod_loss([y], [y]).item() == 0.0
    assert local_pod_loss([y], [y * 3.0]).item() < 1e-5  # scale invariant (normalised)
    assert local_pod_loss([y], [y + torch.randn_like(y)]).item() > 0.1


def test_plop_pseudo_labels():
    # 4 voxels, teacher classes 0, 1, 2; current task annotates 0 and 2 -> class 1 may be pseudo-labelled
    teacher = torch.tensor([[[0.0, 0.0, 0.0, 0.0],
                             [9.0, 0.2, 9.0, 0.0],
                             [0.0, 0.0, 0.0, 9.0]]])  # [1, 3, 4]
    target = torch.tensor([[[0.0, 0.0, 2.0, 0.0]]])   # [1, 1, 4] as nnU-Net gives it
    thresholds = torch.full((3,), 0.5)
    out = pseudo_labels(target, teacher, thresholds, pseudo_classes=[1])
    # voxel 0: background, confident teacher says 1 -> 1; voxel 1: uncertain -> stays 0;
    # voxel 2: annotated 2 -> unchanged though the teacher says 1; voxel 3: teacher says 2 (annotated class) -> 0
    assert out.tolist() == [[[1.0, 0.0, 2.0, 0.0]]] and out.dtype == target.dtype
    # domain scenario: no class to pseudo-label, nothing changes
    assert torch.equal(pseudo_labels(target, teacher, thresholds, pseudo_classes=[]), target)


def test_plop_class_mode_adds_pseudo_label_correction(setup):
    trainer, data, target = setup
    trainer.stage_state = replace(trainer.stage_state, annotated_classes=(0, 2))
    calls = []

    def loss(output, tgt):
        calls.append([t.clone() for t in tgt])
        return sum(F.cross_entropy(o, t[:, 0].long()) for o, t in zip(output, tgt))

    trainer.loss = loss
    method = create_method("plop")
    method.before_stage(trainer, STAGE2)
    terms = step_terms(method, trainer, data, target)
    assert set(terms) == {"plop_pod", "plop_pseudo_correction"}
    pseudo, given = calls
    changed = pseudo[0] != given[0]
    assert changed.any() and (given[0][changed] == 0).all() and (pseudo[0][changed] == 1).all()
    # only the confident half of them: the voxels the teacher calls class 1 above that class's median entropy keep
    # their background label (a threshold of 1 would accept every one of them)
    with torch.no_grad():
        teacher_logits = method.teacher(data)[0]
    candidates = (teacher_logits.argmax(1, keepdim=True) == 1) & (given[0] == 0)
    assert 0 < int(changed.sum()) < int(candidates.sum())


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


def test_plop_encoder_only_teacher_pass_equals_full_teacher_pass(setup):
    """With every class annotated and encoder-only POD layers, PLOP runs just the teacher's encoder: the term
    must be exactly what the full teacher forward gives."""
    from lifelong_nnunet.methods.distillation import DistillationMethod
    trainer, data, target = setup
    method = create_method("plop")
    method.before_stage(trainer, STAGE2)
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.add_(0.01 * torch.randn_like(p))
    output = trainer.network(data)
    fast = method.loss_terms(trainer, data, target, output)["plop_pod"]
    output = trainer.network(data)
    full = DistillationMethod.loss_terms(method, trainer, data, target, output)["plop_pod"]
    assert fast.item() > 0
    assert torch.allclose(fast, full)
