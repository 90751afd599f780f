"""Baselines of the review family, scored by ``recflm evaluate --baselines`` beside the model on the same rows.

The review family asks for a review's summary (``review``: BLEU-4, ROUGE-1/2/L) or its star rating
(``review-rating``: RMSE, MAE) from the review text. Each baseline answers what it can:

- ``lead``: the summary is the review's first sentence, cut to ``LEAD_WORDS`` words (the classic
  summarization baseline: reviews often open with their verdict);
- ``nearest``: the summary and the rating of the most similar training review (cosine of TF-IDF
  bag-of-words vectors);
- ``means``: the rating is the user's mean training rating, else the item's, else the global mean
  (text-blind: what the review text adds over who wrote it about what);
- ``bow-ridge``: the rating from a ridge regression on the review's TF-IDF bag of words (a strong
  linear sentiment baseline), clipped to the rating scale.

Everything is fit on the training split's interactions only. Bags of words use ``BagOfWords`` (lower-cased
``\\w+`` words, the ``max_vocab`` words in most training reviews, idf-weighted, L2-normalised rows).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

LEAD_WORDS = 10  # the lead baseline's longest summary (Fine Food summaries: median 20 characters, ~4 words)
_WORD_RE = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def words(text) -> list[str]:
    return _WORD_RE.findall(text.lower()) if isinstance(text, str) else []


def first_sentence(text, max_words: int = LEAD_WORDS) -> str:
    """The text up to its first sentence end (., ! or ? then a space), at most ``max_words`` words."""
    if not isinstance(text, str) or not text.strip():
        return ""
    first = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    return " ".join(first.split()[:max_words])


class BagOfWords:
    """TF-IDF bag-of-words vectors (scipy CSR, L2-normalised rows) over a vocabulary of training texts."""

    def __init__(self, max_vocab: int = 20000):
        self.max_vocab = max_vocab

    def fit(self, texts) -> "BagOfWords":
        df: dict[str, int] = {}
        docs = [set(words(t)) for t in texts]
        for d in docs:
            for w in d:
                df[w] = df.get(w, 0) + 1
        vocab = sorted(df, key=lambda w: (-df[w], w))[:self.max_vocab]
        self.index = {w: i for i, w in enumerate(vocab)}
        n = max(1, len(docs))
        self.idf = np.log((1 + n) / (1 + np.array([df[w] for w in vocab], dtype=np.float64))) + 1.0
        return self

    def transform(self, texts):
        import scipy.sparse as sp

        rows, cols, vals = [], [], []
        for r, t in enumerate(texts):
            counts: dict[int, int] = {}
            for w in words(t):
                j = self.index.get(w)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            rows += [r] * len(counts)
            cols += list(counts)
            vals += list(counts.values())
        x = sp.csr_matrix((np.asarray(vals, dtype=np.float64), (rows, cols)), shape=(len(texts), len(self.index)))
        x = x.multiply(self.idf).tocsr()
        norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        return sp.diags(1.0 / np.where(norm > 0, norm, 1.0)) @ x


class Lead:
    """The summary is the first sentence of the review."""

    def fit(self, train: pd.DataFrame, scale=(1.0, 5.0)) -> "Lead":
        return self

    def summaries(self, rows: pd.DataFrame) -> list[str]:
        return [first_sentence(t) for t in rows["text"]]


class Nearest:
    """The summary and the rating of the training review most similar to the review (TF-IDF cosine)."""

    def fit(self, train: pd.DataFrame, scale=(1.0, 5.0), max_vocab: int = 20000) -> "Nearest":
        train = train[train["text"].map(lambda t: isinstance(t, str) and bool(t))].reset_index(drop=True)
        self.bow = BagOfWords(max_vocab).fit(train["text"])
        self.x = self.bow.transform(list(train["text"])).T.tocsr()  # (vocab, n_train)
        self.summary = train["summary"].to_numpy(dtype=object)
        self.rating = train["rating"].to_numpy(dtype=np.float64)
        return self

    def nearest(self, texts, batch: int = 1024) -> np.ndarray:
        out = []
        for b in range(0, len(texts), batch):
            sims = (self.bow.transform(list(texts[b:b + batch])) @ self.x).toarray()
            out.append(np.argmax(sims, axis=1))  # a text without a known word: the first training review
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def summaries(self, rows: pd.DataFrame) -> list[str]:
        return [s if isinstance(s, str) else "" for s in self.summary[self.nearest(list(rows["text"]))]]

    def ratings(self, rows: pd.DataFrame) -> list[float | None]:
        r = self.rating[self.nearest(list(rows["text"]))]
        return [None if np.isnan(v) else float(v) for v in r]


class Means:
    """The user's mean training rating, else the item's, else the global mean."""

    def fit(self, train: pd.DataFrame, scale=(1.0, 5.0)) -> "Means":
        rated = train[train["rating"].notna()]
        self.mean = float(rated["rating"].mean()) if len(rated) else float(np.mean(scale))
        self.user = rated.groupby("user")["rating"].mean().to_dict()
        self.item = rated.groupby("item")["rating"].mean().to_dict()
        return self

    def ratings(self, rows: pd.DataFrame) -> list[float]:
        return [float(self.user.get(u, self.item.get(i, self.mean))) for u, i in zip(rows["user"], rows["item"])]


class BowRidge:
    """Ridge regression of the rating on the review's TF-IDF bag of words (LSQR with damping), clipped to the
    scale."""

    def fit(self, train: pd.DataFrame, scale=(1.0, 5.0), alpha: float = 1.0, max_vocab: int = 20000) -> "BowRidge":
        from scipy.sparse.linalg import lsqr

        train = train[train["rating"].notna() & train["text"].map(lambda t: isinstance(t, str) and bool(t))]
        self.scale = scale
        y = train["rating"].to_numpy(dtype=np.float64)
        self.mean = float(y.mean()) if len(y) else float(np.mean(scale))
        self.bow = BagOfWords(max_vocab).fit(train["text"])
        if len(y):
            self.w = lsqr(self.bow.transform(list(train["text"])), y - self.mean, damp=float(np.sqrt(alpha)))[0]
        else:
            self.w = np.zeros(len(self.bow.index))
        return self

    def ratings(self, rows: pd.DataFrame) -> list[float]:
        p = self.mean + self.bow.transform(list(rows["text"])) @ self.w
        return [float(v) for v in np.clip(p, *self.scale)]


REVIEW_BASELINES = {"lead": Lead, "nearest": Nearest, "means": Means, "bow-ridge": BowRidge}
SUMMARY_TASK, RATING_TASK = "review", "review-rating"


def score_review_baselines(train: pd.DataFrame, rows: pd.DataFrame, scale=(1.0, 5.0), log=print) -> dict:
    """Fit every review baseline on ``train`` (columns user, item, text, summary, rating: the training
    interactions) and score it on ``rows`` (columns task, user, item, text, target: the evaluation rows of the
    ``review`` and ``review-rating`` tasks, ``text`` the review). Returns method -> task -> metrics, with the
    metrics ``recflm evaluate`` reports for the model (``metrics.text_metrics``, ``metrics.rating_metrics``)."""
    from .metrics import rating_metrics, text_metrics

    summ = rows[rows["task"] == SUMMARY_TASK]
    rate = rows[rows["task"] == RATING_TASK]
    out: dict = {}
    for name, cls in REVIEW_BASELINES.items():
        model = cls().fit(train, scale)
        res = {}
        if hasattr(model, "summaries") and len(summ):
            pred = model.summaries(summ)
            res[SUMMARY_TASK] = {**text_metrics(pred, [str(t) for t in summ["target"]]),
                                 "empty": int(sum(1 for p in pred if not p)), "n": int(len(summ))}
        if hasattr(model, "ratings") and len(rate):
            res[RATING_TASK] = {**rating_metrics(model.ratings(rate), [float(t) for t in rate["target"]]),
                                "n": int(len(rate))}
        if res:
            out[name] = res
            log(f"evaluate: review baseline {name} scored on " + ", ".join(f"{t} (n={m['n']})" for t, m in res.items()))
    return out
