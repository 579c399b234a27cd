"""Environment checks behind `ootd doctor`: versions, Ray, Milvus Lite, local model weights — each with its fix."""

from __future__ import annotations

import importlib.metadata
import os
import platform
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


def check_ray() -> Check:
    """Starts a throwaway local Ray instance and runs one task on it."""
    try:
        import ray

        if ray.is_initialized():
            return Check("ray", True, "already connected to a cluster")
        with tempfile.TemporaryDirectory(prefix="ootd-doctor-", dir="/tmp") as tmp:
            ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
            try:
                value = ray.get(ray.remote(lambda: 42).options(num_cpus=0.1).remote())
            finally:
                ray.shutdown()
        return Check("ray", value == 42, "local Ray started and ran a task")
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure instead of raising
        return Check("ray", False, f"could not start: {exc}",
                     fix="check /tmp is writable and no stale `ray start` holds ports")


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
    """Whether the configured backbone's weights are on this machine, without loading them."""
    name = config.model.backbone
    label = f"backbone {name}"
    if name == "tiny":
        return Check(label, True, "built in (offline test model, not fashion-aware)", required=required)
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:")).expanduser()
        weights = [p for p in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if (folder / p).exists()]
        if (folder / "open_clip_config.json").exists() and weights:
            return Check(label, True, f"found {folder / weights[0]}", required=required)
        return Check(
            label, False, f"{folder} lacks open_clip_config.json or open_clip_model.safetensors",
            fix=f"put the model files in {folder} (see README: Models)", required=required,
        )  # fmt: skip
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:")
        path = _hf_cached(repo)
        if path:
            return Check(label, True, f"in the local Hugging Face cache ({path})", required=required)
        return Check(
            label, False, "weights not on this machine (nothing is downloaded at run time)",
            fix=(f"on a machine with internet: `huggingface-cli download {repo} --local-dir DIR`, copy DIR here, "
                 f"then pass `--set model.backbone=local-dir:DIR`"),
            required=required,
        )  # fmt: skip
    return Check(label, False, "unknown backbone scheme", fix="use hf-hub:REPO, local-dir:PATH or tiny",
                 required=required)


def _hf_cached(repo: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.exists(found):
            return found
    return None


def check_detector(config: Config, required: bool) -> Check:
    """Whether the configured detector weights resolve to a local file."""
    label = f"detector {config.detect.weights}"
    try:
        from ootd.detect import resolve_weights

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
