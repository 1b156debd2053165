"""The size/quality trade-off of frozen_encoder_decoders' student grid, from finished runs' decoder records.

    .venv/bin/python benchmarks/student_grid.py RUN [RUN ...] [--labels L ...] [--name student_grid]

Every added decoder's record (`stages/stage_k/decoder.json`) holds each candidate student the search tried, with its
parameters and its Dice on the task's validation patches, and the teacher's. One panel per added task: candidates as
points (size as a share of one nnU-Net against validation Dice; one marker per run, e.g. per student budget), the
teacher as a star, the size budget as a vertical line and the acceptance band (teacher's Dice minus the tolerance)
shaded. Nothing is recomputed. Writes benchmarks/results/{name}.md and docs/img/{name}.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lifelong_nnunet.evaluation.plots import _save, new_figure
from lifelong_nnunet.io_utils import read_json, write_text
from lifelong_nnunet.methods import create_method
from lifelong_nnunet.names import short_task_name
from lifelong_nnunet.run_folder import RunFolder

MARKERS = "osD^v"


def records(run_dir: Path) -> tuple[dict[str, dict], dict]:
    """The added decoders' records (task -> record, stage order) and the method's configuration."""
    run = RunFolder(run_dir)
    exp = run.read_experiment()
    config = create_method(exp.method, exp.method_params, labels=run.read_labels()).config
    found = {}
    for stage in run.read_schedule():
        path = run.stage_dir(stage.index) / "decoder.json"
        if path.is_file():
            found.update({t: r for t, r in read_json(path).items() if r.get("candidates")})
    return found, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*", default=None, help="one legend label per run (default: folder names)")
    parser.add_argument("--name", default="student_grid")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--figures", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    runs = [records(r) for r in args.runs]
    tasks = list(dict.fromkeys(t for recs, _ in runs for t in recs))
    if not tasks:
        parser.error("no run holds an added decoder's record with candidates (compress: true, stage 2 on)")
    fig = new_figure(4.2 * len(tasks), 4.0)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    lines = ["| run | task | candidate (width x convs) | share of one nnU-Net | validation Dice | teacher's Dice | "
             "accepted |", "|---|---|---|---|---|---|---|"]
    for ax, task in zip(axes, tasks):
        for k, ((recs, config), label) in enumerate(zip(runs, labels)):
            rec = recs.get(task)
            if rec is None:
                continue
            base = rec["base_parameters"]
            share = [c["parameters"] / base for c in rec["candidates"]]
            dice = [c["dice"] for c in rec["candidates"]]
            ax.scatter(share, dice, marker=MARKERS[k % len(MARKERS)], s=45, label=f"{label}: students", zorder=3)
            ax.scatter([rec["teacher_parameters"] / base], [rec["teacher_dice"]], marker="*", s=200, color="black",
                       zorder=3, label="teacher" if k == 0 else None)
            if k == 0:
                ax.axvline(config["size_budget"], color="tab:red", linestyle="--", linewidth=1,
                           label=f"size budget {config['size_budget']:.0%}")
                ax.axhspan(rec["teacher_dice"] - config["dice_tolerance"], rec["teacher_dice"], color="tab:green",
                           alpha=0.15, label=f"within {config['dice_tolerance']:g} of the teacher")
            for c, s in zip(rec["candidates"], share):
                lines.append(f"| {label} | {short_task_name(task)} | {c['width']:g} x {c['n_conv']} | {s:.1%} | "
                             f"{c['dice']:.3f} | {rec['teacher_dice']:.3f} | {'yes' if c['accepted'] else 'no'} |")
        ax.set_title(short_task_name(task))
        ax.set_xlabel("decoder parameters (share of one nnU-Net)")
        ax.set_ylabel("Dice on validation patches")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("frozen_encoder_decoders: the student grid, size against quality")
    _save(fig, args.figures / f"{args.name}.png")
    text = "\n".join(lines) + "\n\nRuns: " + ", ".join(f"{lab} = {r}" for lab, r in zip(labels, args.runs)) + ".\n"
    write_text(args.results / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
