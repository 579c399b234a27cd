"""YOLO garment detection, the only ultralytics import in ootd: offline-safe loading and batched boxes.

The runtime (PyTorch, ONNX Runtime or OpenVINO, `detect.runtime`) is chosen and exported in ootd.detect.runtime;
predicting and reading boxes is ultralytics' own code for all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ootd.detect.boxes import OutfitBox, outfit_box
from ootd.detect.runtime import Runtime, RuntimeUnavailable, choose, configure_backend, writable_dir

if TYPE_CHECKING:
    from ootd.config import DetectConfig

ASSETS_DIR = Path(__file__).parents[1] / "assets"

# Ultralytics integrations that would log to (or phone) an external service from inside training.
_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_import_lock = threading.Lock()
log = logging.getLogger(__name__)
_ultralytics: ModuleType | None = None


@dataclass(frozen=True)
class Detections:
    """Raw detections for one image.

    Attributes:
        boxes: (n, 4) float32 boxes x1, y1, x2, y2 in source pixels.
        scores: (n,) float32 confidences.
        classes: (n,) int64 class ids of the detector.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def resolve_weights(weights: str) -> Path:
    """Finds detector weights on disk without ever downloading them.

    A path that exists is used as is; a bare file name that does not exist in the working directory is looked
    up in `ootd/assets/` (where the committed synthetic-garment detector lives).

    Args:
        weights: a path to an ultralytics `.pt` file, or a bare name such as `yolo-synthetic-garments.pt`.

    Raises:
        FileNotFoundError: when the weights are nowhere on disk; the message says how to get some.
    """
    if not weights:
        raise FileNotFoundError("detect.weights is empty: " + _how_to_get_weights("<weights>.pt"))
    path = Path(weights).expanduser()
    if path.is_file():
        return path.resolve()
    tried = [str(path)]
    if len(path.parts) == 1:
        asset = ASSETS_DIR / path.name
        if asset.is_file():
            return asset.resolve()
        tried.append(str(asset))
    raise FileNotFoundError(f"detector weights {weights!r} not found (looked at: {', '.join(tried)}). "
                            + _how_to_get_weights(path.name))


