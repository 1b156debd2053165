"""The contract between the runner, the trainer and a method: the registry, the declared parameters and their one
error format, the stage state and the trainer view."""
from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

from fakes import FakeTrainer
from lifelong_nnunet.errors import MethodParamError, PluginContractError, UserInputError
from lifelong_nnunet.methods import (
    Method,
    Stage,
    StageState,
    TrainerView,
    available_methods,
    create_method,
    registered_methods,
)
from lifelong_nnunet.methods.params import Param, flag, integer, number, numbers, one_of
from lifelong_nnunet.sweep import sweep_spec_from_dict

SHIPPED = ["ewc", "frozen_body", "frozen_encoder_decoders", "joint", "lwf", "mas", "mib", "multihead", "plop",
           "rehearsal", "rw", "separate", "sequential"]


class Probe(Method):
    """A method defined outside the package (as a test's probe is)."""
    name = "test-contract-probe"
    params = {"strength": number(1.0, min=0)}


# ---- the registry -------------------------------------------------------------------------------------------------
def test_available_methods_lists_only_the_shipped_methods():
    import test_end_to_end  # noqa: F401 - defines the end-to-end probes, Method subclasses with a name

    assert available_methods() == SHIPPED
    with pytest.raises(UserInputError, match="Unknown method"):
        create_method("test-init-probe")


def test_a_method_from_outside_the_package_is_known_only_while_registered():
    with registered_methods(Probe):
        assert "test-contract-probe" in available_methods()
        assert create_method("test-contract-probe", {"strength": 2}).config == {"strength": 2}
    assert available_methods() == SHIPPED


def test_a_registered_method_may_not_hide_a_shipped_one():
    class Impostor(Method):
        name = "ewc"

    with registered_methods(Impostor), pytest.raises(PluginContractError, match="ewc"):
        available_methods()
    assert create_method("ewc").__class__.__name__ == "EWC"


# ---- declared parameters ------------------------------------------------------------------------------------------
def test_every_shipped_method_declares_its_parameters():
    for name in SHIPPED:
        method = create_method(name)
        assert all(isinstance(p, Param) for p in method.params.values()), name
        assert method.config == type(method).defaults()


def test_mib_refuses_a_misspelled_initialisation_instead_of_training_from_random_weights():
    with pytest.raises(MethodParamError) as info:
        create_method("mib", {"init_new": "backgroud"})
    e = info.value
    assert (e.method, e.param, e.value, e.suggestion) == ("mib", "init_new", "backgroud", "background")
    assert "'background'" in e.allowed and "'random'" in e.allowed
    assert str(e) == ("method 'mib': parameter 'init_new' must be one of 'background', 'random', not 'backgroud'. "
                      "Did you mean 'background'? Fix method_params in the spec.")
    assert create_method("mib", {"init_new": "random"}).config["init_new"] == "random"


@pytest.mark.parametrize("temperature", [0, -1.0, "2", True, float("nan"), None])
def test_lwf_temperature_must_be_a_positive_number(temperature):
    with pytest.raises(MethodParamError) as info:
        create_method("lwf", {"temperature": temperature})
    assert info.value.param == "temperature" and info.value.allowed == "a number > 0"
    assert isinstance(info.value, UserInputError)  # the CLI shows it as one paragraph, exit code 2


def test_lwf_accepts_a_positive_temperature_as_given():
    assert create_method("lwf", {"temperature": 3}).config == {"lambda": 1.0, "temperature": 3}


def test_unknown_parameter_names_the_method_its_parameters_and_the_closest_spelling():
    with pytest.raises(MethodParamError) as info:
        create_method("ewc", {"fisher_batch": 3})
    e = info.value
    assert e.unknown and e.param == "fisher_batch" and e.suggestion == "fisher_batches"
    assert e.allowed == ("fisher_batches", "gamma", "lambda", "online")
    assert str(e) == ("method 'ewc' has no parameter 'fisher_batch'. Did you mean 'fisher_batches'? Its parameters "
                      "are: fisher_batches, gamma, lambda, online. Fix method_params in the spec.")
    with pytest.raises(MethodParamError, match="has no parameter 'lambda'.* Its parameters are: none"):
        create_method("sequential", {"lambda": 1})


def test_the_sweep_words_the_fix_from_the_error_fields():
    with pytest.raises(UserInputError) as info:
        sweep_spec_from_dict({"tasks": ["a"], "methods": ["mib"], "method_params": {"mib": {"init_new": "bg"}}},
                             "sweep.yaml")
    assert str(info.value) == ("sweep.yaml: method 'mib': parameter 'init_new' must be one of 'background', 'random', "
                               "not 'bg'. Fix method_params.mib.")


@pytest.mark.parametrize("param, good, bad", [
    (number(1.0, min=0), [0, 2.5], [-1, "1", True, float("inf")]),
    (number(0.5, min=0, max=1, max_open=True), [0, 0.99], [1, 1.5]),
    (integer(3, min=1), [1, 10], [0, 1.0, False]),
    (integer(20, min=1, null="no bound"), [None, 5], [0, "5"]),
    (flag(True), [True, False], [1, "yes"]),
    (one_of("a", ("a", "b")), ["a", "b"], ["c", None]),
    (numbers([1, 2], min=1, whole=True), [[1], [3, 4]], [[], [0], [1.5], 2]),
])
def test_declared_checks(param, good, bad):
    for value in good:
        param.check("m", "p", value)
    for value in bad:
        with pytest.raises(MethodParamError):
            param.check("m", "p", value)


def test_a_malformed_declaration_is_refused_when_the_class_is_defined():
    with pytest.raises(PluginContractError, match="not a Param"):
        class Raw(Method):
            params = {"strength": 1.0}
    with pytest.raises(PluginContractError, match="default"):
        class BadDefault(Method):
            params = {"strength": number(-1.0, min=0)}


def test_defaults_are_copies():
    a, b = create_method("plop"), create_method("plop")
    a.config["scales"].append(8)
    assert b.config["scales"] == [1, 2, 4] == type(b).defaults()["scales"]


# ---- labels, stages, the trainer view -----------------------------------------------------------------------------
def test_labels_are_bound_once_at_construction():
    method = create_method("sequential")
    assert method.labels is None
    with pytest.raises(AttributeError):
        method.labels = object()


def test_stage_init_is_checked_and_stage_state_is_frozen(tmp_path):
    with pytest.raises(PluginContractError, match="init"):
        Stage(1, ("a",), "previos")
    state = StageState(Stage(2, ("b",)), ("a",), Path(tmp_path), (0, 3))
    with pytest.raises(FrozenInstanceError):
        state.tasks_before = ()


def test_the_shared_fake_is_a_trainer_view():
    assert isinstance(FakeTrainer(torch.nn.Identity()), TrainerView)
    assert not isinstance(object(), TrainerView)


def test_choose_task_is_a_hook_with_a_default():
    assert create_method("sequential").choose_task(torch.nn.Identity(), lambda m: None, ["a", "b"]) is None
