"""Environment checks behind `ootd doctor`: versions, Ray, Milvus Lite, local model weights — each with its fix."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ootd.config import Config, load_config

PACKAGES = (
    "torch", "torchvision", "ray", "open_clip_torch", "timm", "ultralytics", "pymilvus", "milvus-lite", "pyarrow",
)


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    # Required checks fail the command; optional ones (the production model) only advise.
    required: bool = True


def versions() -> list[Check]:
    """Installed versions of the packages ootd is built on."""
    checks = [Check("python", True, platform.python_version())]
    for package in PACKAGES:
        try:
            checks.append(Check(package, True, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(package, False, "not installed", fix="make test (creates .venv and installs ootd)"))
    return checks


# Runs in a child process: the doctor checks that Ray starts, and a library never starts Ray in its caller's process.
_RAY_PROBE = """
import sys, tempfile, ray
with tempfile.TemporaryDirectory(prefix="ootd-doctor-", dir="/tmp") as tmp:
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    try:
        sys.exit(0 if ray.get(ray.remote(lambda: 42).options(num_cpus=0.1).remote()) == 42 else 1)
    finally:
        ray.shutdown()
"""


def check_ray() -> Check:
    """Starts a throwaway local Ray instance in a child process and runs one task on it."""
    fix = "check /tmp is writable and no stale `ray start` holds ports"
    try:
        done = subprocess.run([sys.executable, "-c", _RAY_PROBE], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return Check("ray", False, "a local Ray instance did not start within 180 s", fix=fix)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return Check("ray", False, f"could not start: {tail[0]}", fix=fix)
    return Check("ray", True, "local Ray started and ran a task")


def check_milvus_lite() -> Check:
    """Opens an embedded Milvus Lite file, writes and reads one collection."""
    try:
        from pymilvus import MilvusClient

        with tempfile.TemporaryDirectory(prefix="ootd-doctor-") as tmp:
            client = MilvusClient(str(Path(tmp) / "doctor.db"))
            client.create_collection("doctor", dimension=4)
            client.insert("doctor", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
            hits = client.search("doctor", [[0.1, 0.2, 0.3, 0.4]], limit=1)
            client.close()
        return Check("milvus-lite", hits[0][0]["id"] == 1, "embedded Milvus Lite opened, wrote and searched")
    except Exception as exc:  # noqa: BLE001
        return Check("milvus-lite", False, f"could not open: {exc}", fix="pip install 'milvus-lite>=2.5' (Linux/macOS)")


def check_backbone(config: Config, required: bool) -> Check:
    """Whether the configured backbone's weights are on this machine, without loading them (same lookup as loading)."""
    from ootd.model.backbones import ModelNotAvailable, locate_weights

    label = f"backbone {config.model.backbone}"
    try:
        return Check(label, True, locate_weights(config.model.backbone), required=required)
    except ModelNotAvailable as exc:
        return Check(label, False, "weights not on this machine (nothing is downloaded at run time)", fix=str(exc),
                     required=required)
    except ValueError as exc:
        return Check(label, False, str(exc), fix="use hf-hub:REPO, local-dir:PATH or tiny", required=required)


def check_detector(config: Config, required: bool) -> Check:
    """Whether the configured detector weights resolve to a local file."""
    label = f"detector {config.detect.weights}"
    try:
        from ootd.detect.yolo import resolve_weights

        path = resolve_weights(config.detect.weights)
        return Check(label, True, f"found {path}", required=required)
    except FileNotFoundError as exc:
        return Check(label, False, "weights not on this machine", fix=str(exc), required=required)


def run_checks(config_name: str = "default") -> list[Check]:
    """All checks; the tiny config's needs are required, the chosen config's models are advisory."""
    checks = versions() + [check_ray(), check_milvus_lite()]
    tiny = load_config("tiny")
    checks += [check_backbone(tiny, required=True), check_detector(tiny, required=True)]
    if config_name != "tiny":
        chosen = load_config(config_name)
        checks += [check_backbone(chosen, required=False), check_detector(chosen, required=False)]
    return checks
