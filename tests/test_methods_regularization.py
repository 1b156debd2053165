"""Mechanism tests of the quadratic-penalty methods (ewc, mas, rw) on a tiny real nnU-Net network.

Every reference value is computed here by hand (plain loops), never by the code under test.
"""
from __future__ import annotations

import io

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from fakes import FakeTrainer
from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.methods import Stage, available_methods, create_method

METHODS = ["ewc", "mas", "rw"]
FAST = {"ewc": {"fisher_batches": 4}, "mas": {"importance_batches": 4}, "rw": {"update_interval": 1}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: threads only add overhead (10x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(seed: int = 0) -> PlainConvUNet:
    torch.manual_seed(seed)
    return PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 8], conv_op=torch.nn.Conv3d,
                         kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1, num_classes=3,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=True)


def make_batches(n: int, seed: int, classes: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seg = torch.randint(0, classes, (2, 1, 8, 8, 8), generator=g)
        data = torch.randn(2, 1, 8, 8, 8, generator=g) + seg.float()
        out.append({"data": data, "target": [seg.float(), seg[:, :, ::2, ::2, ::2].float()]})
    return out


def trainer_for(network, batches, stage=1) -> FakeTrainer:
    """The shared fake with nnU-Net's own deep-supervision Dice+CE loss, training on ``batches``."""
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                       weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss), [2 / 3, 1 / 3])
    return FakeTrainer(network, stage=Stage(stage, (f"task{stage}",)), loss=loss, batches=batches)


def train_steps(method, trainer, n, lr=0.05, seed=0, classes=3):
    """Plain SGD steps through the method's hooks, as ContinualTrainer.train_step calls them."""
    net = trainer.network
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    batches = make_batches(n, seed, classes)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        out = net(b["data"])
        loss = trainer.loss(out, b["target"])
        extra = method.loss_terms(trainer, b["data"], b["target"], out)
        (loss + sum(extra.values()) if extra else loss).backward()
        method.after_backward(trainer)
        opt.step()
        method.after_step(trainer)


def finish_task(method, trainer, steps=3, seed=0):
    method.before_stage(trainer, trainer.stage_state.stage)
    train_steps(method, trainer, steps, seed=seed)
    method.after_stage(trainer, trainer.stage_state.stage)


