"""The training run's checkpoints: what a worker saves each epoch, how a resumed run checks and loads it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ootd.model.encoder import StyleEncoder
    from ootd.train.worker import LoopSettings

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
SCORE = "val_map_at_10"  # checkpoints are ranked by this (higher is better)


def report_with_checkpoint(metrics: dict[str, Any], state: dict[str, Any], history: list[dict]) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        # Readable without torch or the optimizer state: the driver returns it as the run's history.
        Path(tmp, HISTORY_FILE).write_text(json.dumps(history, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def trainable_state(encoder: StyleEncoder) -> dict[str, torch.Tensor]:
    """Only what training changes (head + unlocked blocks): the frozen trunk is rebuilt from the backbone name."""
    return {name: p.detach().cpu().clone() for name, p in encoder.named_parameters() if p.requires_grad}


def shipped_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint exports: the weight average its validation scored (train.ema_decay),
    else the live weights."""
    return state["averaged"]["weights"] if "averaged" in state else state["trainable"]


def load_trainable(encoder: StyleEncoder, state: dict[str, torch.Tensor]) -> None:
    """Loads `trainable_state` output back into an encoder frozen the same way.

    Raises:
        RuntimeError: when the names do not match the encoder's trainable parameters.
    """
    import torch

    params = dict(encoder.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise RuntimeError(f"checkpoint does not fit this encoder: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def compat(settings: LoopSettings) -> dict[str, Any]:
    m = settings.model
    return {
        "backbone": m.backbone,
        "head": m.head,
        "embed_dim": m.embed_dim,
        "head_hidden": m.head_hidden,
        "unlocked_blocks": m.unlocked_blocks,
        "labels": list(settings.labels),
    }


def check_compatible(state: dict[str, Any], settings: LoopSettings) -> None:
    theirs, ours = state.get("compat", {}), compat(settings)
    diff = sorted(key for key in ours if theirs.get(key) != ours[key])
    if diff:
        raise RuntimeError(
            f"the run's latest checkpoint was trained with a different {', '.join(diff)} "
            f"({[theirs.get(d) for d in diff]} vs {[ours[d] for d in diff]}): "
            "pick a new name with --set train.run_name=... to start a fresh run"
        )
