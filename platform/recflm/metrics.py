"""Evaluation metrics: ranking (HR@k = recall@k, NDCG@k), yes/no (accuracy, precision, recall, F1, AUC), rating
(RMSE, MSE, MAE) and text (BLEU-4, ROUGE-1/2/L).

Ranking metrics take, per user, the 0-based rank of the true item in the returned list (``-1``
or ``None`` when it is not in the list): HR@k = share of users with rank < k; with one held-out item
per user that is also recall@k (reported under both names); NDCG@k with one relevant item = mean of
``1 / log2(rank + 2)`` over users with rank < k. Text metrics come from
sacrebleu (corpus BLEU-4, 0-100) and Google's rouge-score (F-measure, 0-100).
"""
from __future__ import annotations

import math

import numpy as np


def ranks_of_truth(lists, truths) -> np.ndarray:
    """0-based position of each truth in its list, -1 when absent."""
    out = np.full(len(truths), -1, dtype=np.int64)
    for i, (lst, t) in enumerate(zip(lists, truths)):
        for r, x in enumerate(lst):
            if x == t:
                out[i] = r
                break
    return out


def ranking_metrics(ranks, ks_hr=(1, 5, 10, 20), ks_ndcg=(5, 10, 20)) -> dict:
    r = np.array([-1 if x is None else x for x in ranks], dtype=np.int64)
    if len(r) == 0:
        return {}
    found = r >= 0
    out = {}
    for k in ks_hr:
        out[f"HR@{k}"] = float(np.mean(found & (r < k)))
    for k in ks_hr:  # one relevant item per user: the share of relevant items retrieved is the hit rate
        out[f"Recall@{k}"] = out[f"HR@{k}"]
    gains = np.where(found, 1.0 / np.log2(np.where(found, r, 0) + 2.0), 0.0)
    for k in ks_ndcg:
        out[f"NDCG@{k}"] = float(np.mean(np.where(found & (r < k), gains, 0.0)))
    return out


def rank_among_candidates(scores: np.ndarray, true_index: int = 0) -> int:
    """Rank of candidate ``true_index`` by score (ties counted against it: pessimistic)."""
    s = np.asarray(scores, dtype=float)
    t = s[true_index]
    return int((s > t).sum() + (np.delete(s, true_index) == t).sum())


def rating_metrics(predicted, truth) -> dict:
    """RMSE, MSE and MAE over the parseable predictions; ``unparseable`` counts the None ones."""
    pairs = [(p, t) for p, t in zip(predicted, truth) if p is not None]
    out = {"n": len(predicted), "unparseable": len(predicted) - len(pairs)}
    if pairs:
        p, t = np.array(pairs, dtype=float).T
        out["MSE"] = float(np.mean((p - t) ** 2))
        out["RMSE"] = float(math.sqrt(out["MSE"]))
        out["MAE"] = float(np.mean(np.abs(p - t)))
    else:
        out["RMSE"] = out["MSE"] = out["MAE"] = float("nan")
    return out


def binary_metrics(predicted, truth) -> dict:
    """Accuracy, and precision, recall and F1 of the positive class (yes), of boolean answers."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if len(p) == 0:
        return {}
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": float(np.mean(p == t)), "precision": precision, "recall": recall,
            "F1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "positive_share": float(p.mean())}


def auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``labels``: the probability that a random positive
    scores above a random negative, ties counting one half (the Mann-Whitney statistic, from average ranks).
    NaN when either class is empty."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def text_metrics(predicted: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predicted:
        return {}
    preds = [p or "" for p in predicted]
    bleu = sacrebleu.corpus_bleu(preds, [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    agg = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, references):
        s = scorer.score(r, p)
        for key in agg:
            agg[key] += s[key].fmeasure
    n = len(preds)
    return {"BLEU-4": float(bleu), "ROUGE-1": 100 * agg["rouge1"] / n, "ROUGE-2": 100 * agg["rouge2"] / n,
            "ROUGE-L": 100 * agg["rougeL"] / n}
