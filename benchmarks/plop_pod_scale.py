"""How large PLOP's POD term is against nnU-Net's task loss, with the reference's factors, on a tiny 2d example.

PLOP's POD now pools squared, unnormalised features (as the authors' code), so its size depends on the feature
scale: this checks that the reference's factors (0.01 on the encoder stages, 0.0005 on the logits) are not absurd
at nnU-Net's scale before keeping them as defaults. Two stages on synthetic 32x32 images (a disk and a square):

- domain: stage 1 on site A, stage 2 on site B (the two structures' intensities swapped);
- class: stage 1 annotates the disk only, stage 2 the square only (the disk is background there, PLOP
  pseudo-labels it); the head grows from 2 to 3 channels, POD schedule sqrt(3/1).

The network is nnU-Net's 2d U-Net for a 32x32 patch (4 stages, 32-256 features, 2 convs, instance norm, deep
supervision), trained with nnU-Net's loss and optimiser settings (SGD 0.01, momentum 0.99, Nesterov). In stage 2
every few steps the POD term, the task loss and the norms of their gradients over the network's parameters are
recorded; the old structure's Dice on held-out images is measured after stage 2.

    .venv/bin/python benchmarks/plop_pod_scale.py [--steps1 80 --steps2 50] [--report-only]

Writes benchmarks/results/plop_pod_scale.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from lifelong_nnunet.io_utils import write_json, write_text
from lifelong_nnunet.labels import LabelSpace
from lifelong_nnunet.methods import Stage, StageState, create_method
from lifelong_nnunet.networks.output_head import resize_output
from lifelong_nnunet.nnunet.loss import loss_with_ignore_label
from lifelong_nnunet.nnunet.network import deep_supervision_weights

RESULTS = Path(__file__).parent / "results"
SIZE, BATCH = 32, 10


def network(num_classes: int) -> PlainConvUNet:
    return PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=[32, 64, 128, 256], conv_op=torch.nn.Conv2d,
                         kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=2, num_classes=num_classes,
                         n_conv_per_stage_decoder=2, conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def batch(g: torch.Generator, site: str, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a disk (label 1) and a square (label 2); site B swaps the two structures' intensities."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images, labels = torch.zeros(n, 1, SIZE, SIZE), torch.zeros(n, 1, SIZE, SIZE)
    bright = {"A": (1.0, 2.0), "B": (2.0, 1.0)}[site]
    for i in range(n):
        cy, cx, r = (torch.randint(6, SIZE - 6, (2,), generator=g).tolist() + [int(torch.randint(3, 6, (1,),
                                                                                               generator=g))])
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        sy, sx = torch.randint(2, SIZE - 9, (2,), generator=g).tolist()
        square = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        square[sy:sy + 7, sx:sx + 7] = True
        square &= ~disk
        labels[i, 0][disk], labels[i, 0][square] = 1, 2
        images[i, 0] = bright[0] * disk + bright[1] * square + 0.4 * torch.randn(SIZE, SIZE, generator=g)
    images = (images - images.mean((2, 3), keepdim=True)) / images.std((2, 3), keepdim=True)
    return images, labels


def deep_targets(labels: torch.Tensor) -> list[torch.Tensor]:
    return [labels] + [F.interpolate(labels, scale_factor=1 / 2 ** k, mode="nearest") for k in (1, 2, 3)]


def nnunet_loss() -> DeepSupervisionWrapper:
    return DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
        deep_supervision_weights(4))


class Trainer:
    """The part of the trainer PLOP reads (methods.base.TrainerView's members it uses)."""

    def __init__(self, net, annotated, tasks_before=("A",)):
        self.network, self.device, self.loss, self.ignore_label = net, torch.device("cpu"), nnunet_loss(), None
        self.stage_state = StageState(Stage(2, ("B",), "previous"), tuple(tasks_before), None, annotated)

    def loss_ignoring(self, label):
        return loss_with_ignore_label(self.loss, label)


def optimiser(net):
    return torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)


def grad_norm(value: torch.Tensor, params) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def dice(net, site: str, cls: int, seed: int = 99) -> float:
    g = torch.Generator().manual_seed(seed)
    net.eval()
    with torch.no_grad():
        x, y = batch(g, site, 40)
        out = net(x)
        pred = (out[0] if isinstance(out, (list, tuple)) else out).argmax(1)
    net.train()
    p, t = pred == cls, y[:, 0] == cls
    return float(2 * (p & t).sum() / (p.sum() + t.sum()).clamp_min(1))


def stage1(scenario: str, steps: int) -> PlainConvUNet:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = network(2 if scenario == "class" else 3)
    opt, loss = optimiser(net), nnunet_loss()
    for _ in range(steps):
        x, y = batch(g, "A")
        if scenario == "class":
            y = (y == 1).float()  # task 1 annotates the disk only
        opt.zero_grad()
        loss(net(x), deep_targets(y)).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    return net


