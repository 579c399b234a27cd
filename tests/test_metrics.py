"""Retrieval metrics, silhouette and the style matrix on hand-made rankings and points with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ootd.evaluate.metrics import (
    matrix_summary,
    ranking_metrics,
    retrieval_metrics,
    silhouette,
    style_matrix,
)


def _unit(*degrees: float) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_ranking_metrics_on_hand_made_rankings():
    # Query a: relevant at ranks 1, 3, 6, 11 (4 relevant in all). Query b: one relevant, at rank 4.
    a = np.zeros(11, bool)
    a[[0, 2, 5, 10]] = True
    b = np.zeros(11, bool)
    b[3] = True
    got = ranking_metrics(np.stack([a, b]), np.array([4, 1]), ks=(1, 5, 10))
    lg = math.log2
    idcg_a = 1 + 1 / lg(3) + 1 / lg(4) + 1 / lg(5)
    expected = {
        "P@1": (1 + 0) / 2,
        "P@5": (2 / 5 + 1 / 5) / 2,
        "P@10": (3 / 10 + 1 / 10) / 2,
        "R@1": (1 / 4 + 0) / 2,
        "R@5": (2 / 4 + 1) / 2,
        "R@10": (3 / 4 + 1) / 2,
        "mAP@1": (1 + 0) / 2,
        "mAP@5": ((1 + 2 / 3) / 4 + (1 / 4) / 1) / 2,
        "mAP@10": ((1 + 2 / 3 + 3 / 6) / 4 + 1 / 4) / 2,
        "nDCG@1": (1 + 0) / 2,
        "nDCG@5": ((1 + 1 / lg(4)) / idcg_a + 1 / lg(5)) / 2,
        "nDCG@10": ((1 + 1 / lg(4) + 1 / lg(7)) / idcg_a + 1 / lg(5)) / 2,
        "MRR": (1 + 1 / 4) / 2,
    }
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


def test_ranking_metrics_counts_relevant_items_beyond_the_list():
    # 3 relevant exist but the list of 2 results shows one: recall 1/3, mAP divides by min(K, 3).
    got = ranking_metrics(np.array([[True, False]]), np.array([3]), ks=(2,))
    assert got["R@2"] == pytest.approx(1 / 3)
    assert got["mAP@2"] == pytest.approx(1 / 2)
    assert got["nDCG@2"] == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_retrieval_ranks_by_cosine_and_excludes_the_query():
    # Angles 0, 10, 25, 60 degrees, styles A B A B. Rankings (nearest first, query excluded):
    #   q0: 1(B) 2(A) 3(B) -> first relevant at 2;  q1: 0(A) 2(A) 3(B) -> 3
    #   q2: 1(B) 0(A) 3(B) -> 2;                    q3: 2(A) 1(B) 0(A) -> 2
    got = retrieval_metrics(_unit(0, 10, 25, 60), ["A", "B", "A", "B"], ks=(1, 5))
    first = np.array([2, 3, 2, 2])
    assert got["n_queries"] == 4
    assert got["P@1"] == 0.0
    assert got["R@1"] == 0.0
    assert got["P@5"] == pytest.approx(1 / 3)  # 3 results returned, one relevant each
    assert got["R@5"] == 1.0
    assert got["MRR"] == pytest.approx(np.mean(1 / first))
    assert got["mAP@5"] == pytest.approx(np.mean(1 / first))
    assert got["nDCG@5"] == pytest.approx(np.mean(1 / np.log2(first + 1)))


def test_perfect_clusters_score_perfectly_and_singletons_are_only_distractors():
    emb = np.concatenate([_unit(0, 1, 2), _unit(90, 91, 92), _unit(180, 181, 182), _unit(270)])
    labels = ["A"] * 3 + ["B"] * 3 + ["C"] * 3 + ["lonely"]
    got = retrieval_metrics(emb * 7.0, labels)  # scale must not matter
    assert got["n_queries"] == 9  # the singleton has nothing relevant and is not scored
    assert got["P@1"] == got["mAP@10"] == got["nDCG@10"] == got["MRR"] == 1.0
    assert got["R@1"] == pytest.approx(0.5)
    assert got["P@5"] == pytest.approx(2 / 5)
    assert got["R@5"] == 1.0


def test_retrieval_rejects_unscorable_input():
    with pytest.raises(ValueError, match="no label has two"):
        retrieval_metrics(_unit(0, 90), ["A", "B"])
    with pytest.raises(ValueError, match="2 embeddings but 3 labels"):
        retrieval_metrics(_unit(0, 90), ["A", "A", "B"])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [1.0, 0.0]]), ["A", "A"])


def test_silhouette_matches_hand_computation():
    # Cosine distances: d(0,1) = .4, d(0,2) = 1, d(1,2) = .2.
    # s0 = (1 - .4) / 1 = .6; s1 = (.2 - .4) / .4 = -.5; the singleton B scores 0 (sklearn convention).
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert silhouette(emb, ["A", "A", "B"]) == pytest.approx((0.6 - 0.5 + 0.0) / 3)
    with pytest.raises(ValueError, match="2..n-1 labels"):
        silhouette(emb, ["A", "A", "A"])


def test_style_matrix_hand_made_case():
    a = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]  # pairwise cos .6, 0, .8
    b = [[-1.0, 0.0], [-0.6, -0.8]]  # cos .6
    emb = np.array(a + b) * np.array([[2.0], [1.0], [3.0], [0.5], [1.0]])  # scale must not matter
    labels = ["A", "A", "A", "B", "B"]
    m = style_matrix(emb, labels, classes=["A", "B", "C"])
    # A-B: (-1 - .6) + (-.6 - 1) + (0 - .8) = -4 over 6 pairs.
    expected = np.array(
        [
            [(0.6 + 0.0 + 0.8) / 3, -4 / 6, np.nan],
            [-4 / 6, 0.6, np.nan],
            [np.nan, np.nan, np.nan],  # C has no items
        ]
    )
    np.testing.assert_allclose(m, expected, atol=1e-12)
    summary = matrix_summary(m)
    assert summary["same_style_cos"] == pytest.approx(((1.4 / 3) + 0.6) / 2)
    assert summary["cross_style_cos"] == pytest.approx(-4 / 6)
    assert summary["style_gap"] == pytest.approx(((1.4 / 3) + 0.6) / 2 + 4 / 6)


def test_style_matrix_single_item_style_has_no_diagonal_and_unknown_labels_fail():
    m = style_matrix(np.array([[1.0, 0.0], [0.0, 1.0]]), ["A", "B"], classes=["A", "B"])
    assert np.isnan(m[0, 0]) and np.isnan(m[1, 1])
    assert m[0, 1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="not in the class list: Z"):
        style_matrix(np.array([[1.0, 0.0]]), ["Z"], classes=["A"])
