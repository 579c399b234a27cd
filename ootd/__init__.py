"""ootd: outfit photos in, 128-d style embeddings out, style-similar outfits served over HTTP."""

__version__ = "0.1.0"
