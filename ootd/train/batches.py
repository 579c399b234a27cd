"""Class-balanced P×K batches streamed from a shuffled row iterator, so every batch holds positives."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class BatcherStats:
    """What a batcher did with the rows it saw (rank-0 logs show it per epoch)."""

    rows_in: int = 0
    rows_out: int = 0
    batches: int = 0
    # Rows of an over-represented style dropped to keep the buffer bounded (class-balanced undersampling).
    dropped: int = 0
    # Rows left at the end of the stream that could not form a batch with a positive pair.
    unused: int = 0


@dataclass
class ClassBalancedBatcher(Generic[T]):
    """Buffers rows per style and emits batches of `styles_per_batch` styles × `images_per_style` rows each.

    Rows arrive in streaming order (a Ray Data shard), so the batcher never needs the whole split in memory:
    it keeps at most `max_buffered` rows. A batch is emitted as soon as P styles each have K buffered rows;
    which styles and rows go in is drawn from `seed`, so a resumed epoch replays the same batches.

    Args:
        styles_per_batch: P, styles per batch (at least 2, so every batch has negatives).
        images_per_style: K, rows per style in a batch (at least 2, so every batch has positives).
        seed: seeds the draw of styles and rows.
        max_buffered: buffer cap; past it the oldest row of the most buffered style is dropped. Default 8·P·K.
    """

    styles_per_batch: int
    images_per_style: int
    seed: int = 0
    max_buffered: int | None = None
    stats: BatcherStats = field(default_factory=BatcherStats)

    def __post_init__(self) -> None:
        if self.styles_per_batch < 2:
            raise ValueError(f"styles_per_batch must be >= 2 (a batch needs negatives), got {self.styles_per_batch}")
        if self.images_per_style < 2:
            raise ValueError(f"images_per_style must be >= 2 (a batch needs positives), got {self.images_per_style}")
        if self.max_buffered is None:
            self.max_buffered = 8 * self.styles_per_batch * self.images_per_style
        if self.max_buffered < self.styles_per_batch * self.images_per_style:
            raise ValueError(f"max_buffered ({self.max_buffered}) must hold at least one full batch")
        self._rng = np.random.default_rng(self.seed)
        self._buffers: dict[int, list[T]] = {}
        self._buffered = 0

    def add(self, label: int, item: T) -> list[tuple[int, T]] | None:
        """Buffers one row; returns a full batch of (label, item) pairs when one can be formed, else None."""
        self.stats.rows_in += 1
        self._buffers.setdefault(int(label), []).append(item)
        self._buffered += 1
        if self._buffered > self.max_buffered:
            # Only an over-represented style can fill the buffer without forming a batch: undersample it.
            largest = max(self._buffers, key=lambda k: len(self._buffers[k]))
            self._buffers[largest].pop(0)
            self._buffered -= 1
            self.stats.dropped += 1
        ready = [k for k, rows in self._buffers.items() if len(rows) >= self.images_per_style]
        if len(ready) < self.styles_per_batch:
            return None
        return self._take(ready, self.styles_per_batch, self.images_per_style)

    def flush(self) -> Iterator[list[tuple[int, T]]]:
        """At the end of the stream, yields smaller batches from what is left while two styles have a pair."""
        while True:
            ready = [k for k, rows in self._buffers.items() if len(rows) >= 2]
            if len(ready) < 2:
                break
            yield self._take(ready, min(self.styles_per_batch, len(ready)), self.images_per_style)
        self.stats.unused += self._buffered
        self._buffers.clear()
        self._buffered = 0

    def _take(self, ready: list[int], n_styles: int, per_style: int) -> list[tuple[int, T]]:
        batch: list[tuple[int, T]] = []
        for label in self._rng.choice(sorted(ready), size=n_styles, replace=False):
            rows = self._buffers[int(label)]
            take = min(per_style, len(rows))
            picked = set(self._rng.choice(len(rows), size=take, replace=False).tolist())
            batch.extend((int(label), rows[i]) for i in sorted(picked))
            self._buffers[int(label)] = [row for i, row in enumerate(rows) if i not in picked]
            self._buffered -= take
        self.stats.rows_out += len(batch)
        self.stats.batches += 1
        return batch


def balanced_batches(
    rows: Iterable[tuple[int, Any]],
    styles_per_batch: int,
    images_per_style: int,
    *,
    seed: int = 0,
    max_buffered: int | None = None,
    stats: BatcherStats | None = None,
) -> Iterator[list[tuple[int, Any]]]:
    """Streams (label, item) rows into class-balanced batches; the leftovers are flushed at the end.

    Args:
        rows: (label, item) pairs in stream order.
        styles_per_batch: P styles per batch.
        images_per_style: K rows per style.
        seed: seeds the draw of styles and rows.
        max_buffered: see `ClassBalancedBatcher`.
        stats: filled in as the stream is consumed, when given.
    """
    batcher: ClassBalancedBatcher[Any] = ClassBalancedBatcher(
        styles_per_batch, images_per_style, seed=seed, max_buffered=max_buffered, stats=stats or BatcherStats()
    )
    for label, item in rows:
        batch = batcher.add(label, item)
        if batch is not None:
            yield batch
    yield from batcher.flush()