def weights_sha256(weights: str) -> str | None:
    """sha256 of the detector weights `weights` resolves to, or None when they are nowhere on disk (the detect stage
    reports that): a file replaced under the same name cuts other crops, which only its content tells."""
    import hashlib

    try:
        return hashlib.sha256(resolve_weights(weights).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _how_to_get_weights(name: str) -> str:
    return (
        "ootd never downloads detector weights. Either train one on YOLO-format data with "
        "`ootd train-detector --data DATA.yaml --out DIR` and set detect.weights=DIR/best.pt, or copy a COCO "
        f"model such as yolo11n.pt to {ASSETS_DIR}/ (or give its path) and set detect.weights=yolo11n.pt "
        "detect.class_ids=[0] (person)."
        + (f" A missing {name!r} under ootd/assets/ means the checkout lacks the committed detector." if name else "")
    )


def _private_config_dir() -> Path:
    """A writable settings dir for ultralytics that no other tool (or user setting) shares."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ootd" / "ultralytics"
    return writable_dir(base, Path(tempfile.gettempdir()) / f"ootd-ultralytics-{os.getuid()}")


def _local_font(font: str = "Arial.ttf") -> Path | str | None:
    """Stands in for ultralytics' check_font: a font already on disk, never a download.

    Ultralytics calls check_font while checking every dataset (and when plotting); offline its HEAD request to
    GitHub stalls for seconds or fails. Matplotlib always ships DejaVuSans, which is all labels need.
    """
    from matplotlib import font_manager

    name = Path(font).name
    for entry in font_manager.fontManager.ttflist:
        if name in entry.fname and os.path.exists(entry.fname):
            return entry.fname
    return font_manager.findfont("DejaVu Sans", fallback_to_default=True)


def offline_ultralytics() -> ModuleType:
    """Imports ultralytics once, with every network path switched off, and returns the module.

    Before the import: `YOLO_OFFLINE=1` (so its online probe, analytics and update checks stay off),
    `YOLO_AUTOINSTALL=false` (a missing export or runtime package is an error, never a pip install) and a
    private `YOLO_CONFIG_DIR` (its settings file is written on import; a shared or read-only home must not break
    that). After it: settings sync, auto-installs and all logging integrations off, and `check_font` replaced by a
    local lookup. Ultralytics also sets `OMP_NUM_THREADS=1` on import; the caller's value is restored so
    processes started later (Ray workers, data loaders) are not throttled to one thread.
    """
    global _ultralytics
    with _import_lock:
        if _ultralytics is not None:
            return _ultralytics
        import torch  # first, so its thread pool is sized by the caller's environment, not ultralytics'

        threads = torch.get_num_threads()
        omp = os.environ.get("OMP_NUM_THREADS")
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_AUTOINSTALL"] = "false"
        if "ultralytics" not in sys.modules:
            os.environ["YOLO_CONFIG_DIR"] = str(_private_config_dir())
        # A Platform API key makes training upload metrics and weights; ootd training stays local.
        os.environ.pop("ULTRALYTICS_API_KEY", None)
        try:
            import ultralytics
            from ultralytics.utils import SETTINGS
        finally:
            if omp is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = omp
            torch.set_num_threads(threads)
        private = Path(os.environ["YOLO_CONFIG_DIR"]) if "YOLO_CONFIG_DIR" in os.environ else _private_config_dir()
        # Default run/weights dirs are relative to the cwd (often the repo); keep stray outputs out of it.
        wanted: dict[str, Any] = {
            "sync": False, "api_key": "", "runs_dir": str(private / "runs"), "weights_dir": str(private / "weights"),
            **dict.fromkeys(_INTEGRATIONS, False),
        }
        if any(SETTINGS.get(k) != v for k, v in wanted.items()):
            SETTINGS.update(wanted)
        import ultralytics.data.utils as data_utils
        import ultralytics.utils.checks as checks
        import ultralytics.utils.plotting as plotting

        for module in (checks, data_utils, plotting):
            if hasattr(module, "check_font"):
                module.check_font = _local_font
        # The flag is read once on import; an ultralytics imported before this function must not install either.
        checks.AUTOINSTALL = False
        _keep_pil_open_offline()
        _ultralytics = ultralytics
        return ultralytics


def _keep_pil_open_offline() -> None:
    """Ultralytics patches `PIL.Image.open` process-wide: on an unidentified image it runs `check_requirements`
    ("pi-heif", a pip install attempt) and raises ModuleNotFoundError instead of UnidentifiedImageError. That would
    turn every non-image upload or crawled file in a detector process into a network call and a wrong error, so
    the original opener is put back (ootd reads no HEIF)."""
    from PIL import Image

    try:
        from ultralytics.utils import patches
    except ImportError:  # an ultralytics without the patch
        return
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = original


@contextlib.contextmanager
def keep_torch_threads(threads: int | None = None) -> Iterator[None]:
    """Holds torch at the caller's thread count (or `threads`) during ultralytics calls, then restores it.

    Ultralytics' `select_device` sets torch to `min(8, cpu_count - 1)` threads on every predictor/trainer setup,
    which ignores the CPUs Ray reserved for this process. The caller's count, set by Ray from the actor's
    `num_cpus` or by the user, is the one that should hold. On a CPU shared with other busy processes, pass
    `threads=1`: a multi-threaded torch then spends most of its time waiting at OpenMP barriers (measured on a
    2-core box under load: 1 thread 1.2 s per training step, 2 threads 18 s).

    Args:
        threads: torch intra-op threads inside the block; None keeps the current count.
    """
    import torch
    import ultralytics.utils.torch_utils as torch_utils

    before = torch.get_num_threads()
    inside = threads if threads is not None else before
    previous = torch_utils.NUM_THREADS
    torch_utils.NUM_THREADS = inside
    torch.set_num_threads(inside)
    try:
        yield
    finally:
        torch_utils.NUM_THREADS = previous
        torch.set_num_threads(before)


def to_bgr(image: Any, index: int = 0) -> np.ndarray:
    """One image as the contiguous uint8 HxWx3 BGR array ultralytics expects for numpy input.

    Args:
        image: RGB uint8 array (HxW grayscale, HxWx1, HxWx3 or HxWx4 with alpha), or a PIL image.
        index: position in the batch, for error messages.

    Raises:
        ValueError: for an empty image, a non-uint8 array or an unsupported shape.
    """
    if not isinstance(image, np.ndarray):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - PIL is a core dependency
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        else:
            raise ValueError(f"image {index}: expected a numpy array or PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image {index}: expected dtype uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {index}: expected HxW, HxWx1, HxWx3 or HxWx4 with H, W > 0, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    return np.ascontiguousarray(image[:, :, 2::-1])  # RGB(A) -> BGR, alpha dropped


class Detector:
    """A YOLO garment detector loaded once; turns batches of RGB images into boxes and outfit boxes."""

    def __init__(self, cfg: DetectConfig):
        """Loads the weights named by `cfg.weights` (see `resolve_weights`) on the runtime `cfg.runtime`.

        Never downloads. For onnx/openvino the cached export is used or built once (ootd.detect.runtime), then
        warmed up with one prediction and held to this process's torch thread count and to fp32.

        Args:
            cfg: the detect section of the config.

        Raises:
            FileNotFoundError: when the weights are not on disk.
            ValueError: when the file is not an ultralytics detection model.
            RuntimeUnavailable: when an explicit onnx/openvino runtime cannot be built or loaded.
        """
        import torch

        self.cfg = cfg
        self.weights = resolve_weights(cfg.weights)
        ultralytics = offline_ultralytics()
        self.runtime: Runtime = choose(cfg.runtime, cfg.device, self.weights, cfg.imgsz)
        if self.runtime.name == "torch":
            self._model = self._load(ultralytics, self.runtime)
        else:
            try:
                self._model = self._load(ultralytics, self.runtime)
                self._warm_up()
                configure_backend(self._model, self.runtime, torch.get_num_threads())
            except Exception as exc:  # noqa: BLE001 - any load failure of an export; auto falls back below
                if cfg.runtime != "auto":
                    raise RuntimeUnavailable(f"cannot run detector export {self.runtime.model_path}: {exc}") from exc
                log.warning("detect.runtime=auto: cannot run the %s export (%s); using PyTorch", self.runtime.name,
                            exc)  # fmt: skip
                self.runtime = Runtime("torch", self.weights)
                self._model = self._load(ultralytics, self.runtime)
        if self._model.task != "detect":
            raise ValueError(f"{self.weights} is a {self._model.task!r} model; ootd needs a detection model")
        self.names: dict[int, str] = {int(k): str(v) for k, v in self._model.names.items()}

    def _load(self, ultralytics: ModuleType, runtime: Runtime) -> Any:
        with keep_torch_threads():
            try:
                return ultralytics.YOLO(str(runtime.model_path), task="detect")
            except Exception as exc:  # ultralytics raises many types for a file it cannot read
                raise ValueError(f"cannot load detector weights {runtime.model_path}: {exc}") from exc

    def _warm_up(self) -> None:
        """One prediction: sets up ultralytics' predictor (and compiles the OpenVINO model) before real work."""
        self._detect_bgr([np.zeros((self.cfg.imgsz, self.cfg.imgsz, 3), np.uint8)])

    def detect(self, images: Sequence[Any]) -> list[Detections]:
        """Detects garments in a batch of images.

        Images go to ultralytics in chunks of `cfg.batch_size` (one call for a batch that size or smaller),
        with `cfg.conf`, `cfg.iou`, `cfg.imgsz` and `cfg.device`. All classes are returned; filtering by
        `cfg.class_ids` happens in `outfit_boxes`.

        Args:
            images: RGB uint8 arrays HxWx3 (HxW grayscale and HxWx4 are accepted too).

        Returns:
            One `Detections` per image, in input order.

        Raises:
            ValueError: when any image is not a usable array (nothing is run then).
        """
        return self._detect_bgr([to_bgr(image, i) for i, image in enumerate(images)])

    def _detect_bgr(self, arrays: list[np.ndarray]) -> list[Detections]:
        out: list[Detections] = []
        step = self.cfg.batch_size
        for start in range(0, len(arrays), step):
            chunk = arrays[start : start + step]
            with keep_torch_threads():
                results = self._model.predict(
                    chunk,
                    conf=self.cfg.conf,
                    iou=self.cfg.iou,
                    imgsz=self.cfg.imgsz,
                    device=self.cfg.device,
                    batch=len(chunk),
                    verbose=False,
                    save=False,
                )
            for result in results:
                boxes = result.boxes
                out.append(
                    Detections(
                        boxes=boxes.xyxy.cpu().numpy().astype(np.float32).reshape(-1, 4),
                        scores=boxes.conf.cpu().numpy().astype(np.float32).reshape(-1),
                        classes=boxes.cls.cpu().numpy().astype(np.int64).reshape(-1),
                    )
                )
        return out

    def outfit_boxes(self, images: Sequence[Any]) -> list[OutfitBox]:
        """The outfit box of each image: union of its kept garment boxes, padded and clamped (with
        `cfg.flip_average`, the mean of that union and the one found in the image's mirror).

        Kept means class in `cfg.class_ids`, confidence >= `cfg.conf` and >= `cfg.relative_conf` times the
        image's best kept garment, and both sides >= `cfg.min_box_size`;
        the union is padded by `cfg.pad`. An image with no kept box gets the whole image, `fallback=True`.

        Args:
            images: RGB uint8 arrays HxWx3 (HxW grayscale and HxWx4 are accepted too).
        """
        arrays = [to_bgr(image, i) for i, image in enumerate(images)]
        if not self.cfg.flip_average:
            found = self._detect_bgr(arrays)
            return [outfit_box_from(det, width=a.shape[1], height=a.shape[0], cfg=self.cfg)
                    for det, a in zip(found, arrays, strict=True)]  # fmt: skip
        # Both views in one pass, so a batch of n photos is chunked as 2n images.
        found = self._detect_bgr(arrays + [np.ascontiguousarray(a[:, ::-1]) for a in arrays])
        return [outfit_box_from(det, width=a.shape[1], height=a.shape[0], cfg=self.cfg, mirrored=mirror)
                for det, mirror, a in zip(found[:len(arrays)], found[len(arrays):], arrays, strict=True)]  # fmt: skip


def outfit_box_from(det: Detections, *, width: int, height: int, cfg: DetectConfig,
                    mirrored: Detections | None = None) -> OutfitBox:  # fmt: skip
    """The outfit box for one image's detections under the filters of `cfg`.

    Args:
        det: detections of one image.
        width: image width in pixels.
        height: image height in pixels.
        cfg: supplies class_ids, conf (minimum score), relative_conf, min_box_size and pad.
        mirrored: detections of the image's left-right mirror (`detect.flip_average`), averaged with `det`'s.
    """
    return outfit_box(
        det.boxes.tolist(),
        det.scores.tolist(),
        det.classes.tolist(),
        width=width,
        height=height,
        class_ids=cfg.class_ids,
        min_score=cfg.conf,
        min_size=cfg.min_box_size,
        relative_score=cfg.relative_conf,
        pad=cfg.pad,
        mirrored=None if mirrored is None else (mirrored.boxes.tolist(), mirrored.scores.tolist(),
                                                mirrored.classes.tolist()),  # fmt: skip
    )
