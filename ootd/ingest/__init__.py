"""Ingest: crawled photos → crops and errors tables through a Ray Data pipeline."""

from ootd import lazy_exports

_EXPORTS = {"run_ingest": "pipeline", "list_inputs": "pipeline"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
