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


def test_recall_is_the_hit_rate_with_one_relevant_item_and_mse_is_rmse_squared():
    m = ranking_metrics([0, 3, 12, -1])
    assert all(m[f"Recall@{k}"] == m[f"HR@{k}"] for k in (1, 5, 10, 20))
    r = rating_metrics([4.0, 2.0, 5.0], [5.0, 2.0, 3.0])
    assert r["MSE"] == pytest.approx(5 / 3) and r["RMSE"] == pytest.approx(math.sqrt(5 / 3))


def test_binary_metrics_by_hand():
    from recflm.metrics import binary_metrics

    # 3 yes answers: 2 right (tp), 1 wrong (fp); of 4 true yes, 2 missed (fn); 1 right no
    m = binary_metrics([True, True, True, False, False, False], [True, True, False, True, True, False])
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["F1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert m["positive_share"] == pytest.approx(0.5)
    none = binary_metrics([False, False], [True, False])  # no yes answer: precision and F1 are 0, not an error
    assert none["precision"] == none["F1"] == 0.0 and none["accuracy"] == 0.5


def test_yesno_thresholds_and_cold_slices():
    import pandas as pd

    from recflm.evaluate import cold_slices, ranking_result, yesno_result

    # log-odds: yes above 0; a scorer: yes above its median (half the balanced rows)
    assert yesno_result([2.0, -1.0, 0.5, -3.0], [1, 0, 0, 1], odds=True)["accuracy"] == 0.5
    m = yesno_result([10.0, 9.0, 1.0, 2.0], [1, 1, 0, 0], odds=False)
    assert m["accuracy"] == 1.0 and m["positive_share"] == 0.5 and m["n"] == 4
    rows = pd.DataFrame({"history_len": [1, 2, 4, 9], "item_count": [0, 7, 3, -1]})
    masks = cold_slices(rows, [3, 5])
    assert masks["history<3"].tolist() == [True, True, False, False]
    assert masks["history<5"].tolist() == [True, True, True, False]
    assert masks["item<=3"].tolist() == [True, False, True, False]  # -1: an item the catalog lacks, in no slice
    res = ranking_result([0, -1, 2, 30], rows, "sequential/seen", [3])
    assert res["sequential/seen"]["n"] == 4 and res["sequential/seen|history<3"]["n"] == 2
    assert res["sequential/seen|history<3"]["HR@1"] == 0.5  # ranks 0 and -1
    assert res["sequential/seen|item<=3"]["HR@5"] == 1.0  # ranks 0 and 2
    assert "sequential/last-3|history<3" not in ranking_result([0], rows.head(1), "sequential/last-3", [3])