def perturb(net, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def reference_importance(net, batches, objective, transform):
    """Hand-computed mean over every sample of every batch of transform(grad), network in eval mode."""
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    acc = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    count = 0
    net.eval()
    for b in batches:
        for i in range(b["data"].shape[0]):
            value = objective(net(b["data"][i:i + 1]), [t[i:i + 1] for t in b["target"]])
            for n, g in zip(names, torch.autograd.grad(value, params, allow_unused=True)):
                if g is not None:  # MAS ignores the low-resolution deep-supervision head
                    acc[n] += g.square() if transform == "square" else g.abs()
            count += 1
    net.train()
    return {n: a / count for n, a in acc.items()}


def mas_objective(output, target):
    return output[0].square().mean()


def hand_penalty(net, coefficient, terms):
    """coefficient * sum_k sum_i W_k,i (theta_i - a_k,i)^2 with a plain loop over named_parameters."""
    total = torch.zeros((), dtype=torch.float64)
    for weight, anchor in terms:
        for n, p in net.named_parameters():
            total += (weight[n].double() * (p.detach().double() - anchor[n].double()) ** 2).sum()
    return coefficient * total


def anchors_of(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


# ---- registry and parameters ------------------------------------------------------------------------------------
def test_methods_are_discovered_and_validate_parameters():
    assert set(METHODS) <= set(available_methods())
    with pytest.raises(UserInputError):
        create_method("ewc", {"lambda": -1.0})
    with pytest.raises(UserInputError):
        create_method("mas", {"importance_batches": 0})
    with pytest.raises(UserInputError):
        create_method("rw", {"alpha": 1.5})
    with pytest.raises(UserInputError):
        create_method("ewc", {"fisher_batch": 3})


# ---- the penalty itself -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_no_penalty_before_first_task_finishes(name):
    method = create_method(name, FAST[name])
    trainer = trainer_for(tiny_net(), make_batches(4, 10))
    method.before_stage(trainer, trainer.stage_state.stage)
    b = trainer.batches[0]
    assert method.loss_terms(trainer, b["data"], b["target"], trainer.network(b["data"])) == {}


@pytest.mark.parametrize("name", METHODS)
def test_penalty_is_zero_at_anchor_and_positive_off_it(name):
    method = create_method(name, FAST[name])
    trainer = trainer_for(tiny_net(), make_batches(4, 10))
    finish_task(method, trainer)
    method.before_stage(trainer, Stage(2, ("task2",)))
    b = trainer.batches[0]
    terms = method.loss_terms(trainer, b["data"], b["target"], trainer.network(b["data"]))
    assert set(terms) == {name}
    assert terms[name].item() == 0.0
    perturb(trainer.network, 0.01)
    small = method.penalty_value(trainer.network).item()
    perturb(trainer.network, 0.05, seed=2)
    assert 0 < small < method.penalty_value(trainer.network).item()


@pytest.mark.parametrize("name", METHODS)
def test_penalty_gradient_is_analytic_for_every_parameter(name):
    method = create_method(name, {**FAST[name], "lambda": 3.0})
    trainer = trainer_for(tiny_net(), make_batches(4, 10))
    finish_task(method, trainer)
    net = trainer.network
    anchor = anchors_of(net)
    weight = {n: w.clone() for n, w in method.quadratic.weight.items()}
    perturb(net)
    net.zero_grad(set_to_none=True)
    method.before_stage(trainer, Stage(2, ("task2",)))
    b = trainer.batches[0]
    method.loss_terms(trainer, b["data"], b["target"], None)[name].backward()
    # EWC: lambda/2 * F (theta - a)^2 -> lambda F (theta - a); MAS and RW: lambda W (theta - a)^2 -> 2 lambda W (.)
    factor = 3.0 if name == "ewc" else 6.0
    names = [n for n, _ in net.named_parameters()]
    assert set(names) == set(weight) and len(names) == 28  # deduplicated: state_dict has 72 keys
    for n, p in net.named_parameters():
        expected = factor * weight[n] * (p.detach() - anchor[n])
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-9, msg=n)
    assert any(float(weight[n].abs().max()) > 0 for n in names)


# ---- importance estimates ---------------------------------------------------------------------------------------
def test_ewc_fisher_is_mean_over_many_batches_not_one():
    net = tiny_net()
    batches = make_batches(4, 10)
    trainer = trainer_for(net, batches)
    method = create_method("ewc", {"fisher_batches": 4})
    method.after_stage(trainer, trainer.stage_state.stage)
    assert trainer.drawn == 4
    assert trainer.bars == {"EWC Fisher batches": [4, 4]}  # the pass shows its progress, one step per batch
    fisher = method.quadratic.weight
    reference = reference_importance(net, batches, trainer.loss, "square")
    one_batch = reference_importance(net, batches[:1], trainer.loss, "square")
    assert net.training  # the network mode is restored
    for n in reference:
        torch.testing.assert_close(fisher[n], reference[n], rtol=1e-4, atol=1e-12)
    assert not all(torch.allclose(fisher[n], one_batch[n], rtol=1e-3) for n in reference)


def test_mas_importance_is_mean_over_many_batches_not_one():
    net = tiny_net()
    batches = make_batches(3, 20)
    trainer = trainer_for(net, batches)
    method = create_method("mas", {"importance_batches": 3})
    method.after_stage(trainer, trainer.stage_state.stage)
    assert trainer.bars == {"MAS importance batches": [3, 3]}
    omega = method.quadratic.weight
    reference = reference_importance(net, batches, mas_objective, "abs")
    one_batch = reference_importance(net, batches[:1], mas_objective, "abs")
    for n in reference:
        torch.testing.assert_close(omega[n], reference[n], rtol=1e-4, atol=1e-12)
    assert not all(torch.allclose(omega[n], one_batch[n], rtol=1e-3) for n in reference)
    assert all(bool((w >= 0).all()) for w in omega.values())


# ---- every earlier task contributes -----------------------------------------------------------------------------
def _two_tasks(name, params):
    net = tiny_net()
    b1, b2 = make_batches(3, 10), make_batches(3, 30)
    objective, transform = (None, "square") if name == "ewc" else (mas_objective, "abs")
    method = create_method(name, params)
    t1 = trainer_for(net, b1, 1)
    imp1 = reference_importance(net, b1, objective or t1.loss, transform)
    a1 = anchors_of(net)
    method.after_stage(t1, t1.stage_state.stage)
    perturb(net, 0.05, seed=3)  # stands for training on task 2
    t2 = trainer_for(net, b2, 2)
    imp2 = reference_importance(net, b2, objective or t2.loss, transform)
    a2 = anchors_of(net)
    method.before_stage(t2, t2.stage_state.stage)
    method.after_stage(t2, t2.stage_state.stage)
    return method, net, (imp1, a1), (imp2, a2)


def test_ewc_penalty_sums_every_earlier_task():
    method, net, (f1, a1), (f2, a2) = _two_tasks("ewc", {"fisher_batches": 3, "lambda": 2.0})
    with torch.no_grad():  # back on task 2's anchor: only task 1's term is left, and it is not 0
        for n, p in net.named_parameters():
            p.copy_(a2[n])
    at_a2 = method.penalty_value(net).item()
    assert at_a2 > 0
    assert at_a2 == pytest.approx(hand_penalty(net, 1.0, [(f1, a1)]).item(), rel=1e-4)
    perturb(net, 0.02, seed=4)
    expected = hand_penalty(net, 1.0, [(f1, a1), (f2, a2)]).item()
    assert method.penalty_value(net).item() == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(hand_penalty(net, 1.0, [(f2, a2)]).item(), rel=1e-3)


def test_online_ewc_decays_earlier_fisher_into_the_latest_anchor():
    method, net, (f1, a1), (f2, a2) = _two_tasks("ewc", {"fisher_batches": 3, "lambda": 2.0, "online": True,
                                                          "gamma": 0.5})
    perturb(net, 0.02, seed=4)
    combined = {n: 0.5 * f1[n] + f2[n] for n in f1}
    expected = hand_penalty(net, 1.0, [(combined, a2)]).item()
    assert method.penalty_value(net).item() == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(hand_penalty(net, 1.0, [(f2, a2)]).item(), rel=1e-3)  # task 1 counts


def test_mas_accumulates_importances_of_every_task():
    method, net, (o1, a1), (o2, a2) = _two_tasks("mas", {"importance_batches": 3, "lambda": 2.0})
    perturb(net, 0.02, seed=4)
    combined = {n: o1[n] + o2[n] for n in o1}
    expected = hand_penalty(net, 2.0, [(combined, a2)]).item()
    assert method.penalty_value(net).item() == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(hand_penalty(net, 2.0, [(o2, a2)]).item(), rel=1e-3)


# ---- Riemannian Walk --------------------------------------------------------------------------------------------
def _hand_step(method, trainer, grads, moves):
    """Set the gradients by hand, then move the parameters by hand, through the RW hooks."""
    for p, g in zip(trainer.network.parameters(), grads):
        p.grad = g.clone()
    method.after_backward(trainer)
    with torch.no_grad():
        for p, d in zip(trainer.network.parameters(), moves):
            p.add_(d)
    method.after_step(trainer)


def test_rw_path_integral_rewards_descent_and_penalises_ascent():
    """Chaudhry et al.'s score accumulates the loss decrease a parameter caused, -g * dtheta / (F dtheta^2 / 2 + eps):
    a step down the gradient adds a positive amount, a step up it a negative one, exactly that value."""
    method = create_method("rw", {"update_interval": 1, "alpha": 1.0})  # F = g^2 of this very step
    trainer = trainer_for(tiny_net(), [])
    method.before_stage(trainer, trainer.stage_state.stage)
    named = list(trainer.network.named_parameters())
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen) for _, p in named]
    start = [p.detach().clone() for _, p in named]
    _hand_step(method, trainer, grads, [-0.01 * g for g in grads])  # descent
    for (n, p), g, p0 in zip(named, grads, start):
        d = p.detach() - p0  # the step as float32 made it (near eps the score is sensitive to its last bits)
        torch.testing.assert_close(method.path[n], -g * d / (0.5 * g * g * d * d + 1e-8), rtol=1e-4, atol=1e-6)
        assert bool((method.path[n][g != 0] > 0).all()), n
    before = {n: t.clone() for n, t in method.path.items()}
    _hand_step(method, trainer, grads, [0.01 * g for g in grads])  # ascent: the same amount taken back
    assert all(bool((method.path[n] < before[n])[g != 0].all()) for (n, _), g in zip(named, grads))


