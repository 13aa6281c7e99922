"""Every method's loss declares the valid interval of each numeric YAML argument (`argument_ranges`): a value just
outside it fails in `kd.setup.prepare`, before any data or teacher work, naming the argument, the value and the
interval; the method's own values pass."""
import inspect
import math

import pytest
from omegaconf import OmegaConf

from conftest import METHODS, compose_config
from kd import setup
from kd.losses.base import DistillationLoss, loss_factory
from kd.validation import ConfigError

BASE = ["data=synthetic", "device=cpu", "trainer.precision=fp32"]

UNRANGED = {("CTKD", "theta_init"): "the temperature's logit before the sigmoid: every real number is valid"}
"""Numeric YAML arguments that need no interval, (class, argument) -> why."""


def config(method, *overrides):
    return compose_config([*BASE, f"method={method}", *overrides])


def loss_arguments(method):
    """(the method's loss class, its YAML arguments, resolved)."""
    loss = config(method).method.loss
    arguments = OmegaConf.to_container(loss, resolve=True)
    return loss_factory(loss).loss_class, {k: v for k, v in arguments.items() if not k.startswith("_")}


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def just_outside(interval, like):
    """Values just outside `interval`: an open bound itself, or a step past a closed one (1 for a whole number
    like `like`, else 0.5); none past an infinite bound."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    step = 1 if isinstance(like, int) else 0.5
    values = []
    if math.isfinite(low):
        values.append(low if interval[0] == "(" else low - step)
    if math.isfinite(high):
        values.append(high if interval[-1] == ")" else high + step)
    return [int(v) if isinstance(like, int) and v.is_integer() else v for v in values]


@pytest.mark.parametrize("method", METHODS)
def test_a_value_just_outside_each_declared_range_fails_in_prepare(method):
    cls, arguments = loss_arguments(method)
    for name, interval in cls.argument_ranges.items():
        if arguments.get(name) is None:
            continue  # an argument this method does not set (a parent's) or sets to null (pkt_cosine's temperature)
        given = arguments[name]
        for bad in just_outside(interval, given[-1] if isinstance(given, list) else given):
            value = [*given[:-1], bad] if isinstance(given, list) else bad  # a list's last item
            with pytest.raises(ConfigError) as failure:
                setup.prepare(config(method, f"method.loss.{name}={value!r}"))
            message = str(failure.value)
            assert message.startswith(f"method={method}: method.loss.{name}={value!r} is invalid"), message
            assert f"must lie in {interval}" in message, message


@pytest.mark.parametrize("method", METHODS)
def test_the_methods_own_values_pass(method):
    setup.prepare(config(method))


@pytest.mark.parametrize("method", METHODS)
def test_every_numeric_argument_has_a_range_or_a_reason(method):
    cls, arguments = loss_arguments(method)
    numeric = {name for name, value in arguments.items()
               if is_number(value) or (isinstance(value, list) and value and all(map(is_number, value)))}
    unranged = {name for (owner, name) in UNRANGED if owner == cls.__name__}
    missing = numeric - set(cls.argument_ranges) - unranged
    assert not missing, f"{cls.__name__} declares no argument_ranges for {sorted(missing)}; add them, or list them " \
                        f"in UNRANGED with the reason"
    assert unranged <= set(arguments) - set(cls.argument_ranges), f"stale UNRANGED entries for {cls.__name__}"
    taken = {name for base in cls.__mro__ if issubclass(base, DistillationLoss) and base is not DistillationLoss
             for name in inspect.signature(base.__init__).parameters}
    assert set(cls.argument_ranges) <= taken, f"{cls.__name__}.argument_ranges names no argument of the class: " \
                                              f"{sorted(set(cls.argument_ranges) - taken)}"
