"""Class-balanced P×K batching: every batch has positives and negatives, memory stays bounded, draws are seeded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ootd.train.batches import BatcherStats, ClassBalancedBatcher, balanced_batches


def _stream(n_per_label: dict[int, int], seed: int = 0) -> list[tuple[int, str]]:
    rows = [(label, f"{label}-{i}") for label, n in n_per_label.items() for i in range(n)]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def test_full_batches_have_p_styles_times_k_images():
    rows = _stream({label: 20 for label in range(13)})
    batches = list(balanced_batches(rows, styles_per_batch=4, images_per_style=3, seed=1))
    full = [b for b in batches if len(b) == 12]
    assert len(full) >= 15  # 260 rows / 12 per batch, minus the tail flushed as smaller batches
    for batch in full:
        counts = Counter(label for label, _ in batch)
        assert len(counts) == 4
        assert set(counts.values()) == {3}


def test_every_batch_has_a_positive_pair_and_a_negative():
    rows = _stream({0: 7, 1: 3, 2: 11, 3: 2, 4: 5})
    for batch in balanced_batches(rows, styles_per_batch=3, images_per_style=2, seed=0):
        counts = Counter(label for label, _ in batch)
        assert len(counts) >= 2
        assert all(n >= 2 for n in counts.values())


def test_no_row_is_emitted_twice_and_accounting_adds_up():
    rows = _stream({label: 9 for label in range(5)}, seed=3)
    stats = BatcherStats()
    seen = [item for batch in balanced_batches(rows, 3, 2, seed=5, stats=stats) for _, item in batch]
    assert len(seen) == len(set(seen))
    assert stats.rows_in == len(rows)
    assert stats.rows_out == len(seen)
    assert stats.rows_out + stats.dropped + stats.unused == stats.rows_in
    # Balanced classes and a roomy buffer: at most a row per style is left over.
    assert stats.dropped == 0
    assert stats.unused <= 5


def test_labels_travel_with_their_items():
    rows = _stream({label: 6 for label in range(4)})
    for batch in balanced_batches(rows, 2, 2, seed=2):
        for label, item in batch:
            assert item.startswith(f"{label}-")


def test_same_seed_same_batches_different_seed_different():
    rows = _stream({label: 10 for label in range(6)})
    a = list(balanced_batches(rows, 3, 2, seed=11))
    b = list(balanced_batches(rows, 3, 2, seed=11))
    c = list(balanced_batches(rows, 3, 2, seed=12))
    assert a == b
    assert a != c


def test_buffer_stays_bounded_when_one_style_dominates():
    # 500 rows of style 0 and a trickle of others: the dominant style is undersampled, not hoarded.
    rows = [(0, f"0-{i}") for i in range(500)] + [(k, f"{k}-{i}") for k in (1, 2) for i in range(4)]
    batcher: ClassBalancedBatcher[str] = ClassBalancedBatcher(2, 2, seed=0, max_buffered=16)
    emitted = []
    for label, item in rows:
        batch = batcher.add(label, item)
        if batch:
            emitted.append(batch)
        assert batcher._buffered <= 16
    emitted.extend(batcher.flush())
    assert batcher.stats.dropped > 400
    for batch in emitted:
        assert len({label for label, _ in batch}) == 2


def test_single_style_stream_yields_no_batch():
    stats = BatcherStats()
    assert list(balanced_batches([(3, i) for i in range(10)], 2, 2, stats=stats)) == []
    assert stats.unused == 10


@pytest.mark.parametrize("p,k", [(1, 4), (4, 1)])
def test_batch_shape_needs_positives_and_negatives(p, k):
    with pytest.raises(ValueError, match="must be >= 2"):
        ClassBalancedBatcher(p, k)
