"""The EMA of the trainable weights: its update rule, the swap validation scores it under, its checkpoint."""

from __future__ import annotations

import pytest
import torch

from ootd.config import with_overrides
from ootd.model.encoder import build_encoder
from ootd.train.averaging import WeightAverage
from ootd.train.checkpoint import shipped_weights, trainable_state


@pytest.fixture()
def encoder(tiny_config):
    model = build_encoder(with_overrides(tiny_config, ["model.unlocked_blocks=1"]).model)
    model.freeze(1)
    return model


def _shift(encoder, amount: float) -> None:
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(amount)


def test_update_follows_the_warmed_up_decay_and_leaves_frozen_weights_alone(encoder):
    start = trainable_state(encoder)
    average = WeightAverage(encoder, decay=0.99)
    assert set(average.weights) == set(start) and start  # head + the unlocked block only
    assert not any(".trunk.blocks.0." in name for name in start)
    _shift(encoder, 1.0)
    average.update(encoder)  # first update: decay min(0.99, 2/11), so the average moves 9/11 of the way
    for name, value in average.weights.items():
        torch.testing.assert_close(value, start[name] + 9 / 11)
    for _ in range(2000):
        average.update(encoder)
    for name, value in average.weights.items():
        torch.testing.assert_close(value, start[name] + 1.0)


def test_applied_swaps_the_average_in_and_the_live_weights_back(encoder):
    average = WeightAverage(encoder, decay=0.9)
    averaged = trainable_state(encoder)
    _shift(encoder, 0.5)
    live = trainable_state(encoder)
    with average.applied(encoder):
        for name, value in trainable_state(encoder).items():
            torch.testing.assert_close(value, averaged[name])
    for name, value in trainable_state(encoder).items():
        torch.testing.assert_close(value, live[name])


def test_applied_restores_the_live_weights_when_the_block_raises(encoder):
    average = WeightAverage(encoder, decay=0.9)
    _shift(encoder, 0.5)
    live = trainable_state(encoder)
    with pytest.raises(RuntimeError, match="validation failed"), average.applied(encoder):
        raise RuntimeError("validation failed")
    for name, value in trainable_state(encoder).items():
        torch.testing.assert_close(value, live[name])


def test_state_round_trips_and_refuses_another_freeze(encoder, tiny_config):
    average = WeightAverage(encoder, decay=0.95)
    _shift(encoder, 0.25)
    for _ in range(5):
        average.update(encoder)
    state = average.state_dict()
    restored = WeightAverage(encoder, decay=0.95)
    restored.load_state_dict(state)
    assert restored.updates == 5
    for name, value in restored.weights.items():
        torch.testing.assert_close(value, average.weights[name])

    other = build_encoder(with_overrides(tiny_config, ["model.unlocked_blocks=2"]).model)
    other.freeze(2)
    with pytest.raises(RuntimeError, match="does not fit"):
        WeightAverage(other, decay=0.95).load_state_dict(state)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_unit_interval_is_refused(encoder, decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(encoder, decay=decay)


def test_a_checkpoint_ships_its_average_when_it_has_one(encoder):
    average = WeightAverage(encoder, decay=0.9)
    _shift(encoder, 0.5)
    live = trainable_state(encoder)
    assert shipped_weights({"trainable": live}) is live
    with_average = {"trainable": live, "averaged": average.state_dict()}
    for name, value in shipped_weights(with_average).items():
        torch.testing.assert_close(value, average.weights[name])
        assert not torch.equal(value, live[name])
