"""Merging the outputs of several per-task decoders into one label map (class-incremental, one decoder per task).

Decoder ``k`` outputs logits ``z_k`` over its own classes ``0..C_k-1`` (0 = background); task-local class ``c`` is the
global label ``class_maps[k][c]`` (``class_maps[k][0] == 0``). Several decoders may claim the same voxel, and two
decoders may map a class to the same global ID (a structure re-annotated by a later task).

**The rule** (`merge_labels`), per voxel, with ``m = min_confidence``:

1. calibrated probabilities ``p_k = softmax(z_k / T_k)`` (``T_k`` from `fit_temperature` on task k's validation
   voxels), so that the decoders' confidences are comparable;
2. decoder ``k`` *claims* its class ``c_k = argmax_c p_k(c)`` (first index on ties, so background wins a tie) when
   ``c_k != 0`` and ``p_k(c_k) >= m``. A decoder's background is evidence against its own structures only, never
   against another task's, so it is never compared across decoders;
3. the label is ``class_maps[k*][c_k*]`` for the claim with the highest ``p_k(c_k)``; among equal claims the earlier
   decoder (lower ``k``) wins; a voxel nobody claims is background 0 ("anomaly-aware": background unless some decoder
   is confident about one of its own structures).

A global ID reached through two decoders therefore gets the larger of their claims. For ``m >= 0.5`` the argmax
condition is implied by the threshold (``p_k(c) >= 0.5`` makes ``c`` the argmax unless it ties with another class),
so the rule is then simply "the most confident foreground, if at least ``m``".

**The scores** (`merge_decoders`) are per-voxel log-scores ``L = log max(S, floor)`` in the global label space, with

    s_k(c) = p_k(c)              if decoder k claims c here
             min(p_k(c), m)      otherwise            (a non-claim never reaches the threshold)
    S[g]   = max over (k, c) with class_maps[k][c] == g, c != 0, of s_k(c)     (0 if none)
    S[0]   = max(m, floor)                                                       (the threshold itself)

Every claim is ``>= m`` and every non-claim ``<= m``, so ``argmax_g S`` is the rule's label; the only equalities (a
claim at exactly ``m``, a non-claim capped at ``m``, two equal claims with different global IDs) are resolved
explicitly: every channel that is not the rule's winner but scores at least as much as the winner is lowered to the
next float below it. So ``argmax(merge_decoders(...), 1) == merge_labels(...)`` exactly.

Why log-scores: nnU-Net's sliding-window predictor averages the network's outputs over overlapping tiles and
mirrorings (Gaussian-weighted, accumulated in float16; it aborts on inf), then applies softmax and argmax. Log-scores
are bounded in ``[log floor, 0]`` (finite and float16-safe), averaging them is a weighted geometric mean of the
scores, and softmax turns them back into ``S / sum(S)`` (raw scores in [0, 1] used as logits would give an almost
flat softmax, and ``log 0`` would be -inf). Averaging is per channel, so after it a voxel is labelled ``g`` when the
geometric mean of its scores on ``g`` beats the threshold ``m`` and every other channel. Non-claims keep their (capped)
probability instead of 0 so that a voxel claimed at 0.9 in one tile and at 0.45 (unclaimed) in another is judged on
``sqrt(0.9 * 0.45) = 0.64 >= m`` rather than wiped out by a floor. The exported "probabilities"
``softmax(L) = S / sum(S)`` are normalised evidence scores, not calibrated probabilities: ``S[g] / S[0]`` is the best
claim on ``g`` relative to the threshold.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOOR = 1e-6                  # smallest score: log(FLOOR) = -13.8 keeps averaged float16 outputs finite
TEMPERATURE_RANGE = (0.05, 20.0)
MAX_VOXELS = 2_000_000        # fit_temperature subsamples above this (fixed seed)
_CHUNK = 1 << 18


# ---- temperature scaling -------------------------------------------------------------------------------------
def _nll_slope(z: torch.Tensor, y: torch.Tensor, beta: float) -> float:
    """d/d(beta) of the mean cross-entropy of softmax(beta * z): mean(E_p[z] - z_y), in chunks to bound memory."""
    total = 0.0
    for start in range(0, z.shape[0], _CHUNK):
        zc, yc = z[start:start + _CHUNK], y[start:start + _CHUNK]
        p = torch.softmax(zc * beta, dim=1)
        total += float(((p * zc).sum(1) - zc.gather(1, yc[:, None])[:, 0]).sum())
    return total / z.shape[0]


def mean_nll(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / T) against class indices (logits [N, C, ...], target [N, ...] or
    [N, 1, ...]); float64 on CPU. A small helper for checking a fitted temperature."""
    z, y = _flatten(logits, target, None, None, 0)
    if z.shape[0] == 0:
        return float("nan")
    return float(torch.nn.functional.cross_entropy(z / temperature, y))


