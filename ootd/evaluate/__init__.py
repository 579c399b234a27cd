"""Held-out evaluation: retrieval metrics, baselines, report and plots."""

from ootd import lazy_exports

_EXPORTS = {"evaluate": "run", "retrieval_metrics": "metrics"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
