"""Storage: Milvus collections behind a live alias, row validation, the crop media store."""

from ootd import lazy_exports

_EXPORTS = {"MilvusStore": "milvus", "Hit": "rows", "MediaStore": "media"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