def stage2(first: PlainConvUNet, scenario: str, params: dict, steps: int, every: int) -> dict:
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    net = copy.deepcopy(first)
    if scenario == "class":
        net = resize_output(net, 3)  # the grown head, as the runner makes it: old channels kept exactly
        space = LabelSpace("class", {"background": 0, "disk": 1, "square": 2}, {"disk": "A", "square": "B"},
                           {"A": {0: 0, 1: 1}, "B": {0: 0, 1: 2}})
        annotated = (0, 2)
    else:
        space, annotated = None, None
    trainer = Trainer(net, annotated)
    method = create_method("plop", params, labels=space)
    method.before_stage(trainer, Stage(2, ("B",), "previous"))
    opt = optimiser(net)
    params_list = [p for p in net.parameters() if p.requires_grad]
    records = []
    for step in range(steps):
        x, y = batch(g, "A" if scenario == "class" else "B")
        if scenario == "class":
            y = torch.where(y == 1, torch.zeros_like(y), y)  # task 2 annotates the square only
        targets = deep_targets(y)
        opt.zero_grad()
        output = net(x)
        task = trainer.loss(output, targets)
        terms = method.loss_terms(trainer, x, targets, output)
        task_total = task + terms.get("plop_pseudo_correction", 0.0)  # the class task loss: on the pseudo-labels
        pod = terms["plop_pod"]
        if step % every == 0 or step == steps - 1:
            records.append({"step": step, "task_loss": task_total.item(), "pod": pod.item(),
                            "task_grad": grad_norm(task_total, params_list),
                            "pod_grad": grad_norm(pod, params_list) if pod.requires_grad else 0.0})
        (task_total + pod).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    method.after_stage(trainer, Stage(2, ("B",), "previous"))
    old = dice(net, "A", 1)  # the structure stage 2 does not annotate (class) / the first site (domain)
    new = dice(net, "A" if scenario == "class" else "B", 2)
    gratio = [r["pod_grad"] / r["task_grad"] for r in records]
    return {"params": params, "records": records, "old_dice": old, "new_dice": new,
            "pod_grad_over_task_grad_median": statistics.median(gratio)}


def report(data: dict) -> str:
    every = data.get("every", 10)
    lines = ["# PLOP's POD term against nnU-Net's task loss (tiny 2d example)", "",
             f"nnU-Net's 2d U-Net for 32x32 patches, batch {BATCH}; stage 1 {data['steps1']} steps, stage 2 "
             f"{data['steps2']} steps; medians over stage 2 (every {every} steps). POD: PLOP's whole term (factors "
             "and schedule included); task: nnU-Net's Dice + CE (in the class scenario on the pseudo-labels, times "
             "the adaptive factor), negative once the Dice part exceeds the CE; gradient norms over all parameters. "
             "Old Dice: the disk on site A on 40 held-out images (domain: the first site; class: the structure stage "
             "2 does not annotate, so the class runs without POD still have PLOP's pseudo-labels).", "",
             "| scenario | setting | POD term | task loss | gradient norm, POD / task | old Dice (after stage 1) "
             "| old Dice | new Dice |", "|---|---|---|---|---|---|---|---|"]
    for scenario, res in data["results"].items():
        for name, run in res["runs"].items():
            records = run["records"]
            lines.append(f"| {scenario} | {name} | {statistics.median(r['pod'] for r in records):.3f} | "
                         f"{statistics.median(r['task_loss'] for r in records):.3f} | "
                         f"{run['pod_grad_over_task_grad_median']:.2f} | {res['old_dice_after_stage1']:.3f} | "
                         f"{run['old_dice']:.3f} | {run['new_dice']:.3f} |")
    lines += ["", f"Ran in {data['seconds']:.0f} s on CPU, one thread, on a shared, loaded 2-core machine (times are "
              "inflated; the ratios and Dice do not depend on them). One seed: a check of scale, not a tuning "
              "result; `lifelong-nnunet tune` chooses the factors on validation data.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps1", type=int, default=80)
    parser.add_argument("--steps2", type=int, default=50)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the stored .json")
    args = parser.parse_args()
    if args.report_only:
        from lifelong_nnunet.io_utils import read_json
        text = report(read_json(RESULTS / "plop_pod_scale.json"))
        write_text(RESULTS / "plop_pod_scale.md", text)
        print(text)
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    settings = {"no POD": {"pod_lambda": 0.0, "pod_logits_lambda": 0.0},
                "reference factors (default)": {},
                "10x the reference": {"pod_lambda": 0.1, "pod_logits_lambda": 0.005}}
    results = {}
    for scenario in ("domain", "class"):
        first = stage1(scenario, args.steps1)
        before = dice(first, "A", 1)
        results[scenario] = {"old_dice_after_stage1": before,
                             "runs": {name: stage2(first, scenario, p, args.steps2, args.every)
                                      for name, p in settings.items()}}
    data = {"steps1": args.steps1, "steps2": args.steps2, "every": args.every,
            "seconds": time.perf_counter() - start, "results": results}
    write_json(RESULTS / "plop_pod_scale.json", data)
    text = report(data)
    write_text(RESULTS / "plop_pod_scale.md", text)
    print(text)


if __name__ == "__main__":
    main()
