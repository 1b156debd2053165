"""The merge gate of frozen_encoder_decoders: a decoder whose task's images an image does not resemble (its stage's
description, `task_inference`) cannot claim that image's voxels. Constructed networks and images, no training."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lifelong_nnunet import task_inference as ti
from lifelong_nnunet.deploy import part_gate
from lifelong_nnunet.methods import Stage, create_method
from lifelong_nnunet.networks.encoder_decoders import EncoderDecoders
from lifelong_nnunet.labels import LabelSpace
from test_class_incremental import _task, _unet
from test_task_inference import SHAPE, site_image

A, B = "Dataset001_A", "Dataset002_B"


@pytest.fixture
def space() -> LabelSpace:
    return LabelSpace.from_tasks([_task(A, {"background": 0, "alpha": 1, "beta": 2}, 1),
                                  _task(B, {"background": 0, "gamma": 1, "delta": 2}, 2)], "class")


def _confident_b(space):
    """Tasks A and B merged, B's decoder claiming its first structure (gamma, global 3) everywhere with certainty."""
    method = create_method("frozen_encoder_decoders", {}, labels=space)
    net = method.adapt_network(_unet(3, deep_supervision=False), [A, B])
    seg = net.decoder(B).decoder.seg_layers[-1]
    with torch.no_grad():
        seg.weight.zero_()
        seg.bias.copy_(torch.tensor([-50.0, 50.0, -50.0]))
    return method, net.eval()


def _labels(net, x):
    with torch.no_grad():
        return net(x).argmax(1)


def test_a_gated_out_decoder_claims_no_voxel_and_the_rest_merge_as_without_it(space):
    method, net = _confident_b(space)
    x = torch.randn(1, 1, 16, 16, 16)
    assert (_labels(net, x) == 3).all()  # ungated, B's certain claim wins every voxel
    assert method.gate_parts(net, {A: True, B: False}) == [A]
    gated = net(x)
    assert not (gated.argmax(1) == 3).any()
    alone = EncoderDecoders(net.encoder, net.num_classes, net.min_confidence)
    alone.add(A, net.decoder(A))
    with torch.no_grad():
        assert torch.equal(gated, alone.eval()(x))  # exactly the merge without B's decoder


def test_an_image_that_fits_no_task_keeps_every_decoder_and_an_empty_fit_lifts_the_gate(space):
    method, net = _confident_b(space)
    x = torch.randn(1, 1, 16, 16, 16)
    assert method.gate_parts(net, {A: False, B: False}) == [A, B] and net.allowed is None
    assert (_labels(net, x) == 3).all()
    method.gate_parts(net, {A: True, B: False})
    assert method.gate_parts(net, {}) == [A, B] and (_labels(net, x) == 3).all()
    assert method.gate_parts(net, {A: True}) == [A, B]  # B has no description: never gated out


def test_gate_false_and_the_untrained_network_have_nothing_to_gate(space):
    off = create_method("frozen_encoder_decoders", {"gate": False}, labels=space)
    net = off.adapt_network(_unet(3, deep_supervision=False), [A, B])
    assert off.gate_parts(net, {A: True, B: False}) is None and net.allowed is None
    on = create_method("frozen_encoder_decoders", {}, labels=space)
    assert on.gate_parts(_unet(3), {A: True}) is None  # stage 0: nnU-Net's plain network, no decoders
    with pytest.raises(ValueError, match="allows none"):
        net.allowed = []
        net(torch.randn(1, 1, 16, 16, 16))


def test_each_image_keeps_the_decoders_of_the_site_it_comes_from(space):
    """Task A imaged like site A, task B like site B (inverted contrast): an A image gates B's decoder out and the
    other way round; an image like neither keeps both and is flagged. The record names the distances."""
    rng = np.random.default_rng(0)
    described = {s: ti.fit_description(s, [ti.image_features(site_image(rng, site)) for _ in range(10)])
                 for s, site in ((A, "A"), (B, "B"))}
    run = SimpleNamespace(read_schedule=lambda: [Stage(1, (A,)), Stage(2, (B,))],
                          read_task_descriptions=lambda stages: described if list(stages) == [1, 2] else {})
    method, net = _confident_b(space)
    gate = part_gate(run, method, net, [A, B])
    for site, kept, out in (("A", A, B), ("B", B, A)):
        for _ in range(5):
            record = gate(site_image(rng, site))
            assert (record["kept"], record["gated_out"], record["ood"]) == (kept, out, False)
            assert record[f"score_{kept}"] <= record[f"threshold_{kept}"] < record[f"score_{out}"]
            assert net.allowed == [kept]
    record = gate(rng.uniform(-3, 3, SHAPE).astype(np.float32))  # flat histogram, no tissue at all
    assert record["ood"] and record["kept"] == f"{A};{B}" and record["gated_out"] == "" and net.allowed is None


def test_methods_that_choose_one_head_or_do_not_describe_have_no_gate(space):
    run = SimpleNamespace(read_schedule=lambda: [], read_task_descriptions=lambda stages: {})
    net = _unet(3)
    assert part_gate(run, create_method("sequential", {}, labels=space), net, [A]) is None
    assert part_gate(run, create_method("multihead", {}), net, [A]) is None
