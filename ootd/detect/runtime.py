"""Detector runtimes: picks torch, ONNX Runtime or OpenVINO and builds each export once per node, cached on disk."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx", "openvino")
EXPORTED = ("openvino", "onnx")  # fastest first on a CPU (benchmarks/results/ingest_throughput.md)
# Import names each exported runtime needs: onnx to write the graph, onnxruntime to run it.
_MODULES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
# Distributions whose versions change the exported files, so they are part of the cache key.
_DISTRIBUTIONS = {"onnx": ("onnx", "onnxruntime", "onnxslim"), "openvino": ("openvino",)}
# Where ultralytics' exporter leaves its output for weights copied in as `model.pt`.
_EXPORT_NAMES = {"onnx": "model.onnx", "openvino": "model_openvino_model"}
# Bump when the export arguments below change, so old cache entries are not reused.
_EXPORT_FORMAT = 1


class RuntimeUnavailable(RuntimeError):
    """An explicitly requested detector runtime cannot be built or loaded here."""


@dataclass(frozen=True)
class Runtime:
    """The detector runtime chosen for one Detector.

    Attributes:
        name: torch, onnx or openvino.
        model_path: what `ultralytics.YOLO` loads: the weights for torch, the cached export otherwise.
    """

    name: str
    model_path: Path


@dataclass(frozen=True)
class Export:
    """One cached export.

    Attributes:
        path: the exported model (a .onnx file or an OpenVINO model folder).
        built: True when this call exported it, False when it was already in the cache.
    """

    path: Path
    built: bool


def cache_dir() -> Path:
    """Where exports are kept: `$OOTD_CACHE_DIR/detector`, else `$XDG_CACHE_HOME/ootd/detector` (~/.cache).

    The weights' own folder is not used: the committed detector lives in the package, which may be read-only.
    An unwritable choice falls back to a per-user folder under the system temp dir.
    """
    root = os.environ.get("OOTD_CACHE_DIR")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ootd"
    return writable_dir(base.expanduser() / "detector",
                        Path(tempfile.gettempdir()) / f"ootd-cache-{os.getuid()}" / "detector")


def writable_dir(preferred: Path, fallback: Path) -> Path:
    """`preferred`, created, when this process may write there (a shared or read-only home may forbid it); else
    `fallback`, created."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def installed(runtime: str) -> bool:
    """Whether the packages `runtime` needs are importable (torch always is); nothing is imported."""
    try:
        return all(importlib.util.find_spec(module) is not None for module in _MODULES.get(runtime, ()))
    except (ImportError, ValueError):  # a module blocked in sys.modules, or a broken parent package
        return False


def is_cpu(device: str) -> bool:
    """Whether an ultralytics device string means the CPU ("cpu" or empty)."""
    return device.strip().lower() in ("", "cpu")


def preferred(device: str) -> str:
    """What `auto` means on `device`: the fastest installed CPU runtime, or torch on an accelerator."""
    if not is_cpu(device):
        return "torch"
    return next((name for name in EXPORTED if installed(name)), "torch")


def export_key(weights: Path, runtime: str, imgsz: int) -> str:
    """Cache entry name: weights stem and sha256, imgsz, runtime and the versions that produced the export."""
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    versions = "-".join(f"{dist}{_version(dist)}" for dist in ("ultralytics", "torch", *_DISTRIBUTIONS[runtime]))
    return f"{weights.stem}-{digest}-{runtime}-imgsz{imgsz}-v{_EXPORT_FORMAT}-{versions}"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution).replace("+", "_")
    except metadata.PackageNotFoundError:
        return "none"


