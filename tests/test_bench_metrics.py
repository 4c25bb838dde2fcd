"""Retrieval metrics against hand-computed values, edge cases included."""

from __future__ import annotations

import math

import pytest

from himir_rag.bench.metrics import (
    box_iou,
    hit_at_k,
    mrr,
    ndcg_at_k,
    percentile,
    recall_at_k,
    summarize,
)

RANKED = ["d1", "x1", "d2", "x2", "d3"]
RELEVANT = {"d1", "d2", "d3", "d4"}


@pytest.mark.parametrize(
    ("k", "expected"),
    [(1, 1 / 4), (2, 1 / 4), (3, 2 / 4), (5, 3 / 4), (50, 3 / 4)],
)
def test_recall_at_k_divides_by_all_relevant(k, expected):
    assert recall_at_k(RANKED, RELEVANT, k) == pytest.approx(expected)


def test_recall_counts_a_repeated_id_once():
    assert recall_at_k(["a", "a", "a"], {"a", "b"}, 3) == pytest.approx(0.5)


@pytest.mark.parametrize(("k", "expected"), [(1, 0.0), (2, 1.0), (3, 1.0)])
def test_hit_at_k(k, expected):
    assert hit_at_k(["x", "a", "b"], {"a", "b"}, k) == expected


def test_ndcg_hand_computed():
    # relevant at ranks 1, 3, 5 of 5; ideal puts 4 relevant at ranks 1-4
    dcg = 1 + 1 / math.log2(4) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    assert ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx(dcg / idcg)


def test_ndcg_ideal_is_capped_by_k():
    # k=2: ideal DCG has two hits although four items are relevant
    dcg = 1.0
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at_k(RANKED, RELEVANT, 2) == pytest.approx(dcg / idcg)


def test_ndcg_perfect_and_zero():
    assert ndcg_at_k(["a", "b", "x"], {"a", "b"}, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], {"a"}, 2) == 0.0


def test_mrr_reciprocal_of_first_relevant_rank():
    assert mrr(["x", "y", "a", "b"], {"a", "b"}) == pytest.approx(1 / 3)
    assert mrr(["a"], {"a"}) == 1.0
    assert mrr(["x", "y"], {"a"}) == 0.0
    assert mrr(["x", "y", "a"], {"a"}, k=2) == 0.0


def test_empty_ranking_scores_zero():
    assert recall_at_k([], {"a"}, 10) == 0.0
    assert hit_at_k([], {"a"}, 10) == 0.0
    assert ndcg_at_k([], {"a"}, 10) == 0.0


@pytest.mark.parametrize("metric", [recall_at_k, hit_at_k, ndcg_at_k])
def test_empty_relevant_set_raises(metric):
    with pytest.raises(ValueError, match="relevant set is empty"):
        metric(["a"], set(), 5)


def test_mrr_empty_relevant_set_raises():
    with pytest.raises(ValueError, match="relevant set is empty"):
        mrr(["a"], set())


@pytest.mark.parametrize("metric", [recall_at_k, hit_at_k, ndcg_at_k])
def test_k_below_one_raises(metric):
    with pytest.raises(ValueError, match="k=0; expected k >= 1"):
        metric(["a"], {"a"}, 0)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [0, 0, 5, 10], 0.5),
        ([0, 0, 1, 1], [2, 2, 3, 3], 0.0),
        ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),  # touching edges
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # both empty
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_box_iou_rejects_inverted_box():
    with pytest.raises(ValueError, match=r"expected \[x0, y0, x1, y1\]"):
        box_iou([5, 0, 1, 1], [0, 0, 1, 1])


def test_summarize_means_numeric_fields_only():
    rows = [
        {"query_id": "q1", "recall@10": 1.0, "hit@1": True, "latency_ms": 10},
        {"query_id": "q2", "recall@10": 0.5, "hit@1": False, "latency_ms": 30},
        {"query_id": "q3", "recall@10": 0.0, "hit@1": False},
    ]
    summary = summarize(rows)
    assert summary == {
        "recall@10": pytest.approx(0.5),
        "hit@1": pytest.approx(1 / 3),
        "latency_ms": pytest.approx(20.0),
        "n_queries": 3.0,
    }
    assert list(summary) == ["recall@10", "hit@1", "latency_ms", "n_queries"]


def test_summarize_empty_raises():
    with pytest.raises(ValueError, match="no per-query rows"):
        summarize([])


def test_percentile_linear_interpolation():
    latencies = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(latencies, 50) == 30.0
    assert percentile(latencies, 95) == pytest.approx(48.0)  # 40 + 0.8 * 10
    assert percentile([7.0], 95) == 7.0
    assert percentile(iter([1.0, 3.0]), 50) == 2.0


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"q=101; expected a percentile in \[0, 100\]"):
        percentile([1.0], 101)