def test_rw_online_fisher_follows_the_moving_average():
    method = create_method("rw", {"alpha": 0.7, "update_interval": 1})
    trainer = trainer_for(tiny_net(), [])
    method.before_stage(trainer, trainer.stage_state.stage)
    params = list(trainer.network.parameters())
    gen = torch.Generator().manual_seed(5)
    seq = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
    for grads in seq:
        _hand_step(method, trainer, grads, [torch.zeros_like(p) for p in params])
    names = [n for n, _ in trainer.network.named_parameters()]
    for i, n in enumerate(names):
        f = torch.zeros_like(params[i])
        for grads in seq:
            f = 0.7 * grads[i] ** 2 + 0.3 * f
        torch.testing.assert_close(method.fisher[n], f, rtol=1e-5, atol=1e-8)
    # with update_interval 2, only every second step updates the Fisher
    method2 = create_method("rw", {"alpha": 0.7, "update_interval": 2})
    method2.before_stage(trainer, trainer.stage_state.stage)
    for grads in seq:
        _hand_step(method2, trainer, grads, [torch.zeros_like(p) for p in params])
    # elementwise float32 (alpha * g^2 + (1 - alpha) * F): a kernel with or without FMA differs by an ulp or two
    torch.testing.assert_close(method2.fisher[names[0]], 0.7 * seq[1][0] ** 2, rtol=1e-5, atol=1e-8)


