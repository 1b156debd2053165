"""The merge rule of per-task decoders and temperature scaling, on constructed overlaps with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from lifelong_nnunet.networks.merge import (
    FLOOR,
    calibrated_probabilities,
    fit_temperature,
    mean_nll,
    merge_decoders,
    merge_labels,
    merged_probabilities,
)


def dec(*voxels) -> torch.Tensor:
    """Logits [1, C, V] of a decoder whose probabilities (at T = 1) are the given per-voxel vectors."""
    return torch.tensor(voxels, dtype=torch.float64).log().T[None].float()


def fg(*probs) -> torch.Tensor:
    """A two-class decoder (background, one structure) with the given foreground probabilities per voxel."""
    return dec(*[(1 - p, p) for p in probs])


def both(outputs, maps, temps=None, num_classes=3, m=0.5):
    """merge_labels and the argmax of merge_decoders, checked to agree; returns the labels as a list."""
    temps = temps or [1.0] * len(outputs)
    labels = merge_labels(outputs, maps, temps, num_classes, m)
    scores = merge_decoders(outputs, maps, temps, num_classes, m)
    assert torch.equal(scores.argmax(1), labels)
    return labels[0].tolist()


A, B = [0, 1], [0, 2]   # decoder A's structure is global 1, decoder B's global 2


def test_basic_overlaps():
    labels = both([fg(0.9, 0.2, 0.7, 0.95, 0.45), fg(0.1, 0.8, 0.9, 0.6, 0.3)], [A, B])
    # (i) only A, (ii) only B, (iii) both claim: the more confident wins (twice), (iv) neither confident
    assert labels == [1, 2, 2, 1, 0]


def test_calibration_changes_the_winner():
    a, b = dec((0.5, 0.5)), dec((0.5, 0.5))
    a[0, :, 0] = torch.tensor([0.0, 3.0])      # raw p = 0.95
    b[0, :, 0] = torch.tensor([0.0, 2.0])      # raw p = 0.88
    assert both([a, b], [A, B]) == [1]
    assert both([a, b], [A, B], temps=[4.0, 0.5]) == [2]   # calibrated: A 0.68, B 0.98
    scores = merge_decoders([a, b], [A, B], [4.0, 0.5], 3).exp()[0, :, 0]
    # rel 1e-6 (~8 float32 ulps) against the exact value: scaled softmax, log and exp each round to about one ulp,
    # on any kernel (measured worst 4e-8 with ATen's default, AVX2 and AVX512 kernels)
    assert scores[2].item() == pytest.approx(1 / (1 + math.exp(-4.0)), rel=1e-6)
    assert scores[1].item() == pytest.approx(1 / (1 + math.exp(-0.75)), rel=1e-6)
    assert scores[0].item() == pytest.approx(0.5, rel=1e-6)


def test_threshold_applies_to_the_argmax_class():
    # argmax foreground but below the threshold: not claimed
    assert both([fg(0.55), fg(0.1)], [A, B], m=0.6) == [0]
    assert both([fg(0.65), fg(0.1)], [A, B], m=0.6) == [1]


def test_argmax_background_is_not_a_claim():
    # (v) p(c) = 0.35 passes the threshold 0.3, but the decoder's argmax is background: not claimed
    a = dec((0.40, 0.35, 0.25))
    assert both([a, fg(0.1)], [[0, 1, 2], B], m=0.3) == [0]
    # control: the same 0.35, now the argmax (first of the tied classes), is claimed
    assert both([dec((0.30, 0.35, 0.35)), fg(0.1)], [[0, 1, 2], B], m=0.3) == [1]


def test_reannotated_structure_takes_the_max_claim():
    # (vi) decoder A knows liver (global 1); decoder B re-annotates liver (global 1) and adds tumour (global 2)
    a = fg(0.9, 0.6, 0.3)
    b = dec((0.1, 0.3, 0.6), (0.1, 0.8, 0.1), (0.2, 0.7, 0.1))
    maps = [[0, 1], [0, 1, 2]]
    assert both([a, b], maps) == [1, 1, 1]
    scores = merge_decoders([a, b], maps, [1.0, 1.0], 3).exp()[0]
    assert scores[1].tolist() == pytest.approx([0.9, 0.8, 0.7], rel=1e-6)
    assert scores[2, 0].item() == pytest.approx(0.6, rel=1e-6)


def test_tie_goes_to_the_earlier_decoder():
    # (vii) equal claims with different global IDs; a plain argmax would pick the lower ID (1) both times
    assert both([fg(0.8), fg(0.8)], [[0, 2], [0, 1]]) == [2]
    assert both([fg(0.8), fg(0.8)], [[0, 1], [0, 2]]) == [1]
    _, decoder = merge_labels([fg(0.8, 0.3), fg(0.8, 0.2)], [[0, 2], [0, 1]], [1, 1], 3, return_decoder=True)
    assert decoder[0].tolist() == [0, -1]


def test_claim_exactly_at_threshold_and_capped_non_claims():
    assert both([fg(0.5 + 1e-3), fg(0.1)], [A, B], m=0.5 + 1e-3) == [1]     # p == m claims (>=)
    # a non-argmax class above m (capped to m) ties with the background threshold: background must win
    assert both([dec((0.5, 0.45, 0.05)), fg(0.1)], [[0, 1, 2], B], m=0.3) == [0]


def _reference(probs, maps, m, num_classes):
    """The rule and the score formula, voxel by voxel in plain Python, for comparison: (labels, scores S [G, V])."""
    labels, scores = [], []
    for v in range(probs[0].shape[-1]):
        best, label, score = -1.0, 0, [0.0] * num_classes
        for p, cmap in zip(probs, maps):
            col = p[0, :, v].tolist()
            c = col.index(max(col))
            claims = c > 0 and col[c] >= m
            if claims and col[c] > best:
                best, label = col[c], cmap[c]
            for j in range(1, len(col)):
                s = col[j] if (claims and j == c) else min(col[j], m)
                score[cmap[j]] = max(score[cmap[j]], s)
        score[0] = m
        labels.append(label)
        scores.append(score)
    return labels, torch.tensor(scores, dtype=torch.float64).T


@pytest.mark.parametrize("m", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_random_overlaps_match_the_rule(m):
    gen = torch.Generator().manual_seed(1)
    maps = [[0, 1], [0, 2, 3], [0, 1, 4, 2]]          # global 1 and 2 are claimed through two decoders
    # coarse logits: many exact ties between classes and between decoders
    outputs = [torch.randint(-2, 3, (1, len(c), 4000), generator=gen).float() for c in maps]
    temps = [1.0, 1.0, 1.0] if m in (0.0, 0.3) else [0.7, 1.0, 1.6]
    labels = merge_labels(outputs, maps, temps, 5, m)
    probs = [calibrated_probabilities(z, t) for z, t in zip(outputs, temps)]
    ref_labels, ref_scores = _reference(probs, maps, m, 5)
    assert labels[0].tolist() == ref_labels
    scores = merge_decoders(outputs, maps, temps, 5, m)
    assert torch.equal(scores.argmax(1), labels)
    # the formula, up to the one-float nudges that settle exact ties (a float32 step near log(FLOOR) is 1e-6)
    assert torch.allclose(scores[0].double(), ref_scores.clamp_min(FLOOR).log(), rtol=0, atol=3e-6)
    assert 0 < int((labels > 0).sum()) < labels.numel() or m == 1.0


def test_scores_are_bounded_and_exported_probabilities_normalise():
    gen = torch.Generator().manual_seed(2)
    outputs = [torch.randn(2, 3, 5, 6, 7, generator=gen) * 8, torch.randn(2, 2, 5, 6, 7, generator=gen) * 8]
    scores = merge_decoders(outputs, [[0, 1, 2], [0, 3]], [1.0, 2.0], 4)
    assert scores.shape == (2, 4, 5, 6, 7) and scores.dtype == torch.float32
    assert bool((scores <= 0).all()) and bool((scores >= math.log(FLOOR) - 1e-4).all())
    # nnU-Net accumulates Gaussian-weighted (max 10) outputs of overlapping tiles in float16 and aborts on inf
    assert bool(torch.isfinite((scores * 10 * 8).half()).all())
    probs = merged_probabilities(outputs, [[0, 1, 2], [0, 3]], [1.0, 2.0], 4)
    # a float32 sum of 4 probabilities: a few ulps (1e-7) from 1; an unnormalised export is off by far more than 1e-5
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 5, 6, 7), rtol=0, atol=1e-5)
    assert torch.equal(probs.argmax(1), merge_labels(outputs, [[0, 1, 2], [0, 3]], [1.0, 2.0], 4))


def test_averaging_identical_tiles_keeps_the_labels():
    gen = torch.Generator().manual_seed(3)
    outputs = [torch.randn(1, 3, 4000, generator=gen) * 3, torch.randn(1, 2, 4000, generator=gen) * 3]
    maps, temps = [[0, 1, 2], [0, 2]], [1.3, 0.8]
    scores = merge_decoders(outputs, maps, temps, 3)
    weights = [0.3, 10.0, 2.5, 7.1]                  # Gaussian importance weights of four overlapping tiles
    averaged = sum(w * scores for w in weights) / sum(weights)
    assert torch.equal(averaged.argmax(1), merge_labels(outputs, maps, temps, 3))


def test_averaging_disagreeing_tiles_is_a_geometric_mean():
    tile1 = merge_decoders([fg(0.9, 0.55), fg(0.1, 0.1)], [A, B], [1, 1], 3)
    tile2 = merge_decoders([fg(0.45, 0.2), fg(0.1, 0.1)], [A, B], [1, 1], 3)
    averaged = (tile1 + tile2) / 2
    # voxel 0: sqrt(0.9 * 0.45) = 0.64 >= 0.5 stays decoder A's; voxel 1: sqrt(0.55 * 0.2) = 0.33 -> background
    assert averaged.argmax(1)[0].tolist() == [1, 0]
    # the background channel is the threshold m: with m = 0.7, sqrt(0.9 * 0.6) = 0.73 stays, sqrt(0.75 * 0.6) = 0.67
    # does not (0.6 is unclaimed in tile 2)
    tile1 = merge_decoders([fg(0.9, 0.75), fg(0.1, 0.1)], [A, B], [1, 1], 3, min_confidence=0.7)
    tile2 = merge_decoders([fg(0.6, 0.6), fg(0.1, 0.1)], [A, B], [1, 1], 3, min_confidence=0.7)
    assert ((tile1 + tile2) / 2).argmax(1)[0].tolist() == [1, 0]


def test_no_grad_float16_and_grad_inputs():
    gen = torch.Generator().manual_seed(4)
    outputs = [torch.randn(1, 3, 500, generator=gen) * 4, torch.randn(1, 2, 500, generator=gen) * 4]
    maps, temps = [[0, 1, 2], [0, 2]], [1.0, 0.5]
    half = [z.half() for z in outputs]
    with torch.no_grad():
        scores = merge_decoders(half, maps, temps, 3)
        labels = merge_labels(half, maps, temps, 3)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, merge_decoders([z.float() for z in half], maps, temps, 3))
    assert torch.equal(scores.argmax(1), labels)
    leaf = [z.clone().requires_grad_(True) for z in outputs]
    assert not merge_decoders(leaf, maps, temps, 3).requires_grad


@pytest.mark.parametrize("bad", [
    {"maps": [[0, 1, 2], [0, 2]]},          # class map longer than the decoder's channels
    {"maps": [[1, 0], [0, 2]]},             # background not sent to 0
    {"maps": [[0, 3], [0, 2]]},             # global ID outside 0..num_classes-1
    {"maps": [[0, 0], [0, 2]]},             # a structure sent to background
    {"temps": [1.0, 0.0]},
    {"m": 1.5},
])
def test_invalid_arguments(bad):
    outputs = [fg(0.9), fg(0.1)]
    with pytest.raises(ValueError):
        merge_decoders(outputs, bad.get("maps", [A, B]), bad.get("temps", [1.0, 1.0]), 3, bad.get("m", 0.5))
    with pytest.raises(ValueError):
        merge_decoders([fg(0.9), fg(0.1, 0.2)], [A, B], [1.0, 1.0], 3)       # spatial shapes differ


# ---- temperature scaling -------------------------------------------------------------------------------------
def sampled(t_true: float, n: int = 60_000, classes: int = 4, seed: int = 0):
    """Random logits [2, C, n/2] and labels drawn from softmax(z / t_true): t_true is the calibrating temperature."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, classes, n // 2, generator=gen) * 3
    p = torch.softmax(z / t_true, 1).permute(0, 2, 1).reshape(-1, classes)
    y = torch.multinomial(p, 1, generator=gen).view(2, n // 2)
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(t_true):
    z, y = sampled(t_true)
    t = fit_temperature(z, y)
    assert abs(t - t_true) / t_true < 0.1
    assert mean_nll(z, y, t) < mean_nll(z, y, 1.0) - 0.01
    assert fit_temperature(z, y[:, None]) == t                   # [N, 1, ...] targets
    assert fit_temperature(z.half(), y) == pytest.approx(t, rel=0.01)


def test_fit_temperature_ignore_index_and_subsampling():
    z, y = sampled(2.0)
    garbage = y.clone()
    garbage[:, ::3] = 255
    kept = torch.ones_like(y, dtype=torch.bool)
    kept[:, ::3] = False
    t = fit_temperature(z, garbage, ignore_index=255)
    assert t == pytest.approx(fit_temperature(z.permute(0, 2, 1)[kept][None].permute(0, 2, 1), y[kept][None]),
                              rel=1e-6)
    with pytest.raises(ValueError):
        fit_temperature(z, garbage)                              # 255 is no class without ignore_index
    assert fit_temperature(z, torch.full_like(y, 255), ignore_index=255) == 1.0
    small = fit_temperature(z, y, max_voxels=20_000)
    assert small == fit_temperature(z, y, max_voxels=20_000)    # fixed seed: deterministic
    assert small != fit_temperature(z, y) and abs(small - 2.0) / 2.0 < 0.15


def test_fit_temperature_bounds_and_degenerate_inputs():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 3, 3000, generator=gen)
    y_right = z.argmax(1)
    assert fit_temperature(z * 5, y_right) == 0.05              # always right: sharpen to the lower bound
    y_random = torch.randint(0, 3, (1, 3000), generator=gen)
    assert fit_temperature(z, y_random, bounds=(0.1, 3.0)) == 3.0   # labels unrelated to logits: flatten
    assert fit_temperature(torch.zeros(1, 3, 100), torch.zeros(1, 100, dtype=torch.long)) == 1.0
    with pytest.raises(ValueError):
        fit_temperature(z, y_right[:, :10])
