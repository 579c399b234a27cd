"""Model dirs on disk: `export_model` writes one atomically, `load` reads it back into a `StyleEncoder`.

A model dir is open_clip's `local-dir:` layout (config + safetensors trunk) plus ootd's head and `ootd_model.json`
(file names and the torch-free reader in `ootd.model.modeldir`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ootd.model import backbones
from ootd.model.backbones import ModelNotAvailable
from ootd.model.modeldir import (
    BACKBONE_WEIGHTS,
    FORMAT_VERSION,
    HEAD_WEIGHTS,
    MODEL_META,
    OPEN_CLIP_CONFIG,
    new_model_version,
)

if TYPE_CHECKING:
    from ootd.config import Config
    from ootd.model.encoder import StyleEncoder


def export_model(
    encoder: StyleEncoder,
    out_dir: str | Path,
    *,
    version: str | None = None,
    labels: Iterable[str] = (),
    metrics: dict | None = None,
    config: Config | None = None,
    unlocked_blocks: int | None = None,
) -> Path:
    """`StyleEncoder.export` (documented there): the model dir, published atomically."""
    from safetensors.torch import save_file

    import ootd
    from ootd.config import config_to_dict

    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; export to a new model dir")
    version = version or new_model_version()
    labels = [str(label) for label in labels] or list(encoder.labels)
    meta = {
        "format": FORMAT_VERSION,
        "version": version,
        "embed_dim": encoder.embed_dim,
        "feature_dim": encoder.feature_dim,
        "head": encoder.head_kind,
        "head_hidden": encoder.head_hidden,
        "backbone": encoder.backbone,
        "labels": labels,
        "preprocess": encoder.preprocess_cfg,
        "unlocked_blocks": encoder.unlocked_blocks if unlocked_blocks is None else int(unlocked_blocks),
        "metrics": metrics or {},
        "config": config_to_dict(config) if config is not None else None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ootd_version": ootd.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        open_clip_config = {"model_cfg": encoder.model_cfg, "preprocess_cfg": encoder.preprocess_cfg}
        (staging / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config, indent=2))
        save_file(_cpu_state(encoder.clip), str(staging / BACKBONE_WEIGHTS))
        save_file(_cpu_state(encoder.head), str(staging / HEAD_WEIGHTS))
        (staging / MODEL_META).write_text(json.dumps(meta, indent=2, default=_json_default))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    encoder.version, encoder.labels = version, labels
    return out


def load(model_dir: str | Path, device: str = "cpu") -> StyleEncoder:
    """Reads a model dir written by `StyleEncoder.export` back into an encoder (eval mode).

    Args:
        model_dir: the exported folder.
        device: torch device for the weights (`cpu`, `cuda`, `cuda:1`).

    Raises:
        ModelNotAvailable: the folder or one of its files is missing.
        ValueError: `ootd_model.json` is malformed.
    """
    from safetensors.torch import load_file

    folder = Path(model_dir).expanduser().absolute()
    meta_path = folder / MODEL_META
    if not meta_path.is_file():
        raise ModelNotAvailable(
            f"{folder} is not an exported ootd model dir (no {MODEL_META}); pass a dir written by training/export"
        )
    try:
        meta = json.loads(meta_path.read_text())
        kind, embed_dim, hidden = meta["head"], int(meta["embed_dim"]), int(meta["head_hidden"])
        feature_dim, unlocked = int(meta["feature_dim"]), int(meta.get("unlocked_blocks", 0))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: malformed model metadata ({exc!r})") from exc
    if not (folder / HEAD_WEIGHTS).is_file():
        raise ModelNotAvailable(f"{folder}: {HEAD_WEIGHTS} missing; the model dir is incomplete, re-export it")
    clip_model, model_cfg = backbones.create_open_clip(f"{backbones.LOCAL_DIR_PREFIX}{folder}")
    from ootd.model.encoder import StyleEncoder

    encoder = StyleEncoder(
        clip_model,
        backbone=str(meta.get("backbone") or f"{backbones.LOCAL_DIR_PREFIX}{folder}"),
        model_cfg=model_cfg,
        head=kind,
        embed_dim=embed_dim,
        head_hidden=hidden,
        version=str(meta.get("version", "")),
        labels=meta.get("labels") or (),
    )
    if encoder.feature_dim != feature_dim:
        raise ValueError(f"{meta_path}: feature_dim {feature_dim} but the backbone yields {encoder.feature_dim}")
    encoder.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)), strict=True)
    encoder.freeze(unlocked)
    return encoder.to(torch.device(device)).eval()


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared CPU tensors.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in module.state_dict().items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to {MODEL_META}")