def _flatten(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None, max_voxels: int | None,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Usable voxels as (K, C) float64 logits and (K,) labels on CPU, at most ``max_voxels`` of them (drawn without
    replacement with a fixed seed), without copying the whole logits tensor."""
    logits, target = logits.detach(), target.detach()
    if logits.ndim < 2:
        raise ValueError(f"logits must be [N, C, ...], got shape {tuple(logits.shape)}")
    n, c = logits.shape[:2]
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"target must be [N, ...] or [N, 1, ...], got {tuple(target.shape)} for logits "
                             f"{tuple(logits.shape)}")
        target = target[:, 0]
    if tuple(target.shape) != (n, *logits.shape[2:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    z3 = logits.reshape(n, c, -1)
    spatial = z3.shape[2]
    y = target.reshape(-1)
    if y.is_floating_point():
        y = y.round()
    y = y.long()
    idx = (y != ignore_index).nonzero()[:, 0] if ignore_index is not None else torch.arange(y.numel(),
                                                                                             device=y.device)
    if max_voxels is not None and idx.numel() > max_voxels:
        pick = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:max_voxels]
        idx = idx[pick.sort().values.to(idx.device)]
    z = z3[idx // spatial, :, idx % spatial].to("cpu", torch.float64)
    y = y[idx].cpu()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"target holds labels outside 0..{c - 1} (set ignore_index for an ignore label)")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits hold non-finite values")
    return z, y


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None,
                    max_iter: int = 60, max_voxels: int = MAX_VOXELS, seed: int = 0,
                    bounds: tuple[float, float] = TEMPERATURE_RANGE) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T`` in ``bounds`` minimising the mean cross-entropy of
    ``softmax(logits / T)`` on validation voxels (logits [N, C, ...], target [N, ...] or [N, 1, ...] class indices).

    The mean cross-entropy is convex in ``beta = 1/T`` (log-sum-exp of a linear function minus a linear one), so its
    slope is monotone and a bisection on ``log beta`` finds the unique minimiser deterministically (``max_iter``
    halvings; no step size to tune, unlike LBFGS). Runs in float64 on CPU on at most ``max_voxels`` voxels (drawn with
    ``seed``), in chunks. Returns 1.0 when no voxel is usable or the logits carry no information (equal across
    classes everywhere); a boundary value when the optimum lies outside ``bounds``.
    """
    t_min, t_max = bounds
    if not 0 < t_min < t_max:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    z, y = _flatten(logits, target, ignore_index, max_voxels, seed)
    if z.shape[0] == 0 or z.shape[1] < 2 or bool((z.amax(1) == z.amin(1)).all()):
        return 1.0
    lo, hi = math.log(1.0 / t_max), math.log(1.0 / t_min)       # bracket on u = log(beta)
    if _nll_slope(z, y, math.exp(lo)) >= 0:
        return float(t_max)
    if _nll_slope(z, y, math.exp(hi)) <= 0:
        return float(t_min)
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if _nll_slope(z, y, math.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-10:
            break
    return float(min(max(math.exp(-0.5 * (lo + hi)), t_min), t_max))


# ---- merging -------------------------------------------------------------------------------------------------
def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over dim 1, in float32 (float64 inputs stay float64; float16/bfloat16 are upcast)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits.detach().to(dtype) / float(temperature), dim=1)


def _probabilities(logits_per_decoder, temperatures) -> list[torch.Tensor]:
    """Each decoder's calibrated probabilities, all in one dtype (float64 if any output is float64, else float32)."""
    probs = [calibrated_probabilities(z, t) for z, t in zip(logits_per_decoder, temperatures)]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in probs) else torch.float32
    return [p.to(dtype) for p in probs]


def _check(logits_per_decoder, class_maps, temperatures, num_classes, min_confidence) -> None:
    if not len(logits_per_decoder) == len(class_maps) == len(temperatures) or not logits_per_decoder:
        raise ValueError(f"need one class map and one temperature per decoder, got {len(logits_per_decoder)} "
                         f"outputs, {len(class_maps)} class maps, {len(temperatures)} temperatures")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0, 1], got {min_confidence}")
    shape = logits_per_decoder[0].shape
    for k, (z, cmap, t) in enumerate(zip(logits_per_decoder, class_maps, temperatures)):
        if z.ndim < 2 or z.shape[:1] != shape[:1] or z.shape[2:] != shape[2:]:
            raise ValueError(f"decoder {k}: output shape {tuple(z.shape)} does not match {tuple(shape)} outside "
                             f"the channel dimension")
        if z.shape[1] != len(cmap) or len(cmap) < 2:
            raise ValueError(f"decoder {k}: {z.shape[1]} output channels but a class map of {len(cmap)} entries "
                             f"(need background plus at least one class)")
        if cmap[0] != 0 or any(not 0 < int(g) < num_classes for g in cmap[1:]):
            raise ValueError(f"decoder {k}: class map {list(cmap)} must send background to 0 and every other class "
                             f"to a global ID in 1..{num_classes - 1}")
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"decoder {k}: temperature must be a positive number, got {t}")


