"""Fine-tuning on Ray Train: driver, per-worker loop, class-balanced batches, frozen-trunk feature cache."""

from ootd import lazy_exports

_EXPORTS = {"run_training": "driver", "train_loop_per_worker": "worker"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
