"""Both learners answer the whole learner contract with the contract's parameters,
and LearnerGroup calls each method by name, typed."""
import inspect

import pytest

from rlloop.actors.learner_group import LearnerGroup
from rlloop.learner.contract import Learner
from rlloop.learner.hf_learner import HFLearner
from rlloop.learner.megatron_learner import MegatronLearner

METHODS = [name for name, value in vars(Learner).items() if inspect.isfunction(value) and not name.startswith("_")]


def _params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_the_contract_names_what_the_coordinator_uses():
    assert {"train_step", "sft_step", "weight_plan", "export", "send_weights", "save", "load_checkpoint"} <= set(METHODS)


@pytest.mark.parametrize("learner", [HFLearner, MegatronLearner])
def test_each_learner_implements_every_method_of_the_contract(learner):
    for name in METHODS:
        ours = getattr(learner, name, None)
        assert callable(ours), f"{learner.__name__} lacks {name}"
        wanted = _params(getattr(Learner, name))
        assert _params(ours)[:len(wanted)] == wanted, f"{learner.__name__}.{name}{inspect.signature(ours)}"


def test_the_group_offers_every_contract_method_that_crosses_processes():
    # ready: the group's wait_ready and recover ask every rank; export: a generator the
    # rank's own sender consumes (send_weights), never sent over Ray.
    for name in set(METHODS) - {"ready", "export"}:
        assert _params(getattr(LearnerGroup, name))[:len(_params(getattr(Learner, name)))] == \
            _params(getattr(Learner, name)), name
