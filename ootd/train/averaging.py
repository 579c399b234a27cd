"""Exponential moving average of the trainable weights: what validation scores and the export ships.

The last epochs of a short fine-tune wander with the order of its batches, and validation picks one single-step
snapshot of that walk. Averaging the weights over the last hundred or so steps damps the walk at no training cost
(what it bought on the demo's data is in README "Evaluation"). The average is a copy of the head and the unlocked
blocks, updated after every optimizer step on rank 0 only: DDP keeps every rank's weights equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ootd.model.encoder import StyleEncoder


class WeightAverage:
    """An EMA of an encoder's trainable parameters (head + unlocked blocks).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first n updates, so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, encoder: StyleEncoder, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.weights = {name: p.detach().clone() for name, p in _trainable(encoder)}

    def update(self, encoder: StyleEncoder) -> None:
        """Moves the average towards the encoder's current weights (call after each optimizer step)."""
        import torch

        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for name, p in _trainable(encoder):
                self.weights[name].lerp_(p.detach(), 1.0 - decay)

    @contextmanager
    def applied(self, encoder: StyleEncoder) -> Iterator[None]:
        """Within the block the encoder holds the averaged weights; its own come back afterwards."""
        from ootd.train.checkpoint import load_trainable, trainable_state

        live = trainable_state(encoder)
        load_trainable(encoder, self.weights)
        try:
            yield
        finally:
            load_trainable(encoder, live)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {name: w.cpu().clone() for name, w in self.weights.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a checkpointed average (the names must be this encoder's trainable parameters)."""
        if set(state["weights"]) != set(self.weights):
            raise RuntimeError("the checkpointed weight average does not fit this encoder's trainable parameters")
        self.updates = int(state["updates"])
        for name, value in state["weights"].items():
            self.weights[name].copy_(value)


def _trainable(encoder: StyleEncoder) -> Iterator[tuple[str, torch.Tensor]]:
    return ((name, p) for name, p in encoder.named_parameters() if p.requires_grad)
