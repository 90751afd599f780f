"""Baselines scored on exactly the split and protocol of ``recflm evaluate``.

- ``Popularity``: items ranked by their number of training interactions; ratings = the item's mean
  training rating (the global mean for items without one).
- ``TwoTower``: user and item embeddings scored by cosine similarity (temperature 0.1), trained
  with a sampled softmax (in-batch plus uniformly sampled negatives) on training interactions: the
  embedding model of the Pretraining-FLM recipe.
- ``SASRec`` (Kang & McAuley 2018): causal self-attention over the last 50 items, next-item
  cross-entropy over the whole catalog at every position.

Each exposes ``scores(histories, users) -> (n, n_items)`` (higher is better); the evaluator ranks
them with the same exclusion of seen items and the same candidate lists as the generative model.
All train on CPU in seconds to a few minutes on the bundled data.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Popularity:
    name = "popularity"

    def __init__(self, n_items: int):
        self.n_items = n_items

    def fit(self, train_seqs: list[list[int]], users, ratings: dict | None = None, seed: int = 0):
        counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train_seqs if len(s)]),
                             minlength=self.n_items).astype(float)
        self.pop = counts + 1e-6 * (counts.max() + 1) / (np.arange(self.n_items) + 1)  # stable tie-break
        if ratings:
            items, r = np.array(list(ratings["items"])), np.array(list(ratings["values"]), dtype=float)
            self.global_mean = float(r.mean())
            s = np.bincount(items, weights=r, minlength=self.n_items)
            c = np.bincount(items, minlength=self.n_items)
            self.item_mean = np.where(c > 0, s / np.maximum(c, 1), self.global_mean)
        return self

    def scores(self, histories, users) -> np.ndarray:
        return np.tile(self.pop, (len(histories), 1))

    def predict_rating(self, users, items) -> list[float]:
        return [float(self.item_mean[i]) for i in items]


class TwoTower(nn.Module):
    name = "two-tower"

    def __init__(self, n_items: int, dim: int = 64, temperature: float = 0.1):
        super().__init__()
        self.n_items, self.dim, self.t = n_items, dim, temperature

    def fit(self, train_seqs, users, ratings=None, seed: int = 0, epochs: int = 20, batch: int = 512,
            negatives: int = 256, lr: float = 5e-3):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.user_index = {u: i for i, u in enumerate(users)}
        self.user = nn.Embedding(len(users), self.dim)
        self.item = nn.Embedding(self.n_items, self.dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        u = torch.tensor([i for i, s in enumerate(train_seqs) for _ in s], dtype=torch.long)
        it = torch.tensor([x for s in train_seqs for x in s], dtype=torch.long)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(epochs):
            perm = torch.randperm(len(u), generator=g)
            for s in range(0, len(u), batch):
                b = perm[s:s + batch]
                ue = nn.functional.normalize(self.user(u[b]), dim=-1)
                cand = torch.cat([it[b], torch.randint(0, self.n_items, (negatives,), generator=g)])
                ie = nn.functional.normalize(self.item(cand), dim=-1)
                logits = ue @ ie.T / self.t  # in-batch positives of other users act as negatives too
                same = it[b].unsqueeze(1) == cand.unsqueeze(0)
                same[torch.arange(len(b)), torch.arange(len(b))] = False
                logits = logits.masked_fill(same, float("-inf"))  # a user's own positive is never a negative
                loss = nn.functional.cross_entropy(logits, torch.arange(len(b)))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self

    @torch.no_grad()
    def scores(self, histories, users) -> np.ndarray:
        idx = torch.tensor([self.user_index[u] for u in users], dtype=torch.long)
        ue = nn.functional.normalize(self.user(idx), dim=-1)
        return (ue @ nn.functional.normalize(self.item.weight, dim=-1).T).numpy()


class SASRec(nn.Module):
    name = "SASRec"

    def __init__(self, n_items: int, dim: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.2):
        super().__init__()
        self.n_items, self.max_len = n_items, max_len
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)  # item i -> i + 1; 0 is padding
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _pad(self, seqs) -> torch.Tensor:
        x = torch.zeros((len(seqs), self.max_len), dtype=torch.long)  # left padding
        for r, s in enumerate(seqs):
            s = list(s)[-self.max_len:]
            if s:
                x[r, -len(s):] = torch.tensor(s) + 1
        return x

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        # causal attention only, padding zeroed after every block (the original's timeline mask): a key
        # padding mask would leave the padding positions' queries with nothing to attend to, their NaN
        # outputs would reach the real positions through the next block's values (0 x NaN = NaN)
        keep = (x != 0).unsqueeze(-1).to(self.pos.weight.dtype)
        h = self.drop((self.item(x) * self.item.embedding_dim ** 0.5 + self.pos.weight.unsqueeze(0)) * keep)
        causal = torch.triu(torch.ones(self.max_len, self.max_len, dtype=torch.bool), 1)
        for layer in self.blocks.layers:
            h = layer(h, src_mask=causal) * keep
        return self.norm(h)

    def fit(self, train_seqs, users, ratings=None, seed: int = 0, epochs: int = 60, batch: int = 32,
            lr: float = 1e-3):
        torch.manual_seed(seed)
        seqs = [list(s) for s in train_seqs if len(s) >= 2]
        # long histories contribute every window of max_len + 1 items (stride max_len)
        windows = []
        for s in seqs:
            for end in range(len(s), 1, -self.max_len):
                windows.append(s[max(0, end - self.max_len - 1):end])
        inp = self._pad([w[:-1] for w in windows])
        tgt = self._pad([w[1:] for w in windows]) - 1  # -1: padding, ignored
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        self.train()
        for _ in range(epochs):
            perm = torch.randperm(len(inp), generator=g)
            for s in range(0, len(inp), batch):
                b = perm[s:s + batch]
                h = self._hidden(inp[b])
                logits = h @ self.item.weight[1:].T
                loss = nn.functional.cross_entropy(logits.reshape(-1, self.n_items), tgt[b].reshape(-1),
                                                   ignore_index=-1)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.eval()
        return self

    @torch.no_grad()
    def scores(self, histories, users) -> np.ndarray:
        h = self._hidden(self._pad(histories))[:, -1]
        return (h @ self.item.weight[1:].T).numpy()


BASELINES = {"popularity": Popularity, "two-tower": TwoTower, "SASRec": SASRec}
