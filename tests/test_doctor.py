"""`ootd doctor` on an offline machine: names what is missing and how to get it, fails only for the tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_doctor_names_the_missing_marqo_weights_and_passes_for_tiny(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(BIN / "ootd"), "doctor"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "[miss] backbone hf-hub:Marqo/marqo-fashionSigLIP" in out
    assert "download Marqo/marqo-fashionSigLIP" in out and "model.backbone=local-dir:" in out
    assert "[ok  ] backbone tiny" in out and "[ok  ] detector yolo-synthetic-garments.pt" in out
    assert "[ok  ] milvus-lite" in out


def test_doctor_fails_when_the_tiny_config_cannot_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ootd.detect.yolo
    from ootd.cli import app

    monkeypatch.setattr(ootd.detect.yolo, "ASSETS_DIR", tmp_path)  # a checkout without the committed detector
    result = CliRunner().invoke(app, ["doctor", "--config", "tiny"])
    assert result.exit_code == 1, result.output
    assert "[FAIL] detector yolo-synthetic-garments.pt" in result.output
    assert "fix:" in result.output
