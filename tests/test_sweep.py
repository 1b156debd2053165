"""Sweeps: orderings and their guard, the sweep spec, the sweep folder, resume, shared planning.

Most tests replace the run itself (`sweep.local.execute_run`) by a fake that writes what a finished run folder holds, so
the sweep's own logic is tested in seconds. One slow test runs a real tiny sweep of two orderings and shows that the
second ordering reuses the first one's planning.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from lifelong_nnunet import sweep as sweep_mod
from lifelong_nnunet.sweep import gather as sweep_gather
from lifelong_nnunet.sweep import local as sweep_local
from lifelong_nnunet.sweep import ray_backend
from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.io_utils import write_json
from lifelong_nnunet.orderings import make_orderings, parse_ordering_request
from lifelong_nnunet.run_folder import migrate
from lifelong_nnunet.sweep import plan_runs, run_sweep, sweep_spec_from_dict

TASKS = ["Dataset901_A", "Dataset902_B", "Dataset903_C", "Dataset904_D"]


# ---- orderings -------------------------------------------------------------------------------------------------
def test_given_and_reverse_orderings():
    given = make_orderings(TASKS[:3], "given")
    assert [(o.name, o.order) for o in given] == [("o0-given", tuple(TASKS[:3]))]
    rev = make_orderings(TASKS[:3], "reverse")
    assert [(o.name, o.order) for o in rev] == [("o0-given", tuple(TASKS[:3])),
                                               ("o1-C-B-A", ("Dataset903_C", "Dataset902_B", "Dataset901_A"))]
    assert [o.name for o in make_orderings(TASKS[:1], "reverse")] == ["o0-given"]  # one task: nothing to reverse


def test_all_lists_every_permutation_once_given_first():
    orders = make_orderings(TASKS, "all")
    assert len(orders) == math.factorial(4)
    assert len({o.order for o in orders}) == 24 and len({o.name for o in orders}) == 24
    assert orders[0].order == tuple(TASKS) and orders[0].name == "o0-given"
    assert all(sorted(o.order) == sorted(TASKS) for o in orders)


def test_n_orderings_are_given_plus_distinct_seeded_permutations():
    three = make_orderings(TASKS, 3, seed=0)
    assert len(three) == 3 and three[0].name == "o0-given"
    assert len({o.order for o in three}) == 3
    assert make_orderings(TASKS, 3, seed=0) == three  # seeded: the same orderings (and folders) every time
    five = make_orderings(TASKS, 5, seed=0)
    assert five[:3] == three  # asking for more keeps the earlier orderings and their run folders
    assert [o.order for o in make_orderings(TASKS, 5, seed=1)] != [o.order for o in five]
    assert three[1].name == "o1-" + "-".join(t.split("_")[1] for t in three[1].order)
    # every distinct order is reachable: N = n! gives all of them
    assert {o.order for o in make_orderings(TASKS[:3], 6)} == {o.order for o in make_orderings(TASKS[:3], "all")}


def test_many_tasks_draw_by_rejection_and_stay_distinct():
    tasks = [f"Dataset{900 + i}_HospitalSite{i}" for i in range(10)]  # 10! orders: drawn, never listed
    orders = make_orderings(tasks, 50, seed=3)
    assert len({o.order for o in orders}) == 50 and orders[0].order == tuple(tasks)
    assert orders[1].name.startswith("o1-") and len(orders[1].name) <= 70  # long names fall back to dataset IDs
    assert orders[1].name.split("-")[1].isdigit()


def test_all_is_refused_above_six_tasks_unless_the_guard_is_raised():
    seven = [f"Dataset{900 + i}_T{i}" for i in range(7)]
    with pytest.raises(UserInputError, match=r"5040.*max_orderings \(720\).*--max-orderings 5040"):
        make_orderings(seven, "all")
    assert len(make_orderings(TASKS[:3] + TASKS[3:] + ["Dataset905_E", "Dataset906_F"], "all")) == 720  # 6 tasks
    assert len(make_orderings(seven, "all", max_orderings=5040)) == 5040
    with pytest.raises(UserInputError, match=r"20! = \d+ orderings.*orderings: 10\)\.$"):  # not listed, no
        make_orderings([f"Dataset{900 + i}_T{i}" for i in range(20)], "all")  # absurd advice to raise the guard


def test_n_above_the_number_of_orders_is_refused():
    with pytest.raises(UserInputError, match=r"3! = 6"):
        make_orderings(TASKS[:3], 7)
    with pytest.raises(UserInputError, match="max_orderings"):
        make_orderings(TASKS, 20, max_orderings=10)


@pytest.mark.parametrize("value, expected", [("given", "given"), ("ALL", "all"), (" reverse ", "reverse"),
                                             ("3", 3), (2, 2)])
def test_ordering_requests(value, expected):
    assert parse_ordering_request(value) == expected


@pytest.mark.parametrize("value", ["random", 0, "-2", True, 1.5])
def test_bad_ordering_requests(value):
    with pytest.raises(UserInputError, match="orderings"):
        parse_ordering_request(value)


# ---- the spec and the plan of runs -----------------------------------------------------------------------------
def test_yaml_spec_plans_every_method_ordering_and_seed(_pristine_sites, tmp_path):
    raw = _pristine_sites[0].parent
    yaml_path = raw.parent / "sweep.yaml"
    yaml_path.write_text(f"""
