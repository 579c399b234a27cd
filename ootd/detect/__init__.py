"""Garment detection: pure box math, the ultralytics YOLO wrapper, detector training."""

from ootd import lazy_exports

_EXPORTS = {"Detector": "yolo", "OutfitBox": "boxes", "outfit_box": "boxes", "train_detector": "training"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
