"""Every metric against values computed by hand."""
import math

import pytest

from recflm.metrics import rank_among_candidates, ranking_metrics, ranks_of_truth, rating_metrics, text_metrics


def test_ranking_metrics_by_hand():
    # ranks: 0 (top), 3, 12, absent
    ranks = ranks_of_truth([[5, 1], [9, 8, 7, 5], list(range(100, 112)) + [42], [1, 2]], [5, 5, 42, 3])
    assert ranks.tolist() == [0, 3, 12, -1]
    m = ranking_metrics(ranks)
    assert m["HR@1"] == 0.25 and m["HR@5"] == 0.5 and m["HR@10"] == 0.5 and m["HR@20"] == 0.75
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["NDCG@10"] == m["NDCG@5"]
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 4)


def test_rank_among_candidates_counts_ties_against_the_truth():
    assert rank_among_candidates([0.5, 0.9, 0.1, 0.2]) == 1
    assert rank_among_candidates([0.9, 0.5, 0.1]) == 0
    assert rank_among_candidates([0.5, 0.5, 0.1]) == 1


def test_rating_metrics_by_hand_with_unparseable():
    m = rating_metrics([4.0, None, 2.0, 5.0], [5.0, 3.0, 2.0, 3.0])
    assert m["unparseable"] == 1 and m["n"] == 4
    assert m["RMSE"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    assert m["MAE"] == pytest.approx(1.0)
    assert math.isnan(rating_metrics([None], [1.0])["RMSE"])


def test_text_metrics():
    same = text_metrics(["the movie was great fun"], ["the movie was great fun"])
    assert same["BLEU-4"] == pytest.approx(100) and same["ROUGE-1"] == pytest.approx(100)
    m = text_metrics(["the cat sat"], ["the cat sat on the mat"])
    # ROUGE-1: precision 3/3, recall 3/6 -> F = 2/3; ROUGE-2: 2/2, 2/5 -> 4/7
    assert m["ROUGE-1"] == pytest.approx(200 / 3) and m["ROUGE-2"] == pytest.approx(400 / 7)
    assert m["ROUGE-L"] == pytest.approx(200 / 3)
    assert text_metrics(["completely different words"], ["the cat sat on the mat"])["ROUGE-1"] == 0
