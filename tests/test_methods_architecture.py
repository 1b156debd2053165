"""Multi-head and frozen-body methods on a tiny real nnU-Net PlainConvUNet (no planning, no data, CPU, seconds)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from fakes import FakeTrainer
from lifelong_nnunet.methods import Stage, available_methods, create_method
from lifelong_nnunet.methods.multihead import selection_accuracy
from lifelong_nnunet.networks import (
    AutoHeadNetwork,
    MultiHeadNetwork,
    head_key,
    mean_entropy,
)

T1, T2, T3 = "Dataset901_SiteA", "Dataset902_SiteB", "Dataset903_Site.C"
SPLITS = ["seg_layers", "decoder"]


def build(deep_supervision: bool = True, seed: int = 0) -> PlainConvUNet:
    torch.manual_seed(seed)
    return PlainConvUNet(input_channels=1, n_stages=2, features_per_stage=[4, 8], conv_op=torch.nn.Conv3d,
                         kernel_sizes=3, strides=[1, 2], n_conv_per_stage=1, num_classes=3,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=deep_supervision)


def inputs(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is ~100x faster than fighting other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nnunet_optimizer(network):
    """As nnUNetTrainer.configure_optimizers: SGD over all parameters, Nesterov momentum 0.99, weight decay."""
    return torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)


def train_steps(network, steps: int = 3, seed: int = 2) -> None:
    """nnU-Net-like steps: zero_grad(set_to_none), deep-supervision loss, backward, clip 12, SGD step."""
    opt = nnunet_optimizer(network)
    network.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 1, 8, 8, 8, generator=g)
        opt.zero_grad(set_to_none=True)
        out = network(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(torch.nn.functional.cross_entropy(o, torch.randint(0, 3, (o.shape[0], *o.shape[2:]), generator=g))
                   for o in outs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        opt.step()


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stage_network(method, network, before, stage):
    """What StageContext.train does around the weights: adapt to the tasks before, load, adapt with the stage's."""
    net = method.adapt_network(network, before)
    net = method.adapt_network(net, [*before, *stage.train_tasks])
    trainer = FakeTrainer(net)
    method.before_stage(trainer, stage)
    return trainer.network


def three_stage_run(method_name: str, split: str):
    """Three stages of the runner's sequence on one network; returns method, network and each head after its stage."""
    method = create_method(method_name, {"split": split})
    net, done, heads = build(), [], {}
    for i, task in enumerate([T1, T2, T3], start=1):
        net = stage_network(method, net, done, Stage(i, (task,)))
        train_steps(net, seed=10 + i)
        heads[task] = snapshot(net.head(task))
        done.append(task)
    return method, net, heads


def test_methods_are_discovered():
    assert {"multihead", "frozen_body", "rehearsal"} <= set(available_methods())


def test_head_keys_have_no_dots():
    assert "." not in head_key(T3)
    assert head_key("keys") != "keys"  # would clash with ModuleDict.keys
    net = MultiHeadNetwork(build(), [T1, T3])
    assert all("." not in k for k in net.heads)


@pytest.mark.parametrize("split", SPLITS)
def test_training_one_head_leaves_the_other_heads_bitwise_unchanged(split):
    method = create_method("multihead", {"split": split})
    net = stage_network(method, build(), [T1, T2], Stage(3, (T3,)))
    train_steps(net, seed=5)  # makes the heads differ from each other
    trainer = FakeTrainer(net)
    method.before_stage(trainer, Stage(2, (T2,)))
    assert net.active == T2
    heads = {t: snapshot(net.head(t)) for t in net.tasks}
    body = snapshot(net.body)
    train_steps(net, seed=6)
    assert same(snapshot(net.head(T1)), heads[T1])
    assert same(snapshot(net.head(T3)), heads[T3])
    assert not same(snapshot(net.head(T2)), heads[T2])
    assert not same(snapshot(net.body), body)  # multihead trains the shared body too


@pytest.mark.parametrize("split", SPLITS)
def test_frozen_body_trains_only_the_new_head(split):
    method = create_method("frozen_body", {"split": split})
    net = stage_network(method, build(), [], Stage(1, (T1,)))
    body = snapshot(net.body)
    train_steps(net, seed=3)
    assert not same(snapshot(net.body), body), "stage 1 must train the body"
    net = stage_network(method, net, [T1], Stage(2, (T2,)))
    assert net.body_frozen
    body, head1, head2 = snapshot(net.body), snapshot(net.head(T1)), snapshot(net.head(T2))
    train_steps(net, steps=4, seed=4)  # optimizer over network.parameters(), frozen ones included
    assert same(snapshot(net.body), body)
    assert same(snapshot(net.head(T1)), head1)
    assert not same(snapshot(net.head(T2)), head2)
    assert all(p.grad is None for p in net.body.parameters())


