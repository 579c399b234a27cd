"""Stable train/val/test assignment from the image id (or its near-duplicate group), identical in every job."""

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


def group_split_of(image_id: str, near_dup_of: str | None, val_fraction: float, test_fraction: float) -> Split:
    """The split of a crops-table row, keeping each near-duplicate group in one split.

    A resized, recompressed, cropped or mirrored copy of a photo in another split would leak it between train
    and evaluation, so a row is placed by its group's representative (`near_dup_of`) when it has one.

    Args:
        image_id: the row's image id.
        near_dup_of: the row's `near_dup_of` (None or "" for a representative, or rows ingested before the column).
        val_fraction: share of groups in the validation split.
        test_fraction: share of groups in the held-out test split.
    """
    return split_of(near_dup_of or image_id, val_fraction, test_fraction)