def exported_model(weights: Path, runtime: str, imgsz: int, cache: Path | None = None) -> Export:
    """The export of `weights` for `runtime`, built with ultralytics' exporter unless already cached.

    One process per node builds it, under an exclusive lock on `<key>.lock`; the others wait and then reuse it.
    The export is written to a temp folder beside the entry and renamed into place, so a crash mid-export
    leaves no half-written entry.

    Args:
        weights: ultralytics `.pt` detection weights.
        runtime: onnx or openvino.
        imgsz: the inference size the export is traced at (the graph keeps dynamic batch and image shape).
        cache: the cache folder; `cache_dir()` when None.

    Raises:
        RuntimeUnavailable: when the runtime's packages are missing or ultralytics' export fails.
    """
    if runtime not in EXPORTED:
        raise ValueError(f"no export for detector runtime {runtime!r}; exported runtimes: {', '.join(EXPORTED)}")
    if not installed(runtime):
        raise RuntimeUnavailable(
            f"detect.runtime={runtime} needs the Python packages {' and '.join(_MODULES[runtime])}, which are not "
            f"installed (pip install {' '.join(_MODULES[runtime])}), or set detect.runtime=auto or torch."
        )
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = export_key(weights, runtime, imgsz)
    entry = cache / key
    with _exclusive(cache / f"{key}.lock"):
        if entry.exists():
            return Export(entry / _EXPORT_NAMES[runtime], built=False)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
        try:
            _export(weights, runtime, imgsz, staging)
            os.replace(staging, entry)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, RuntimeUnavailable):
                raise
            raise RuntimeUnavailable(f"exporting {weights} to {runtime} failed: {type(exc).__name__}: {exc}") from exc
    log.info("exported detector %s for %s into %s", weights.name, runtime, entry)
    return Export(entry / _EXPORT_NAMES[runtime], built=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Holds an flock on `lock_path`: concurrent Ray actors on one node export one at a time."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export(weights: Path, runtime: str, imgsz: int, out: Path) -> None:
    """Runs ultralytics' exporter on a copy of the weights in `out` (it writes beside its input)."""
    from ootd.detect.yolo import keep_torch_threads, offline_ultralytics

    ultralytics = offline_ultralytics()
    if runtime == "openvino":
        _openvino_without_telemetry()
    source = out / "model.pt"
    shutil.copyfile(weights, source)
    # The OpenVINO export traces with torch.jit, whose deprecation FutureWarnings say nothing to an ootd user.
    with keep_torch_threads(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        written = ultralytics.YOLO(str(source), task="detect").export(
            format=runtime,
            imgsz=imgsz,
            # Dynamic batch and image shape: batches go through in one call, and non-square photos get the same
            # minimal letterbox as the PyTorch model, so boxes match it.
            dynamic=True,
            batch=1,
            simplify=True,
            nms=False,
            device="cpu",
            verbose=False,
        )
    if Path(written).resolve() != (out / _EXPORT_NAMES[runtime]).resolve():
        raise RuntimeError(f"ultralytics wrote {written}, expected {out / _EXPORT_NAMES[runtime]}")
    source.unlink()


def _openvino_without_telemetry() -> None:
    """Points OpenVINO's model converter at its own no-op telemetry stub.

    Without a consent file, `openvino.convert_model` sends usage events to Google Analytics (openvino_telemetry
    treats "no file" as consent when its dialog is off, as the converter sets it); an ootd export must not phone
    out. The stub ships with OpenVINO for installs without the telemetry package.
    """
    import openvino.tools.ovc.convert_impl as convert_impl
    import openvino.tools.ovc.telemetry_stub as stub
    import openvino.tools.ovc.telemetry_utils as telemetry_utils
    import openvino.tools.ovc.utils as ovc_utils

    for module in (convert_impl, telemetry_utils, ovc_utils):
        if hasattr(module, "tm"):
            module.tm = stub


def choose(runtime: str, device: str, weights: Path, imgsz: int) -> Runtime:
    """The runtime a Detector uses, with its export built or taken from the cache.

    `auto` takes `preferred(device)`; if building that export fails it logs one WARNING and uses torch. An
    explicit runtime that cannot be built raises.

    Args:
        runtime: detect.runtime (auto, torch, onnx or openvino).
        device: detect.device.
        weights: resolved `.pt` weights.
        imgsz: detect.imgsz.

    Raises:
        RuntimeUnavailable: for an explicit onnx/openvino that cannot be built.
        ValueError: for an unknown runtime name.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown detect.runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    name = preferred(device) if runtime == "auto" else runtime
    if name == "torch":
        return Runtime("torch", weights)
    try:
        return Runtime(name, exported_model(weights, name, imgsz).path)
    except RuntimeUnavailable as exc:
        if runtime != "auto":
            raise
        log.warning("detect.runtime=auto: %s; running the detector on PyTorch instead", exc)
        return Runtime("torch", weights)


def configure_backend(model: Any, runtime: Runtime, threads: int) -> None:
    """Rebuilds the loaded ONNX Runtime session / OpenVINO compiled model with `threads` threads and fp32 math.

    Both default to every core of the machine, which ignores the CPUs Ray reserved for this actor: two detector
    actors on 2 cores would run 4 busy threads. OpenVINO also defaults to bf16 on CPUs that have it (AMX,
    AVX512-BF16), which moves boxes by pixels (outfit-box IoU 0.95 against PyTorch on the committed detector);
    fp32 keeps them equal to PyTorch's. Ultralytics offers no option for either, so the session it made on the
    first predict is replaced in its backend. Needs a model that has predicted once.

    Args:
        model: an `ultralytics.YOLO` loaded from `runtime.model_path`, whose predictor is set up.
        runtime: the runtime it was loaded for (torch is left alone: torch threads are set by the caller).
        threads: inference threads, normally torch's count for this process.
    """
    backend = getattr(getattr(getattr(model, "predictor", None), "model", None), "backend", None)
    if backend is None:
        return
    if runtime.name == "onnx" and hasattr(backend, "session"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = backend.session.get_providers()
        backend.session = onnxruntime.InferenceSession(str(runtime.model_path), options, providers=providers)
    elif runtime.name == "openvino" and isinstance(getattr(backend, "compile_model", None), partial):
        compile_model = backend.compile_model
        # No core pinning: actors sharing a node would each pin their threads to the same first cores.
        config = {**compile_model.keywords.get("config", {}), "INFERENCE_NUM_THREADS": threads,
                  "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "f32"}  # fmt: skip
        backend.compile_model = partial(compile_model.func, *compile_model.args,
                                        **{**compile_model.keywords, "config": config})  # fmt: skip
        core = getattr(compile_model.func, "__self__", None) or backend.ov.Core()
        backend.ov_compiled_model = backend.compile_model(core.read_model(model=str(_openvino_xml(runtime.model_path))))


def _openvino_xml(path: Path) -> Path:
    return path if path.suffix == ".xml" else next(path.glob("*.xml"))
