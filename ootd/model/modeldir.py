"""The exported model dir's file names and metadata (DESIGN §4), readable without torch (the serve ingress does)."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path

MODEL_META = "ootd_model.json"
HEAD_WEIGHTS = "head.safetensors"
BACKBONE_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
FORMAT_VERSION = 1


def new_model_version() -> str:
    """A fresh, sortable model version such as `v20261123t193000_ab12cd` (valid in a Milvus collection name)."""
    return datetime.now(timezone.utc).strftime("v%Y%m%dt%H%M%S") + "_" + secrets.token_hex(3)


def model_info(model_dir: str | Path) -> tuple[str, int]:
    """(model version, embedding dim) of an exported model dir, read from its `ootd_model.json` (no weights load).

    Raises:
        FileNotFoundError: when the dir is not an exported model.
        ValueError: when the metadata lacks a version or dim.
    """
    meta_path = Path(model_dir) / MODEL_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not an exported ootd model dir (no {MODEL_META}); "
                                "train one with `ootd train` or pass the dir `StyleEncoder.export` wrote")
    meta = json.loads(meta_path.read_text())
    version, dim = meta.get("version"), meta.get("embed_dim")
    if not isinstance(version, str) or not version or not isinstance(dim, int):
        raise ValueError(f"{meta_path}: needs a string `version` and an integer `embed_dim`")
    return version, dim