def _winner(probabilities: Sequence[torch.Tensor], class_maps, m: float):
    """The rule itself: (label, winning decoder or -1, winning claim's probability or 0), each [B, ...]."""
    first = probabilities[0]
    label = torch.zeros((first.shape[0], *first.shape[2:]), dtype=torch.long, device=first.device)
    decoder = torch.full_like(label, -1)
    best = torch.zeros(label.shape, dtype=first.dtype, device=first.device)
    for k, (p, cmap) in enumerate(zip(probabilities, class_maps)):
        cls = p.argmax(1)                                          # first index on ties: background first
        value = p.gather(1, cls[:, None])[:, 0]
        lut = torch.as_tensor([int(g) for g in cmap], dtype=torch.long, device=p.device)
        wins = (cls > 0) & (value >= m) & (value > best)          # strict: an equal later claim loses
        label = torch.where(wins, lut[cls], label)
        decoder = torch.where(wins, torch.full_like(decoder, k), decoder)
        best = torch.where(wins, value, best)
    return label, decoder, best


def merge_labels(logits_per_decoder: Sequence[torch.Tensor], class_maps: Sequence[Sequence[int]],
                 temperatures: Sequence[float], num_classes: int, min_confidence: float = 0.5,
                 return_decoder: bool = False):
    """The merged global label map [B, ...] (see the module docstring), computed directly from the rule; with
    ``return_decoder`` also the index of the winning decoder per voxel (-1 where no decoder claims)."""
    _check(logits_per_decoder, class_maps, temperatures, num_classes, min_confidence)
    with torch.no_grad():
        label, decoder, _ = _winner(_probabilities(logits_per_decoder, temperatures), class_maps, min_confidence)
    return (label, decoder) if return_decoder else label


def merge_decoders(logits_per_decoder: Sequence[torch.Tensor], class_maps: Sequence[Sequence[int]],
                   temperatures: Sequence[float], num_classes: int, min_confidence: float = 0.5,
                   floor: float = FLOOR) -> torch.Tensor:
    """Log-scores [B, num_classes, ...] whose argmax over dim 1 is the merged label (`merge_labels`) exactly, and
    which nnU-Net's sliding-window predictor can average like logits (see the module docstring for the formula and
    why). Values lie in ``[log floor, 0]``; float32 (float64 if any input is float64)."""
    _check(logits_per_decoder, class_maps, temperatures, num_classes, min_confidence)
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must lie in (0, 1), got {floor}")
    m = float(min_confidence)
    with torch.no_grad():
        probs = _probabilities(logits_per_decoder, temperatures)
        label, _, _ = _winner(probs, class_maps, m)
        first = probs[0]
        scores = torch.zeros((first.shape[0], num_classes, *first.shape[2:]), dtype=first.dtype, device=first.device)
        for p, cmap in zip(probs, class_maps):
            cls = p.argmax(1, keepdim=True)
            value = p.gather(1, cls)
            s = p.clamp_max(m).scatter_(1, cls, torch.where((cls > 0) & (value >= m), value, value.clamp_max(m)))
            for c, g in enumerate(cmap):
                if c:
                    torch.maximum(scores[:, int(g)], s[:, c], out=scores[:, int(g)])
        scores[:, 0] = max(m, floor)
        scores = scores.clamp_min_(floor).log_()
        # exact argmax: whatever ties with or beats the rule's winner (only possible through equalities) goes one
        # float below it; the winner channel itself is never changed
        win = scores.gather(1, label[:, None])
        below = torch.nextafter(win, torch.full_like(win, -math.inf))
        rivals = (scores >= win) & (torch.arange(num_classes, device=scores.device).view(
            1, -1, *([1] * (scores.ndim - 2))) != label[:, None])
        scores = torch.where(rivals, below.expand_as(scores), scores)
    return scores


def merged_probabilities(logits_per_decoder: Sequence[torch.Tensor], class_maps: Sequence[Sequence[int]],
                         temperatures: Sequence[float], num_classes: int, min_confidence: float = 0.5,
                         floor: float = FLOOR) -> torch.Tensor:
    """softmax of `merge_decoders`' log-scores, i.e. ``S / sum(S)``: what nnU-Net exports as "probabilities" for the
    merged model (on one tile). Normalised evidence, not calibrated probabilities: the background channel is the
    threshold ``m``'s share, channel ``g`` its best (capped) claim's share."""
    return torch.softmax(merge_decoders(logits_per_decoder, class_maps, temperatures, num_classes, min_confidence,
                                        floor), dim=1)