def test_nnunet_instance_norm_keeps_no_running_statistics():
    """The frozen body's eval mode only matters for norms with running statistics; nnU-Net's InstanceNorm has none."""
    norms = [m for m in build().modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(not m.track_running_stats and m.running_mean is None for m in norms)
    net = MultiHeadNetwork(build(), [T1, T2], "decoder")
    net.freeze_body()
    net.train()
    assert not net.body.training and all(not m.training for m in net.body.modules())
    assert net.head(T2).training


@pytest.mark.parametrize("split", SPLITS)
def test_new_head_is_an_exact_copy_of_the_last(split):
    method = create_method("multihead", {"split": split})
    net = method.adapt_network(build(), [T1])
    train_steps(net, seed=7)
    grown = method.adapt_network(net, [T1, T2])
    assert grown is not net  # a new object, so the trainer rebuilds its optimizer
    assert net.tasks == [T1] and grown.tasks == [T1, T2]
    assert same(snapshot(grown.head(T2)), snapshot(grown.head(T1)))
    assert grown.head(T2) is not grown.head(T1)
    assert all(a is not b for a, b in zip(grown.head(T2).parameters(), grown.head(T1).parameters()))
    assert grown.head(T1) is net.head(T1) and grown.body is net.body  # shared, not copied


@pytest.mark.parametrize("split", SPLITS)
def test_adapt_network_is_idempotent_and_stage_weights_load_strictly(split):
    method = create_method("multihead", {"split": split})
    plain = build()
    assert method.adapt_network(plain, []) is plain  # stage 0 weights are a stock state dict
    net = method.adapt_network(plain, [T1])
    assert method.adapt_network(net, [T1]) is net
    assert method.adapt_network(net, [T1, T1]) is net
    net = stage_network(method, net, [T1], Stage(2, (T2,)))
    train_steps(net, seed=8)
    state = snapshot(net)
    rebuilt = method.adapt_network(build(seed=99), [T1, T2])
    rebuilt.load_state_dict(state, strict=True)
    # and the runner's order: adapt to the tasks before, load those weights strictly, then add the new head
    stage1 = method.adapt_network(build(seed=98), [T1])
    stage1.load_state_dict({k: v for k, v in state.items() if not k.startswith(f"heads.{head_key(T2)}.")})
    assert method.adapt_network(stage1, [T1, T2]).tasks == [T1, T2]
    x = inputs()
    net.eval(), rebuilt.eval()
    for task in (T1, T2):
        a = method.network_for_task(net, task)(x)
        b = method.network_for_task(rebuilt, task)(x)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("split", SPLITS)
def test_single_head_view_is_a_stock_network(split):
    method = create_method("multihead", {"split": split})
    net = stage_network(method, build(), [T1], Stage(2, (T2,)))
    train_steps(net, seed=9)
    stock_keys = list(build().state_dict())
    x = inputs()
    for task in (T1, T2):
        view = net.single_head_view(task)
        assert type(view) is PlainConvUNet
        assert list(view.state_dict()) == stock_keys
        fresh = build(seed=50)
        fresh.load_state_dict(view.state_dict(), strict=True)
        fresh.eval(), view.eval()
        assert all(torch.equal(a, b) for a, b in zip(fresh(x), view(x)))
    assert set(build().state_dict()) == set(net.single_head_view(T1).state_dict())


@pytest.mark.parametrize("split", SPLITS)
def test_network_for_task_uses_that_tasks_head(split):
    method = create_method("multihead", {"split": split})
    net = stage_network(method, build(), [T1], Stage(2, (T2,)))
    net.set_active(T1)
    train_steps(net, seed=11)  # diverge the heads: head 1 moves, head 2 not
    net.set_active(T2)
    net.eval()
    x = inputs()
    explicit = {}
    for task in (T1, T2):
        stock = build(seed=60, deep_supervision=False)  # head `task` put explicitly into a stock network
        state = {k.removeprefix("body."): v for k, v in net.state_dict().items() if k.startswith("body.")}
        prefix = f"heads.{head_key(task)}."
        head = {k[len(prefix):]: v for k, v in net.state_dict().items() if k.startswith(prefix)}
        if split == "seg_layers":
            state.update({f"decoder.seg_layers.{k}": v for k, v in head.items()})
        else:
            state.update({f"decoder.{k}": v for k, v in head.items()})
            state.update({f"decoder.encoder.{k.removeprefix('encoder.')}": v for k, v in state.items()
                          if k.startswith("encoder.")})
        stock.load_state_dict(state, strict=True)
        explicit[task] = stock.eval()(x)
    for module in net.modules():  # the way ContinualTrainer.set_deep_supervision_enabled does it
        if hasattr(module, "deep_supervision"):
            module.deep_supervision = False
    for task in (T1, T2):
        assert torch.equal(method.network_for_task(net, task)(x), explicit[task])
    assert not torch.allclose(explicit[T1], explicit[T2])
    assert not torch.allclose(method.network_for_task(net, T1)(x), method.network_for_task(net, T2)(x))
    # a task not trained yet is segmented by the newest head; the wrapper's forward uses the active head
    assert torch.equal(method.network_for_task(net, "Dataset999_Unseen")(x), explicit[T2])
    net.set_active(T1)
    assert torch.equal(net(x), explicit[T1])
    assert isinstance(method.network_for_task(net, None), AutoHeadNetwork)


@pytest.mark.parametrize("split", SPLITS)
def test_deep_supervision_switch_reaches_the_heads(split):
    net = MultiHeadNetwork(build(deep_supervision=True), [T1, T2], split)
    out = net(inputs())
    assert isinstance(out, list) and len(out) == 1 and out[0].shape[2:] == (8, 8, 8)
    for module in net.modules():
        if hasattr(module, "deep_supervision"):
            module.deep_supervision = False
    assert torch.is_tensor(net(inputs())) and torch.is_tensor(net.single_head_view(T1)(inputs()))


def _confident_and_uncertain(split: str, confident: str):
    """Two heads on one body: ``confident``'s last segmentation layer says class 1 everywhere with a large margin,
    the other's gives uniform probabilities (zero weights and biases)."""
    net = MultiHeadNetwork(build(deep_supervision=False), [T1, T2], split)
    with torch.no_grad():
        for task in net.tasks:
            seg = net.head(task)[-1] if split == "seg_layers" else net.head(task).seg_layers[-1]
            seg.weight.zero_()
            seg.bias.zero_()
            if task == confident:
                seg.bias.copy_(torch.tensor([0.0, 8.0, 0.0]))
    return net.eval()


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("confident", [T1, T2])
def test_choose_task_picks_the_confident_head(split, confident):
    method = create_method("multihead", {"split": split})
    net = _confident_and_uncertain(split, confident)
    x = inputs(n=1)
    calls = []

    def segment_with(module):  # what predict passes: the class probabilities of one image, channels first
        calls.append(module)
        with torch.no_grad():
            return torch.softmax(module(x), 1)[0].numpy()

    assert method.choose_task(net, segment_with, [T1, T2]).task == confident
    assert len(calls) == 2 and all(type(m) is PlainConvUNet for m in calls)
    assert method.choose_task(net, segment_with, [confident]).task == confident  # one candidate: no prediction needed
    auto = method.network_for_task(net, None)
    with torch.no_grad():
        out = auto(x)
    assert auto.last_choice == confident
    assert torch.equal(out, method.network_for_task(net, confident)(x))


def test_mean_entropy_is_judged_on_the_common_foreground():
    certain_bg = np.zeros((3, 4, 4, 4), np.float32)
    certain_bg[0] = 1.0  # head A: all background, certain
    head_b = np.full((3, 4, 4, 4), 1 / 3, np.float32)
    head_b[:, 0, 0, 0] = [0.0, 1.0, 0.0]  # head B: one certain foreground voxel, uniform elsewhere
    a, b = mean_entropy([certain_bg, head_b])
    assert a == pytest.approx(0.0) and b == pytest.approx(0.0)  # judged only on B's foreground voxel
    uniform = np.full((3, 2, 2, 2), 1 / 3, np.float32)
    assert mean_entropy([uniform, uniform])[0] == pytest.approx(1.0)  # no foreground: whole image, normalised


def test_selection_accuracy():
    assert selection_accuracy([T1, T2, T2, T1], [T1, T2, T1, T1]) == 0.75
    with pytest.raises(ValueError):
        selection_accuracy([T1], [T1, T2])


def test_multihead_rejects_an_unknown_split():
    from lifelong_nnunet.errors import UserInputError
    with pytest.raises(UserInputError):
        create_method("multihead", {"split": "encoder"})


def test_full_three_stage_sequence_keeps_old_heads_for_frozen_body():
    method, net, heads = three_stage_run("frozen_body", "decoder")
    assert net.tasks == [T1, T2, T3] and net.active == T3
    assert all(same(snapshot(net.head(t)), heads[t]) for t in net.tasks)  # each head as its own stage left it
    fresh = method.adapt_network(build(deep_supervision=False, seed=3), [T1, T2, T3])
    fresh.load_state_dict(net.state_dict(), strict=True)
    for p in fresh.parameters():  # a fresh copy must not carry anything but weights
        assert p.requires_grad
    assert copy.deepcopy(net).tasks == net.tasks