def test_rw_fisher_uses_task_gradient_without_the_penalty():
    method = create_method("rw", {"alpha": 1.0, "update_interval": 1, "lambda": 5.0})
    trainer = trainer_for(tiny_net(), make_batches(2, 10))
    finish_task(method, trainer)
    method.before_stage(trainer, Stage(2, ("task2",)))
    perturb(trainer.network)
    net = trainer.network
    net.zero_grad(set_to_none=True)
    method.loss_terms(trainer, None, None, None)["rw"].backward()  # gradient of the penalty alone
    pen_grads = [p.grad.clone() for p in net.parameters()]
    gen = torch.Generator().manual_seed(6)
    task = [torch.randn(p.shape, generator=gen) for p in net.parameters()]
    _hand_step(method, trainer, [t + g for t, g in zip(task, pen_grads)], [torch.zeros_like(t) for t in task])
    for (n, _), t in zip(net.named_parameters(), task):
        torch.testing.assert_close(method.fisher[n], t ** 2, rtol=1e-4, atol=1e-6)


def test_rw_path_integral_is_nonnegative_normalised_and_zero_where_nothing_moved():
    method = create_method("rw", {"update_interval": 1})
    trainer = trainer_for(tiny_net(), [])
    method.before_stage(trainer, trainer.stage_state.stage)
    named = list(trainer.network.named_parameters())
    frozen = "decoder.seg_layers.0.bias"
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for _, p in named]
        # descend on most entries, but ascend on some, so the raw path integral has both signs
        moves = [(-0.01 * g if step % 2 == 0 else 0.01 * g * (torch.rand(g.shape, generator=gen) < 0.5))
                 for g in grads]
        moves = [torch.zeros_like(m) if n == frozen else m for (n, _), m in zip(named, moves)]
        _hand_step(method, trainer, grads, moves)
    assert any(bool((t < 0).any()) for t in method.path.values())  # raw score had negative entries
    assert bool((method.path[frozen] == 0).all())
    method.after_stage(trainer, trainer.stage_state.stage)
    score = method.score
    assert all(bool((s >= 0).all()) for s in score.values())
    assert max(float(s.max()) for s in score.values()) == pytest.approx(1.0)
    assert bool((score[frozen] == 0).all())
    assert all(float(t.abs().max()) == 0 for t in method.path.values())  # reset for the next task
    fisher_top = max(float(f.max()) for f in method.fisher.values())
    for n, _ in named:  # importance = F / max F + s
        # elementwise float32, one division and one addition: an ulp or two, whatever the kernel
        torch.testing.assert_close(method.quadratic.weight[n], method.fisher[n] / fisher_top + score[n], rtol=1e-5,
                                   atol=1e-8)


def test_rw_score_averages_the_tasks():
    method = create_method("rw", {"update_interval": 1})
    trainer = trainer_for(tiny_net(), make_batches(2, 10))
    finish_task(method, trainer, steps=3, seed=0)
    s1 = {n: t.clone() for n, t in method.score.items()}
    trainer2 = trainer_for(trainer.network, make_batches(2, 30), 2)
    method.before_stage(trainer2, trainer2.stage_state.stage)
    train_steps(method, trainer2, 3, seed=8)
    raw = {n: t.clamp(min=0) for n, t in method.path.items()}
    top = max(float(t.max()) for t in raw.values())
    method.after_stage(trainer2, trainer2.stage_state.stage)
    for n in s1:
        torch.testing.assert_close(method.score[n], 0.5 * (s1[n] + raw[n] / top), rtol=1e-5, atol=1e-8)  # as above


