"""The figure of docs/methods/merge.md: two overlapping task decoders on a 1-D toy line and their merged labels.

    .venv/bin/python benchmarks/merge_figure.py            # writes docs/img/merge_rule.png

Decoder A (task 1, structure "organ", global label 1) is over-confident (its fitted temperature is 2); decoder B
(task 2, "lesion", global label 2) is calibrated (T = 1). Both are two-class decoders, threshold m = 0.6. The merged
row is computed by `lifelong_nnunet.networks.merge` itself, so the figure shows what the code does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.style
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lifelong_nnunet.networks.merge import (
    calibrated_probabilities,
    merge_decoders,
    merge_labels,
)

M = 0.6
T_A, T_B = 2.0, 1.0
COLORS = {0: "0.85", 1: "tab:blue", 2: "tab:orange"}


def toy() -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Positions and the two decoders' logits [1, 2, X] (background logit 0, a smooth bump of foreground logit)."""
    x = np.linspace(0, 100, 801)
    bump_a = 8.0 * (1 - ((x - 33) / 22) ** 2)           # raw foreground on 11..55, very confident
    bump_b = 5.0 * (1 - ((x - 68) / 20) ** 2)           # raw foreground on 48..88
    blip_b = -6.0 + 6.3 * np.exp(-((x - 5) / 3) ** 2)   # a weak blip of B: argmax, but p = 0.57 < m
    bump_b = np.maximum(bump_b, blip_b)

    def logits(bump):
        return torch.tensor(np.stack([np.zeros_like(bump), bump]), dtype=torch.float32)[None]
    return x, logits(bump_a), logits(bump_b)


def _spans(x: np.ndarray, mask: np.ndarray):
    """(start, end) x-intervals where mask is true."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    step = x[1] - x[0]
    return [(x[s] - step / 2, x[e - 1] + step / 2) for s, e in zip(edges[::2], edges[1::2])]


def draw(path: Path) -> None:
    x, za, zb = toy()
    pa, pb = calibrated_probabilities(za, T_A)[0].numpy(), calibrated_probabilities(zb, T_B)[0].numpy()
    raw_a = calibrated_probabilities(za, 1.0)[0, 1].numpy()
    maps = [[0, 1], [0, 2]]
    labels, winner = merge_labels([za, zb], maps, [T_A, T_B], 3, M, return_decoder=True)
    scores = merge_decoders([za, zb], maps, [T_A, T_B], 3, M)[0].exp().numpy()
    labels, winner = labels[0].numpy(), winner[0].numpy()

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(9, 7.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(3, 1, sharex=True)
        for ax, p, name, k, color in [(axes[0], pa, "decoder A (task 1, T=2): organ -> label 1", 0, "tab:blue"),
                                      (axes[1], pb, "decoder B (task 2, T=1): lesion -> label 2", 1, "tab:orange")]:
            claims = (p[1] > p[0]) & (p[1] >= M)
            for a, b in _spans(x, claims):
                ax.axvspan(a, b, color=color, alpha=0.15, lw=0)
            ax.plot(x, p[1], color=color, label="calibrated p(structure)")
            ax.plot(x, p[0], color=color, ls="--", label="calibrated p(background)")
            if k == 0:
                ax.plot(x, raw_a, color="0.5", ls=":", label="p(organ) before calibration (T=1)")
            ax.axhline(M, color="black", lw=0.8, ls="-.", label=f"threshold m = {M}")
            ax.set_title(name + "  (shaded: the decoder claims its structure)", fontsize=10)
            ax.set_ylim(-0.02, 1.3)
            ax.set_ylabel("probability")
            ax.legend(loc="upper center", fontsize=8, ncol=2)
        ax = axes[2]
        for g, color in COLORS.items():
            for a, b in _spans(x, labels == g):
                ax.axvspan(a, b, ymin=0, ymax=0.12, color=color, lw=0)
        ax.plot(x, scores[1], color="tab:blue", label="S[1]: best score on label 1")
        ax.plot(x, scores[2], color="tab:orange", label="S[2]: best score on label 2")
        ax.plot(x, scores[0], color="black", ls="-.", label="S[0] = m (background)")
        ax.set_ylim(-0.02, 1.3)
        ax.set_ylabel("merged score S")
        ax.set_xlabel("position")
        ax.set_title("merged: label = argmax S (bar at the bottom: grey background, blue 1, orange 2)", fontsize=10)
        ax.legend(loc="upper center", fontsize=8, ncol=3)
        overlap = (winner >= 0) & (pa[1] >= M) & (pb[1] >= M)
        if overlap.any():
            mid = float(np.mean(x[overlap]))
            ax.annotate("both claim:\nhigher p wins", (mid, 0.14), (70, 0.3), fontsize=8, ha="center",
                        arrowprops={"arrowstyle": "->", "lw": 0.8})
        ax.annotate("B's blip: argmax\nbut p < m, not claimed", (5, 0.14), (25, 0.3), fontsize=8, ha="center",
                    arrowprops={"arrowstyle": "->", "lw": 0.8})
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/img/merge_rule.png"))
    draw(parser.parse_args().output)


if __name__ == "__main__":
    main()