tasks: [{raw.name}/{_pristine_sites[0].name}, {raw.name}/{_pristine_sites[1].name}]
methods: [sequential, ewc]
method_params: {{ewc: {{lambda: 1000}}}}
orderings: reverse
seeds: [0, 3]
training: {{epochs: 1, iterations_per_epoch: 2}}
""")
    spec = sweep_mod.load_sweep_spec(yaml_path)
    assert spec.tasks == [str(p.resolve()) for p in _pristine_sites]  # relative to the YAML, resolved
    runs, orderings = plan_runs(spec)
    assert [o.name for o in orderings] == ["o0-given", "o1-SynthSiteB-SynthSiteA"]
    assert len(runs) == 2 * 2 * 2
    assert [r.path for r in runs[:4]] == ["runs/sequential/o0-given/seed0", "runs/ewc/o0-given/seed0",
                                          "runs/sequential/o1-SynthSiteB-SynthSiteA/seed0",
                                          "runs/ewc/o1-SynthSiteB-SynthSiteA/seed0"]
    assert runs[-1].path == "runs/ewc/o1-SynthSiteB-SynthSiteA/seed3" and runs[-1].seed == 3
    for r in runs:
        assert r.experiment["method_params"] == ({"lambda": 1000} if r.method == "ewc" else {})
        assert r.experiment["training"]["epochs"] == 1
        assert r.experiment["plan_with"] == str(_pristine_sites[0].resolve())  # every ordering plans on A
        assert [Path(t).name for t in r.experiment["tasks"]] == r.order
        assert Path(r.experiment["cache_dir"]).is_absolute()
    assert runs[2].order == ["Dataset902_SynthSiteB", "Dataset901_SynthSiteA"]


@pytest.mark.parametrize("data, fragment", [
    ({"tasks": ["a"], "method": "ewc"}, "use 'methods"),
    ({"tasks": ["a"], "seed": 1}, "use 'seeds"),
    ({"tasks": ["a"], "methods": ["ewc"], "method_params": {"lwf": {"alpha": 1}}}, "not in 'methods'"),
    ({"tasks": ["a"], "methods": ["ewc"], "method_params": {"ewc": {"lamda": 1}}}, "method_params.ewc"),
    ({"tasks": ["a"], "methods": ["nope"]}, "method 'nope' is unknown"),
    ({"tasks": ["a"], "seeds": 0}, "'seeds' must be at least 1"),
    ({"tasks": ["a"], "seeds": [1, 1]}, "seed twice"),
    ({"tasks": ["a", "b"], "orderings": "sideways"}, "orderings 'sideways' is unknown"),
    ({"tasks": [f"t{i}" for i in range(7)], "orderings": "all"}, "5040"),
    ({"tasks": ["a"], "training": {"epochs": 0}}, "training.epochs"),
    ({"tasks": ["Dataset001_A"], "plan_with": "Dataset002_B"}, "plan_with"),
    ({"tasks": []}, "non-empty list"),
    ({"tasks": ["a"], "methods": ["sequential", "joint"], "scenario": "class"}, "'joint' is not defined for the class"),
])
def test_spec_errors_name_the_problem(data, fragment):
    with pytest.raises(UserInputError, match="^spec: .*" + fragment.replace("(", r"\(")):
        sweep_spec_from_dict(data, "spec")


def test_seven_tasks_all_is_accepted_with_a_raised_guard():
    spec = sweep_spec_from_dict({"tasks": [f"t{i}" for i in range(7)], "orderings": "all", "max_orderings": 5040})
    assert spec.orderings == "all" and spec.max_orderings == 5040


# ---- planning shared by orderings ------------------------------------------------------------------------------
def _loaded(folders, seed=0):
    from lifelong_nnunet.tasks import load_task, make_test_split
    tasks = [load_task(f) for f in folders]
    for t in tasks:
        t.test_cases = make_test_split(t, 0.25, 1, seed)
    return tasks


def test_workspace_key_ignores_the_order_but_not_the_planning_task(_pristine_sites, tmp_path):
    from lifelong_nnunet.nnunet.planning import Workspace
    a, b = _loaded(_pristine_sites)
    given = Workspace(tmp_path, [a, b], "3d_fullres")
    assert given.plan_task is a
    reversed_same_plan = Workspace(tmp_path, [b, a], "3d_fullres", plan_with=str(a.folder))
    assert reversed_same_plan.root == given.root and reversed_same_plan.plan_task is a
    assert Workspace(tmp_path, [b, a], "3d_fullres", plan_with=901).root == given.root  # by dataset ID
    assert Workspace(tmp_path, [b, a], "3d_fullres").root != given.root  # plans on B: other plans
    assert Workspace(tmp_path, _loaded(_pristine_sites, seed=1), "3d_fullres").root != given.root  # other split
    with pytest.raises(UserInputError, match="plan_with '903'"):
        Workspace(tmp_path, [a, b], "3d_fullres", plan_with="903")


def test_workspace_key_changes_when_a_dataset_is_rebuilt_under_the_same_name(raw_sites, tmp_path):
    """Rebuilt images under the same folder name must not reuse the old preprocessed data."""
    import os

    from lifelong_nnunet.nnunet.planning import Workspace
    before = Workspace(tmp_path, _loaded(raw_sites), "3d_fullres").root
    assert Workspace(tmp_path, _loaded(raw_sites), "3d_fullres").root == before  # stable when nothing changed
    image = next((raw_sites[0] / "imagesTr").iterdir())
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert Workspace(tmp_path, _loaded(raw_sites), "3d_fullres").root != before


def test_plan_with_is_validated_and_kept_out_of_old_identities(_pristine_sites):
    tasks = [str(p) for p in _pristine_sites]
    identity = experiment_from_dict({"tasks": tasks}).identity()
    old = {k: v for k, v in identity.items() if k != "plan_with"}  # run folders from before plan_with existed
    assert migrate("experiment", old, 1) == identity  # still resume
    assert experiment_from_dict({"tasks": tasks, "plan_with": "902"}).identity()["plan_with"] == "902"
    assert experiment_from_dict({"tasks": ["11", "12"], "plan_with": "/data/Dataset012_X"}).plan_with
    with pytest.raises(UserInputError, match="plan_with 'Dataset903_SynthSiteC' is not one of the tasks"):
        experiment_from_dict({"tasks": tasks, "plan_with": "Dataset903_SynthSiteC"})


# ---- running, resuming (with a fake run) -----------------------------------------------------------------------
@pytest.fixture
def fake_runs(monkeypatch):
    """Replace the run by a fake that writes a finished run folder; records the runs started and the reports."""
    calls: dict[str, list] = {"runs": [], "reports": [], "interrupt_at": None}

    def fake(experiment: dict, run_dir: str, quiet: bool) -> dict:
        if calls["interrupt_at"] is not None and len(calls["runs"]) == calls["interrupt_at"]:
            raise KeyboardInterrupt
        calls["runs"].append(run_dir)
        exp = experiment_from_dict(dict(experiment))
        summary = {"method": exp.method, "metric": "dice", "final_average": 0.25 + 0.01 * len(calls["runs"]),
                   "bwt": -0.1, "fwt": 0.0, "mean_forgetting": 0.1, "train_seconds": 1.0}
        write_json(Path(run_dir) / "experiment.json", exp.identity())
        write_json(Path(run_dir) / "summary.json", summary)
        return summary

    monkeypatch.setattr(sweep_local, "execute_run", fake)
    monkeypatch.setattr(sweep_gather, "write_comparison", lambda d, log: calls["reports"].append(d))
    return calls


def _spec(sites, tmp_path, **extra) -> dict:
    return {"tasks": [str(p) for p in sites], "methods": ["sequential", "ewc"], "orderings": "reverse",
            "seeds": 2, "training": {"epochs": 1}, "cache_dir": str(tmp_path / "cache"), **extra}


def test_sweep_folder_layout(fake_runs, _pristine_sites, tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True, command="lifelong-nnunet sweep x")
    assert result["ran"] == 8 and result["skipped"] == 0
    stored = json.loads((out / "sweep.json").read_text())
    assert set(stored) == {"spec", "runs", "commands", "versions"}
    assert set(stored["versions"]) == {"lifelong_nnunet", "nnunetv2", "torch", "monai", "python"}
    assert stored["commands"] == ["lifelong-nnunet sweep x"]
    assert stored["spec"]["methods"] == ["sequential", "ewc"] and stored["spec"]["seeds"] == [0, 1]
    assert stored["spec"]["tasks"] == [str(p.resolve()) for p in _pristine_sites]
    assert len(stored["runs"]) == 8
    for run in stored["runs"]:
        assert set(run) == {"method", "ordering", "order", "seed", "path"}
        assert run["path"] == f"runs/{run['method']}/{run['ordering']}/seed{run['seed']}"
        assert (out / run["path"] / "summary.json").is_file()
        assert len(run["order"]) == 2 and all(name.startswith("Dataset90") for name in run["order"])
    assert sorted(fake_runs["runs"]) == sorted(str(out / r["path"]) for r in stored["runs"])
    table = pd.read_csv(out / "runs.csv")
    assert len(table) == 8 and table.finished.all() and table.final_average.notna().all()
    assert fake_runs["reports"] == [out]


def test_finished_sweep_does_nothing_and_says_so(fake_runs, _pristine_sites, tmp_path, capsys):
    out = tmp_path / "sweep"
    run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    result = run_sweep(_spec(_pristine_sites, tmp_path), out)
    assert result["ran"] == 0 and result["skipped"] == 8
    assert len(fake_runs["runs"]) == 8  # nothing started again
    assert "already complete (8 run(s)); nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten


def test_interrupted_sweep_keeps_finished_runs_and_resumes_only_the_rest(fake_runs, _pristine_sites, tmp_path):
    out = tmp_path / "sweep"
    fake_runs["interrupt_at"] = 3
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True, command="first")
    done = list(fake_runs["runs"])
    assert len(done) == 3
    stored = json.loads((out / "sweep.json").read_text())  # written before the first run: resumable, reportable
    assert len(stored["runs"]) == 8
    fake_runs["interrupt_at"] = None
    result = run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True, command="second")
    assert result["ran"] == 5 and result["skipped"] == 3
    assert fake_runs["runs"][3:] == [str(out / r["path"]) for r in stored["runs"]][3:]  # never a finished run
    assert json.loads((out / "sweep.json").read_text())["commands"] == ["first", "second"]


def test_a_run_without_summary_is_run_again(fake_runs, _pristine_sites, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True)
    (out / "runs/ewc/o1-SynthSiteB-SynthSiteA/seed1/summary.json").unlink()
    fake_runs["runs"].clear()
    assert run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True)["ran"] == 1
    assert fake_runs["runs"] == [str(out / "runs/ewc/o1-SynthSiteB-SynthSiteA/seed1")]


def test_a_different_sweep_in_the_same_folder_is_refused(fake_runs, _pristine_sites, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True)
    before = (out / "sweep.json").read_text()
    with pytest.raises(UserInputError, match=r"different sweep \(differs in: seeds, training\)"):
        run_sweep(_spec(_pristine_sites, tmp_path, seeds=3, training={"epochs": 2}), out, quiet=True)
    assert (out / "sweep.json").read_text() == before
    # where it runs is not what it computes: another device or cache resumes the same sweep
    assert run_sweep(_spec(_pristine_sites, tmp_path, device="cpu"), out, quiet=True)["ran"] == 0


def test_a_folder_that_is_not_a_sweep_is_refused(fake_runs, _pristine_sites, tmp_path):
    out = tmp_path / "notasweep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="holds no lifelong-nnunet sweep"):
        run_sweep(_spec(_pristine_sites, tmp_path), out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_bad_data_stops_the_sweep_before_anything_is_written(fake_runs, raw_sites, tmp_path):
    (raw_sites[1] / "dataset.json").write_text("{not json")
    out = tmp_path / "sweep"
    with pytest.raises(UserInputError, match="dataset.json"):
        run_sweep(_spec(raw_sites, tmp_path), out, quiet=True)
    assert not out.exists() and fake_runs["runs"] == []


def test_ray_missing_gives_the_install_command(fake_runs, _pristine_sites, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(UserInputError, match=r"pip install 'lifelong-nnunet\[ray\]'"):
        run_sweep(_spec(_pristine_sites, tmp_path), tmp_path / "sweep", use_ray=True)
    assert not (tmp_path / "sweep").exists()


# ---- the command line ------------------------------------------------------------------------------------------
def test_cli_sweep_with_flags(fake_runs, _pristine_sites, cli_in_process, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--tasks", *_pristine_sites, "--methods", "sequential", "ewc", "--orderings", "2", "--seeds",
            "1", "--epochs", "1", "--iterations", "3", "-o", out]
    code, _, err = cli_in_process(*args)
    assert code == 0, err
    assert "[4/4]" in err and "done, final avg Dice" in err
    stored = json.loads((out / "sweep.json").read_text())
    assert stored["commands"][0].startswith("lifelong-nnunet sweep --tasks")
    assert [r["method"] for r in stored["runs"]] == ["sequential", "ewc"] * 2
    exp = json.loads((out / stored["runs"][3]["path"] / "experiment.json").read_text())
    assert exp["training"]["epochs"] == 1 and exp["training"]["iterations_per_epoch"] == 3
    assert exp["method"] == "ewc" and exp["seed"] == 0
    code, _, err = cli_in_process(*args)
    assert code == 0 and "already complete" in err and len(fake_runs["runs"]) == 4


def test_cli_sweep_guard_is_a_user_error(cli_in_process, tmp_path):
    out = tmp_path / "sweep"
    code, _, err = cli_in_process("sweep", "--tasks", *[str(i) for i in range(1, 8)], "--orderings", "all",
                                         "-o", out)
    assert code == 2 and "Traceback" not in err
    assert "5040" in err and "--max-orderings" in err
    assert not out.exists()


def test_cli_sweep_yaml_with_method_params(fake_runs, _pristine_sites, cli_in_process, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"tasks": [str(p) for p in _pristine_sites], "methods": ["ewc", "lwf"],
                                "method_params": {"ewc": {"lambda": 1000}}, "seeds": [7]}))
    code, _, err = cli_in_process("sweep", spec, "--methods", "ewc", "-o", tmp_path / "sweep")
    assert code == 0, err
    exp = json.loads((tmp_path / "sweep/runs/ewc/o0-given/seed7/experiment.json").read_text())
    assert exp["method_params"] == {"lambda": 1000} and exp["seed"] == 7
    assert len(fake_runs["runs"]) == 1  # --methods replaced the YAML's list


# ---- a real tiny sweep: the second ordering does not plan again ------------------------------------------------
TINY = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1}


@pytest.mark.slow
def test_real_sweep_plans_once_for_both_orderings(synthetic_tasks, planning_cache, tmp_path, monkeypatch):
    from lifelong_nnunet.nnunet import planning
    plannings: list[list[str]] = []
    link = planning.Workspace._link_training_cases  # called only when a workspace is actually planned

    def counting_link(self, raw):
        plannings.append([t.name for t in self.tasks])
        return link(self, raw)

    monkeypatch.setattr(planning.Workspace, "_link_training_cases", counting_link)
    plannings_after: list[int] = []
    execute = sweep_local.execute_run

    def spying_execute(experiment, run_dir, quiet):
        summary = execute(experiment, run_dir, quiet)
        plannings_after.append(len(plannings))
        return summary

    monkeypatch.setattr(sweep_local, "execute_run", spying_execute)
    out = tmp_path / "sweep"
    spec = {"tasks": [str(p) for p in synthetic_tasks], "orderings": "reverse", "training": TINY, "device": "cpu",
            "cache_dir": str(planning_cache)}
    result = run_sweep(spec, out, quiet=True)
    assert result["ran"] == 2 and all(row["finished"] for row in result["runs"])
    assert plannings_after[0] <= 1 and plannings_after[1] == plannings_after[0]  # ordering 2 planned nothing
    given, reverse = (out / r["path"] for r in json.loads((out / "sweep.json").read_text())["runs"])
    assert "Reusing planned and preprocessed data" in (reverse / "run.log").read_text()
    assert "Planning [" not in (reverse / "run.log").read_text()
    reverse_spec = json.loads((reverse / "experiment.json").read_text())
    assert [Path(t).name for t in reverse_spec["tasks"]] == ["Dataset902_SynthSiteB", "Dataset901_SynthSiteA"]
    assert reverse_spec["plan_with"] == str(synthetic_tasks[0].resolve())
    # one architecture and one initial network for both orderings
    assert (given / "plans.json").read_text() == (reverse / "plans.json").read_text()
    w0, w1 = (torch.load(d / "stages/stage_0/model.pt", weights_only=True)["network_weights"] for d in (given, reverse))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # the reverse run trained B first
    assert json.loads((reverse / "schedule.json").read_text())[0]["train_tasks"] == ["Dataset902_SynthSiteB"]
    again = run_sweep(spec, out, quiet=True)
    assert again["ran"] == 0 and len(plannings_after) == 2


# ---- Ray resources (no Ray needed: a stand-in for the cluster) -------------------------------------------------
class _FakeRay:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


def test_ray_resources_per_run(monkeypatch):
    from lifelong_nnunet.sweep.ray_backend import resources as _resources
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_only = _FakeRay(CPU=2.0)
    assert _resources(cpu_only, 1, None, "auto", local=True) == {"num_cpus": 1, "num_gpus": 0}
    assert _resources(_FakeRay(CPU=32.0, GPU=4.0), 4, None, "auto", local=False) == {"num_cpus": 4, "num_gpus": 1}
    assert _resources(_FakeRay(CPU=32.0, GPU=4.0), 4, None, "cpu", local=False)["num_gpus"] == 0
    assert _resources(_FakeRay(CPU=32.0, GPU=4.0), 1, 0.5, "auto", local=False)["num_gpus"] == 0.5
    with pytest.raises(UserInputError, match="--cpus-per-run 3 is more than the 2 CPUs"):
        _resources(cpu_only, 3, None, "auto", local=True)
    with pytest.raises(UserInputError, match="--gpus-per-run 1"):
        _resources(cpu_only, 1, 1, "auto", local=True)
    with pytest.raises(UserInputError, match="device 'cuda' with --gpus-per-run 0"):
        _resources(_FakeRay(CPU=2.0, GPU=1.0), 1, 0, "cuda", local=True)


def test_a_ray_run_without_a_gpu_stays_on_the_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(sweep_local, "execute_run", lambda exp, run_dir, quiet: seen.append((exp["device"], quiet)))
    threads = torch.get_num_threads()
    try:
        ray_backend.ray_task({"device": "auto"}, "x", 1, 0)
        assert torch.get_num_threads() == 1
        ray_backend.ray_task({"device": "auto"}, "x", 1, 1)
    finally:
        torch.set_num_threads(threads)
    assert seen == [("cpu", True), ("auto", True)]