# ---- class scenario: the segmentation head grows ----------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_a_grown_head_keeps_old_importances_and_leaves_new_channels_unpenalised(name):
    """Task 2 adds two structures: the head grows from 3 to 5 channels (new ones appended, `resize_output`). The
    penalty must bind to the grown network (it crashed on the shape mismatch), keep the old channels' importance and
    anchors, and put none on the new channels; the next task's importance covers the grown head."""
    from lifelong_nnunet.networks.output_head import resize_output
    method = create_method(name, {**FAST[name], "lambda": 2.0})
    trainer = trainer_for(tiny_net(), make_batches(4, 10))
    finish_task(method, trainer, seed=0)
    old = {n: (method.quadratic.weight[n].clone(), method.quadratic.anchor[n].clone()) for n in method.quadratic.weight}

    grown_net = resize_output(trainer.network, 5)
    perturb(grown_net, 0.02, seed=3)
    t2 = trainer_for(grown_net, make_batches(4, 30, classes=5), 2)
    method.before_stage(t2, t2.stage_state.stage)
    heads = [n for n, p in grown_net.named_parameters() if p.shape != old[n][0].shape]
    assert heads and all(n.startswith("decoder.seg_layers") for n in heads)
    total = torch.zeros((), dtype=torch.float64)  # by hand: the old channels only
    for n, p in grown_net.named_parameters():
        w, a = old[n]
        rows = p.detach()[tuple(slice(0, k) for k in w.shape)]
        total += (w.double() * (rows.double() - a.double()) ** 2).sum()
    value = method.penalty_value(grown_net)
    assert value.item() == pytest.approx(method.coefficient() * total.item() + method.coefficient()
                                         * method.quadratic.const, rel=1e-5)
    grads = dict(zip([n for n, _ in grown_net.named_parameters()],
                     torch.autograd.grad(value, list(grown_net.parameters()), allow_unused=True)))
    for n in heads:
        assert bool((grads[n][3:] == 0).all()), f"{n}: a new channel is penalised"  # weight 0: exactly 0
        if float(old[n][0].abs().max()) > 0:  # (MAS puts none on the low-resolution head, which its objective skips)
            assert float(grads[n][:3].abs().max()) > 0, f"{n}: the old channels lost their importance"

    train_steps(method, t2, 3, seed=9, classes=5)  # rw tracks the grown head step by step
    method.after_stage(t2, t2.stage_state.stage)
    for n, p in grown_net.named_parameters():
        assert method.quadratic.weight[n].shape == p.shape and bool(torch.isfinite(method.quadratic.weight[n]).all())
    assert any(float(method.quadratic.weight[n][3:].abs().max()) > 0 for n in heads)  # task 2 learned them
    method.before_stage(t2, Stage(3, ("task3",)))
    assert method.penalty_value(grown_net).item() >= 0


def test_a_stored_tensor_only_grows():
    from lifelong_nnunet.methods.importance import grown
    stored = torch.arange(6.0).reshape(3, 2)
    out = grown(stored, torch.empty(5, 2))
    assert torch.equal(out[:3], stored) and bool((out[3:] == 0).all())
    assert grown(stored, torch.empty(3, 2)) is stored
    with pytest.raises(ValueError, match="cannot grow"):
        grown(stored, torch.empty(2, 2))


# ---- resume -----------------------------------------------------------------------------------------------------
def _after_two_tasks(name):
    method = create_method(name, {**FAST[name], "lambda": 2.0})
    trainer = trainer_for(tiny_net(), make_batches(4, 10))
    finish_task(method, trainer, seed=0)
    t2 = trainer_for(trainer.network, make_batches(4, 30), 2)
    finish_task(method, t2, seed=9)
    method.before_stage(t2, Stage(3, ("task3",)))
    train_steps(method, t2, 2, seed=11)  # mid-stage: RW carries a running Fisher and path integral
    perturb(trainer.network, 0.02, seed=12)
    return method, t2


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_resume_gives_same_penalty(name):
    method, trainer = _after_two_tasks(name)
    fresh = create_method(name, {**FAST[name], "lambda": 2.0})
    fresh.load_state_dict(method.state_dict())
    fresh.before_stage(trainer, Stage(3, ("task3",)))
    assert fresh.penalty_value(trainer.network).item() == method.penalty_value(trainer.network).item() > 0
    if name == "rw":
        assert fresh.step == method.step
        for n in method.fisher:
            assert torch.equal(fresh.fisher[n], method.fisher[n]) and torch.equal(fresh.path[n], method.path[n])


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_survives_weights_only_load(name):
    method, trainer = _after_two_tasks(name)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = create_method(name, {**FAST[name], "lambda": 2.0})
    fresh.load_state_dict(state)  # a resumed stage: loaded after before_stage, rebinds lazily
    value = fresh.penalty_value(trainer.network)
    assert value.item() == pytest.approx(method.penalty_value(trainer.network).item(), rel=1e-6)
    assert value.requires_grad  # computed on the live parameters
    assert fresh.tasks_seen == 2
