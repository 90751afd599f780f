"""Baselines scored on exactly the split and protocol of ``recflm evaluate``.

- ``Popularity``: items ranked by their number of training interactions; ratings = the item's mean
  training rating (the global mean for items without one), where the data has ratings.
- ``TwoTower``: user and item embeddings scored by cosine similarity (temperature 0.1), trained
  with a sampled softmax (in-batch plus uniformly sampled negatives) on training interactions: the
  embedding model of the Pretraining-FLM recipe.
- ``SASRec`` (Kang & McAuley 2018), the RecBole-style recipe that matches its published figures:
  causal self-attention over the last 50 items (hidden 64, 2 blocks, 2 heads, inner 256, GELU,
  dropout 0.5), Adam lr 1e-3, batch 128, next-item cross-entropy over the whole catalog at the real
  (non-padding) positions, early stopping on validation NDCG@10 (full ranking) with the best epoch's
  weights restored.

Each exposes ``scores(histories, users) -> (n, n_items)`` (higher is better); the evaluator ranks
them with the same exclusion of seen items and the same candidate lists as the generative model.
Popularity and two-tower train on CPU in seconds on the bundled data; SASRec with early stopping in
minutes (about 20 on Amazon Toys on one CPU thread).
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
        seqs = [np.asarray(s, dtype=np.int64) for s in train_seqs if len(s)]
        counts = np.bincount(np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64),
                             minlength=self.n_items).astype(float)
        self.pop = counts + 1e-6 * (counts.max() + 1) / (np.arange(self.n_items) + 1)  # stable tie-break
        self.item_mean = None
        # a data set without ratings (no rating column) passes empty arrays: no rating predictor then
        if ratings and len(ratings.get("items", ())) and len(ratings.get("values", ())):
            items = np.asarray(list(ratings["items"]), dtype=np.int64)
            r = np.asarray(list(ratings["values"]), dtype=float)
            self.global_mean = float(r.mean())
            s = np.bincount(items, weights=r, minlength=self.n_items)
            c = np.bincount(items, minlength=self.n_items)
            self.item_mean = np.where(c > 0, s / np.maximum(c, 1), self.global_mean)
        return self

    @property
    def rates(self) -> bool:
        """Whether ``predict_rating`` has training ratings to answer from."""
        return getattr(self, "item_mean", None) is not None

    def scores(self, histories, users) -> np.ndarray:
        return np.tile(self.pop, (len(histories), 1))

    def predict_rating(self, users, items) -> list[float]:
        if not self.rates:
            raise ValueError("popularity was fitted without ratings: it has no rating prediction")
        return [float(self.item_mean[i]) if 0 <= i < self.n_items else self.global_mean for i in items]


class TwoTower(nn.Module):
    name = "two-tower"
    by_history = False  # the user tower is a per-user ID embedding: scores ignore the history they are given

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
    """SASRec with the RecBole-style recipe that matches its published figures.

    Self-attention over the last ``max_len`` (50) items: hidden 64, 2 blocks, 2 heads, inner size 256,
    GELU, dropout 0.5, weights drawn from N(0, 0.02) and the input embedding layer-normed (RecBole's
    initialisation); Adam (lr 1e-3, batch 128); next-item cross-entropy over the whole catalog, computed
    only at the real (non-padding) positions. ``fit(..., valid=(histories, truths))`` scores full-ranking
    NDCG@10 on the validation users after every epoch (seen items excluded), keeps the best epoch's
    weights, stops after ``patience`` epochs without improvement (or after ``max_minutes``) and restores
    the best weights: ``best_epoch``, ``epochs_run``, ``best_val_ndcg10`` and ``val_history`` (validation
    NDCG@10 after each epoch) record the run.

    Padding never reaches a real position (see ``_hidden``), so histories are run through the blocks in
    groups of similar length, each cut to its longest history: the result is the same as at full width,
    at a fraction of the cost on short histories.
    """

    name = "SASRec"

    def __init__(self, n_items: int, dim: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.5, inner: int = 256):
        super().__init__()
        self.n_items, self.max_len, self.heads = n_items, max_len, heads
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)  # item i -> i + 1; 0 is padding
        self.pos = nn.Embedding(max_len, dim)
        self.in_norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, inner, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        for m in self.modules():  # RecBole's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
        with torch.no_grad():
            self.item.weight[0].zero_()
        self.best_epoch, self.epochs_run, self.best_val_ndcg10, self.val_history = 0, 0, None, []

    def _pad(self, seqs) -> torch.Tensor:
        """Left-padded ``(n, w)`` item indices (+1; 0 is padding), ``w`` the longest history (<= max_len)."""
        seqs = [list(s)[-self.max_len:] for s in seqs]
        x = torch.zeros((len(seqs), max([1] + [len(s) for s in seqs])), dtype=torch.long)
        for r, s in enumerate(seqs):
            if s:
                x[r, -len(s):] = torch.tensor(s, dtype=torch.long) + 1
        return x

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(n, w, dim)`` of left-padded ``x`` (``w <= max_len``; the last column is the
        latest item, position embeddings count back from it).

        A real position attends to the real positions up to itself only (causal and key padding mask);
        a padding position attends to itself only, so no query is left with nothing to attend to (a plain
        key padding mask would give those queries NaN outputs, which reach the real positions through
        the next block's values: 0 x NaN = NaN), and padding is zeroed after every block (the original's
        timeline mask). So padding never reaches a real position, whatever the width."""
        n, w = x.shape
        pad = x == 0
        keep = (~pad).unsqueeze(-1).to(self.pos.weight.dtype)
        h = self.drop(self.in_norm(self.item(x) + self.pos.weight[self.max_len - w:].unsqueeze(0))) * keep
        eye = torch.eye(w, dtype=torch.bool)
        blocked = torch.triu(torch.ones(w, w, dtype=torch.bool), 1).unsqueeze(0) | (pad.unsqueeze(1) & ~eye)
        blocked = blocked.repeat_interleave(self.heads, dim=0)  # (n * heads, w, w), batch-major
        for layer in self.blocks.layers:
            h = layer(h, src_mask=blocked) * keep
        return self.norm(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item.weight[1:].T

    def _loss(self, inp: torch.Tensor, tgt: torch.Tensor, group: int = 16) -> torch.Tensor:
        """Next-item cross-entropy over the whole catalog at the real positions (target >= 0) only: their
        hidden states are gathered first, then one matmul against the item embeddings.

        The batch's histories are sorted by length and run through the blocks ``group`` at a time, each
        group cut to its longest history: the same loss as one full-width pass (padding never reaches a
        real position), with far fewer padded positions when most histories are short."""
        lens = (inp != 0).sum(1)
        hs, ts = [], []
        for idx in torch.argsort(lens, stable=True).split(group):
            w = max(1, int(lens[idx].max()))
            t = tgt[idx, -w:]
            real = t >= 0
            hs.append(self._hidden(inp[idx, -w:])[real])
            ts.append(t[real])
        return nn.functional.cross_entropy(self._logits(torch.cat(hs)), torch.cat(ts))

    def fit(self, train_seqs, users, ratings=None, seed: int = 0, epochs: int = 200, batch: int = 128,
            lr: float = 1e-3, valid=None, patience: int = 10, patience_steps: int = 1000,
            max_minutes: float | None = None, log=None):
        """Train on ``train_seqs`` (each user's training items in time order).

        Early stopping waits ``patience`` epochs *and* ``patience_steps`` optimizer steps without a better
        validation NDCG@10: on a data set with few users (610 on MovieLens-small: 17 steps an epoch) ten
        epochs are too few steps to tell noise from a plateau.

        ``valid``: ``(histories, truths)``, each history the user's training items and its truth the
        validation item; the model is scored on it after every epoch and the best epoch's weights are
        kept. Without it the model trains ``epochs`` epochs (or ``max_minutes``) and keeps the last
        weights. The test split is never seen here."""
        import copy
        import time

        torch.manual_seed(seed)
        t0 = time.perf_counter()
        limit = max_minutes * 60 if max_minutes else None
        seqs = [list(q) for q in train_seqs if len(q) >= 2]
        # long histories contribute every window of max_len + 1 items (stride max_len)
        windows = []
        for q in seqs:
            for end in range(len(q), 1, -self.max_len):
                windows.append(q[max(0, end - self.max_len - 1):end])
        inp = self._pad([w[:-1] for w in windows])
        tgt = self._pad([w[1:] for w in windows]) - 1  # -1: padding, never a target
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        best_state, best, since = None, -1.0, 0
        self.best_epoch, self.epochs_run, self.best_val_ndcg10, self.val_history = 0, 0, None, []
        out_of_time = not windows  # nothing to learn from: the initial weights stay
        steps_done, best_step = 0, 0
        for epoch in range(1, epochs + 1):
            if out_of_time:
                break
            self.train()
            perm = torch.randperm(len(inp), generator=g)
            total, steps = 0.0, 0
            for s in range(0, len(inp), batch):
                b = perm[s:s + batch]
                loss = self._loss(inp[b], tgt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
                steps_done += 1
                if limit is not None and time.perf_counter() - t0 > limit:
                    out_of_time = True
                    break
            self.epochs_run, loss = epoch, total / max(1, steps)
            if valid is not None:
                ndcg = self.valid_ndcg10(*valid)
                self.val_history.append(ndcg)
                if ndcg > best:
                    best, since, self.best_epoch, best_step = ndcg, 0, epoch, steps_done
                    best_state = copy.deepcopy(self.state_dict())
                else:
                    since += 1
                if log:
                    log(f"SASRec epoch {epoch}: loss {loss:.4f} valid NDCG@10 {ndcg:.4f} "
                        f"(best {best:.4f} at {self.best_epoch}) {time.perf_counter() - t0:.0f} s")
                if since >= patience and steps_done - best_step >= patience_steps:
                    break
            else:
                self.best_epoch = epoch
                if log:
                    log(f"SASRec epoch {epoch}: loss {loss:.4f} {time.perf_counter() - t0:.0f} s")
        if best_state is not None:
            self.load_state_dict(best_state)
            self.best_val_ndcg10 = best
        self.train_seconds = time.perf_counter() - t0
        self.eval()
        return self

    @torch.no_grad()
    def valid_ndcg10(self, histories, truths, batch: int = 1024) -> float:
        """Full-ranking NDCG@10 of ``truths`` after ``histories`` (each history's items excluded)."""
        from .metrics import ranking_metrics

        ranks = full_ranks(self, histories, truths, batch)
        return ranking_metrics(ranks, ks_hr=(10,), ks_ndcg=(10,))["NDCG@10"] if len(ranks) else 0.0

    @torch.no_grad()
    def scores(self, histories, users, batch: int = 1024) -> np.ndarray:
        """``(n, n_items)`` scores after each history (its last ``max_len`` items), in eval mode; histories
        are grouped by length into batches of ``batch`` (the same scores, far less padding)."""
        was = self.training
        self.eval()
        histories = list(histories)
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        order = np.argsort([min(len(h), self.max_len) for h in histories], kind="stable")
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            h = self._hidden(self._pad([histories[i] for i in idx]))[:, -1]
            out[idx] = self._logits(h).numpy()
        self.train(was)
        return out


def full_ranks(model, histories, truths, batch: int = 1024, users=None) -> np.ndarray:
    """0-based rank of each truth among all items by ``model.scores`` (the history's items excluded,
    ties counted against the truth), in batches of ``batch`` users."""
    out = np.empty(len(truths), dtype=np.int64)
    for s in range(0, len(truths), batch):
        hist = list(histories[s:s + batch])
        sc = np.array(model.scores(hist, None if users is None else list(users[s:s + batch])), dtype=np.float32)
        tr = np.asarray(truths[s:s + batch], dtype=np.int64)
        for r, hs in enumerate(hist):
            if len(hs):
                sc[r, np.asarray(hs, dtype=np.int64)] = -np.inf
        t = sc[np.arange(len(tr)), tr][:, None]
        out[s:s + len(tr)] = (sc > t).sum(axis=1) + (sc == t).sum(axis=1) - 1
    return out


BASELINES = {"popularity": Popularity, "two-tower": TwoTower, "SASRec": SASRec}
