"""The one warm-up helper every ramped loss uses: linear in the epochs done, counted per step."""
import math

import pytest

from kd.losses.batch import Progress
from kd.losses.schedule import ramp


def at_end_of(epoch, epochs, steps=10):
    return Progress(epoch, steps - 1, steps, epochs)


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 10, 11, 240])
def test_fraction_of_the_run_at_every_epoch_end(epochs):
    length = 0.5 * epochs
    for epoch in range(epochs):
        assert ramp(at_end_of(epoch, epochs), fraction=0.5) == pytest.approx(min(1.0, (epoch + 1) / length))


def test_three_epochs_ramp_over_one_and_a_half():
    assert [ramp(at_end_of(e, 3), fraction=0.5) for e in range(3)] == pytest.approx([2 / 3, 1, 1])


def test_a_one_epoch_run_still_ramps_step_by_step():
    factors = [ramp(Progress(0, step, 10, 1), fraction=0.5) for step in range(10)]
    assert factors == pytest.approx([0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1])


def test_a_fixed_number_of_epochs_whatever_the_run_length():
    # DKD's authors warm up over 20 of 240 epochs; as a fraction that is 1/12 of any kd_epochs
    assert ramp(at_end_of(0, 240), epochs=20) == pytest.approx(1 / 20)
    assert ramp(at_end_of(0, 240), fraction=20 / 240) == pytest.approx(1 / 20)
    assert ramp(at_end_of(0, 24), fraction=20 / 240) == pytest.approx(1 / 2)
    assert ramp(at_end_of(19, 240), epochs=20) == 1.0


def test_no_warm_up_and_no_progress_give_the_full_weight():
    assert ramp(at_end_of(0, 10), fraction=0) == 1.0 and ramp(None, epochs=5) == 1.0


def test_exactly_one_length_is_given():
    with pytest.raises(ValueError, match="exactly one of epochs or fraction"):
        ramp(at_end_of(0, 10))
    with pytest.raises(ValueError, match="exactly one of epochs or fraction"):
        ramp(at_end_of(0, 10), epochs=2, fraction=0.1)


def test_the_cosine_curriculum_rises_along_half_a_cosine():
    from kd.losses.schedule import cosine_ramp
    values = [cosine_ramp(Progress(0, step, 4, 2), fraction=0.5) for step in range(4)]
    assert values == pytest.approx([0.5 - 0.5 * math.cos(math.pi * k / 4) for k in (1, 2, 3, 4)])
    assert cosine_ramp(None, fraction=0.5) == 1.0
