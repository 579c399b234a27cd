"""Stable train/val/test assignment from the image id, identical in every job and on every worker."""

from __future__ import annotations

from typing import Literal

Split = Literal["train", "val", "test"]


def split_of(image_id: str, val_fraction: float, test_fraction: float) -> Split:
    """Assigns an image to a split by its sha256 id, so re-ingesting or adding photos never moves old ones.

    Args:
        image_id: lowercase hex sha256 of the image bytes.
        val_fraction: share of images in the validation split.
        test_fraction: share of images in the held-out test split.
    """
    # The id is already a uniform hash; its leading 32 bits give a position in [0, 1).
    position = int(image_id[:8], 16) / 2**32
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"
