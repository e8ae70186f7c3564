"""visual_search.metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from visual_search import metrics

T, F = True, False


# rel row, R, k -> (hit@k, precision@k, AP@k), each computed by hand in the comment.
CASES = [
    # relevant at rank 1 only: P@1 = 1 -> AP = 1/min(1, 5) * 1
    ([T, F, F, F, F], 1, 5, (1.0, 1 / 5, 1.0)),
    # relevant at rank 3: P@3 = 1/3 -> AP = 1/3
    ([F, F, T, F, F], 1, 5, (1.0, 1 / 5, 1 / 3)),
    # relevant at ranks 1 and 3, R = 2: (1/1 + 2/3) / 2 = 5/6
    ([T, F, T, F, F], 2, 5, (1.0, 2 / 5, 5 / 6)),
    # R = 4 > found: ranks 2 and 4: (1/2 + 2/4) / min(4, 5) = 1/4
    ([F, T, F, T, F], 4, 5, (1.0, 2 / 5, 1 / 4)),
    # R larger than k: min(R, k) = k. ranks 1, 2 of k = 2 -> (1 + 1) / 2 = 1
    ([T, T, F, F, F], 10, 2, (1.0, 1.0, 1.0)),
    # nothing relevant in the list (R = 3): all zero
    ([F, F, F, F, F], 3, 5, (0.0, 0.0, 0.0)),
    # the relevant item is past the cut-off
    ([F, F, T], 1, 2, (0.0, 0.0, 0.0)),
    # k larger than the list (3 results, k = 10): missing results are non-relevant,
    # precision divides by k: 2/10; AP = (1/1 + 2/2) / min(2, 10) = 1
    ([T, T, F], 2, 10, (1.0, 2 / 10, 1.0)),
    # ties of relevance: every returned item is relevant (R = 3, k = 3) -> perfect
    ([T, T, T], 3, 3, (1.0, 1.0, 1.0)),
    # R < k: one relevant product at rank 2, k = 10 -> AP = (1/2) / 1
    ([F, T, F, F], 1, 10, (1.0, 1 / 10, 1 / 2)),
]


@pytest.mark.parametrize("row, n_rel, k, expected", CASES)
def test_hand_computed(row, n_rel, k, expected):
    rel = np.array([row])
    hit, prec, ap = expected
    assert metrics.hit_at_k(rel, k)[0] == pytest.approx(hit)
    assert metrics.precision_at_k(rel, k)[0] == pytest.approx(prec)
    assert metrics.average_precision_at_k(rel, np.array([n_rel]), k)[0] == pytest.approx(ap)


def test_summary_means_over_queries_with_relevant_items():
    rel = np.array([[T, F, F], [F, F, T], [F, F, F], [F, F, F]])
    n_rel = np.array([1, 1, 2, 0])  # the last query has nothing relevant in the index
    s = metrics.summarize(rel, n_rel, [1, 3])
    assert s["queries"] == 3 and s["no_relevant"] == 1
    assert s["recall@1"] == pytest.approx(1 / 3)
    assert s["recall@3"] == pytest.approx(2 / 3)
    assert s["precision@1"] == pytest.approx(1 / 3)
    assert s["precision@3"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert s["map@1"] == pytest.approx(1 / 3)
    assert s["map@3"] == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_summary_without_scorable_queries_is_none_not_nan():
    s = metrics.summarize(np.zeros((2, 3), bool), np.array([0, 0]), [1, 10])
    assert s == {
        "queries": 0,
        "no_relevant": 2,
        "recall@1": None,
        "precision@1": None,
        "map@1": None,
        "recall@10": None,
        "precision@10": None,
        "map@10": None,
    }


def test_ap_is_nan_without_relevant_items():
    rel = np.array([[T, F, T], [F, F, F]])
    ap = metrics.average_precision_at_k(rel, np.array([2, 0]), 3)
    assert ap[0] == pytest.approx(5 / 6) and np.isnan(ap[1])


def test_relevance_labels_padding_and_none():
    rel = metrics.relevance([["a", "b"], [None, "x", "x"], []], ["b", "x", "a"], 4)
    assert rel.tolist() == [[F, T, F, F], [F, T, T, F], [F, F, F, F]]


def test_invalid_input_is_refused():
    with pytest.raises(ValueError, match="R = 1"):
        metrics.average_precision_at_k(np.array([[T, T]]), np.array([1]), 2)
    with pytest.raises(ValueError, match="k must be"):
        metrics.hit_at_k(np.array([[T]]), 0)
    with pytest.raises(ValueError, match="n_relevant"):
        metrics.summarize(np.array([[T]]), np.array([1, 1]), [1])
