"""Baselines scored on exactly the split and protocol of ``recflm evaluate``.

- ``Popularity``: items ranked by their number of training interactions; ratings = the item's mean
  training rating (the global mean for items without one), where the data has ratings.
- ``TwoTower``: the embedding model of the Pretraining-FLM recipe, by history: the item tower is the
  item's ID embedding plus the mean of its attribute embeddings (MovieLens genres, Amazon category and
  brand ids, where the data has them), the user tower attention-pools the history's item vectors (with
  recency embeddings; no per-user ID, so any history is answered), cosine similarity over temperature
  0.1, trained to predict each training item from the items before it with a softmax over in-batch plus
  sampled negatives, early stopping on validation NDCG@10. It is also the bundle's candidate model
  (``recflm candidates``, ``POST /v1/candidates``).
- ``SASRec`` (Kang & McAuley 2018), the RecBole-style recipe that matches its published figures:
  causal self-attention over the last 50 items (hidden 64, 2 blocks, 2 heads, inner 256, GELU,
  dropout 0.5), Adam lr 1e-3, batch 128, next-item cross-entropy over the whole catalog at the real
  (non-padding) positions, early stopping on validation NDCG@10 (full ranking) with the best epoch's
  weights restored.

Each exposes ``scores(histories, users) -> (n, n_items)`` (higher is better); the evaluator ranks
them with the same exclusion of seen items and the same candidate lists as the generative model.
Popularity trains on CPU in seconds on the bundled data; two-tower and SASRec with early stopping in
minutes (two-tower at most ``two_tower_minutes``, 5) (about 20 on Amazon Toys on one CPU thread).
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


def attribute_ids(catalog) -> tuple[list[list[int]], list[str]]:
    """The catalog's ``attributes`` column (a list of values per item, in ``index`` order) as attribute ids
    (0..n-1, in order of first appearance) and the vocabulary; no column or no values: empty lists."""
    vocab: dict[str, int] = {}
    out = []
    col = catalog["attributes"] if "attributes" in catalog else [None] * len(catalog)
    for vals in col:
        vals = [] if vals is None or (isinstance(vals, float) and vals != vals) else list(vals)
        out.append([vocab.setdefault(str(v), len(vocab)) for v in dict.fromkeys(vals)])
    return out, list(vocab)


class _EarlyStopping:
    """Best-epoch bookkeeping of a baseline's ``fit``: validation NDCG@10 after every epoch, the best epoch's
    weights kept and restored at the end, a stop after ``patience`` epochs *and* ``patience_steps`` optimizer
    steps without a better score, or after ``max_minutes``. It sets the model's ``best_epoch``, ``epochs_run``,
    ``best_val_ndcg10``, ``val_history`` and ``train_seconds``."""

    def __init__(self, model, valid, patience: int, patience_steps: int = 0, max_minutes: float | None = None,
                 log=None):
        import time

        self.model, self.valid, self.patience, self.patience_steps, self.log = model, valid, patience, \
            patience_steps, log
        self.t0, self.limit = time.perf_counter(), (max_minutes * 60 if max_minutes else None)
        self.best_state, self.best, self.since, self.steps, self.best_step = None, -1.0, 0, 0, 0
        model.best_epoch, model.epochs_run, model.best_val_ndcg10, model.val_history = 0, 0, None, []

    def seconds(self) -> float:
        import time

        return time.perf_counter() - self.t0

    def step(self) -> bool:
        """Count one optimizer step; True when the time is up (the epoch should end now)."""
        self.steps += 1
        return self.limit is not None and self.seconds() > self.limit

    def out_of_time(self) -> bool:
        return self.limit is not None and self.seconds() > self.limit

    def epoch_end(self, epoch: int, loss: float) -> bool:
        """Score the epoch on the validation split (if any), keep the best; True: stop training."""
        import copy

        m = self.model
        m.epochs_run = epoch
        if self.valid is None:
            m.best_epoch = epoch
            if self.log:
                self.log(f"{m.name} epoch {epoch}: loss {loss:.4f} {self.seconds():.0f} s")
            return False
        ndcg = m.valid_ndcg10(*self.valid)
        m.val_history.append(ndcg)
        if ndcg > self.best:
            self.best, self.since, m.best_epoch, self.best_step = ndcg, 0, epoch, self.steps
            self.best_state = copy.deepcopy(m.state_dict())
        else:
            self.since += 1
        if self.log:
            self.log(f"{m.name} epoch {epoch}: loss {loss:.4f} valid NDCG@10 {ndcg:.4f} "
                     f"(best {self.best:.4f} at {m.best_epoch}) {self.seconds():.0f} s")
        return self.since >= self.patience and self.steps - self.best_step >= self.patience_steps

    def finish(self) -> None:
        m = self.model
        if self.best_state is not None:
            m.load_state_dict(self.best_state)
            m.best_val_ndcg10 = self.best
        m.train_seconds = self.seconds()
        m.eval()

    def run(self, opt, epochs: int, n: int, batch: int, g, loss_of) -> None:
        """The epoch loop of a baseline's ``fit``: each epoch, the ``n`` training examples in a fresh order drawn
        from the generator ``g``, ``batch`` at a time; ``loss_of(indices)`` is a batch's loss. It stops early
        as ``epoch_end`` says, or when the time is up, and restores the best epoch (``finish``)."""
        for epoch in range(1, epochs + 1):
            if not n or self.out_of_time():  # nothing to learn from: the initial weights stay
                break
            self.model.train()
            perm = torch.randperm(n, generator=g)
            total, steps = 0.0, 0
            for s in range(0, n, batch):
                loss = loss_of(perm[s:s + batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
                if self.step():
                    break
            if self.epoch_end(epoch, total / max(1, steps)):
                break
        self.finish()


@torch.no_grad()
def valid_ndcg10(model, histories, truths, batch: int = 1024) -> float:
    """Full-ranking NDCG@10 of ``truths`` after ``histories`` (each history's items excluded)."""
    from .metrics import ranking_metrics

    ranks = full_ranks(model, histories, truths, batch)
    return ranking_metrics(ranks, ks_hr=(10,), ks_ndcg=(10,))["NDCG@10"] if len(ranks) else 0.0


class TwoTower(nn.Module):
    """The embedding model of the Pretraining-FLM recipe, answering by history (no per-user ID).

    Item tower: the item's ID embedding plus the mean of its attribute embeddings (``attrs``: attribute ids
    per item, e.g. MovieLens genres or Amazon category / brand ids; an item without attributes, or a
    catalog without them, has its ID embedding only). User tower: attention pooling over the item-tower
    vectors of the last ``max_len`` history items, each with a recency embedding (0 = the latest item),
    then a linear map; so any history, of a known user or not, gets an answer. Scores are cosine
    similarities over ``temperature`` (0.1). Trained like SASRec to predict item t from the items before
    it, for every t of every training sequence, with a softmax over in-batch plus ``negatives`` uniformly
    sampled items (Adam lr 2e-3, batch 64); ``fit(..., valid=(histories, truths))`` stops early on
    validation NDCG@10 and keeps the best epoch (``_EarlyStopping``, shared with SASRec).

    ``save(dir)`` / ``TwoTower.load(dir)``: ``candidates.safetensors`` (the weights and the attribute ids)
    and ``candidates.json`` (the sizes and settings): the candidate model a bundle serves."""

    name = "two-tower"
    by_history = True  # the user tower reads the history it is given: short-history rows are answered too
    WEIGHTS, CONFIG = "candidates.safetensors", "candidates.json"

    def __init__(self, n_items: int, dim: int = 64, temperature: float = 0.1, max_len: int = 50,
                 attrs: list | None = None, dropout: float = 0.1):
        super().__init__()
        self.n_items, self.dim, self.t, self.max_len, self.dropout_p = n_items, dim, temperature, max_len, dropout
        attrs = [list(a) for a in attrs] if attrs is not None else [[] for _ in range(n_items)]
        if len(attrs) != n_items:
            raise ValueError(f"attrs: {len(attrs)} lists for {n_items} items")
        self.n_attrs = 1 + max([-1] + [int(a) for row in attrs for a in row])
        width = max([1] + [len(a) for a in attrs])
        table = torch.zeros((n_items, width), dtype=torch.long)  # attribute id + 1; 0: none
        for i, row in enumerate(attrs):
            if row:
                table[i, :len(row)] = torch.tensor(row, dtype=torch.long) + 1
        self.register_buffer("attr_table", table)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)  # item i -> i + 1; 0 is padding
        self.attr = nn.Embedding(self.n_attrs + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        for emb in (self.item, self.attr, self.pos):
            nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            self.item.weight[0].zero_()
            self.attr.weight[0].zero_()
        self.best_epoch, self.epochs_run, self.best_val_ndcg10, self.val_history = 0, 0, None, []

    # ------------------------------------------------------------------ the towers
    def _item_vecs(self, x: torch.Tensor) -> torch.Tensor:
        """Item-tower vectors of item indices ``x`` + 1 (any shape; 0 = padding gives zeros)."""
        e = self.item(x)
        a = self.attr_table[(x - 1).clamp(min=0)]  # (..., width)
        a = a.masked_fill((x == 0).unsqueeze(-1), 0)
        n = (a > 0).sum(-1, keepdim=True).clamp(min=1).to(e.dtype)
        return e + self.attr(a).sum(-2) / n

    def _users(self, x: torch.Tensor) -> torch.Tensor:
        """User vectors ``(n, dim)`` of left-padded histories ``x`` (``(n, w)``, the last column the latest item)."""
        n, w = x.shape
        pad = x == 0
        h = self.drop(self._item_vecs(x) + self.pos.weight[:w].flip(0).unsqueeze(0))
        logits = (torch.tanh(self.key(h)) @ self.query).masked_fill(pad, -1e9)
        att = torch.softmax(logits, dim=-1) * (~pad).to(h.dtype)  # an empty history pools to zeros
        return self.out((att.unsqueeze(-1) * h).sum(1))

    def _pad(self, seqs) -> torch.Tensor:
        seqs = [list(s)[-self.max_len:] for s in seqs]
        x = torch.zeros((len(seqs), max([1] + [len(s) for s in seqs])), dtype=torch.long)
        for r, s in enumerate(seqs):
            if s:
                x[r, -len(s):] = torch.tensor(s, dtype=torch.long) + 1
        return x

    # ------------------------------------------------------------------ training
    def fit(self, train_seqs, users=None, ratings=None, seed: int = 0, epochs: int = 50, batch: int = 64,
            negatives: int = 1024, lr: float = 2e-3, valid=None, patience: int = 5, patience_steps: int = 0,
            max_minutes: float | None = None, log=None):
        """Train on ``train_seqs`` (each user's training items in time order): every item after the first is
        a target, predicted from the (last ``max_len``) items before it. ``valid`` ``(histories, truths)``:
        early stopping on its NDCG@10 (the best epoch's weights are kept); the test split is never seen."""
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        L = self.max_len
        # every sequence after L padding zeros: the L items before any position are its prefix (padded)
        flat, targets = [], []
        for q in train_seqs:
            q = [int(i) for i in q]
            base = len(flat) + L
            flat += [0] * L + [i + 1 for i in q]
            targets += range(base + 1, base + len(q))
        flat = torch.tensor(flat or [0], dtype=torch.long)
        targets = torch.tensor(targets, dtype=torch.long)
        ar = torch.arange(-L, 0)
        opt = torch.optim.Adam(self.parameters(), lr=lr)

        def loss_of(idx):
            p = targets[idx]
            x, tgt = flat[p.unsqueeze(1) + ar], flat[p] - 1
            u = nn.functional.normalize(self._users(x), dim=-1)
            cand = torch.cat([tgt, torch.randint(0, self.n_items, (negatives,), generator=g)])
            iv = nn.functional.normalize(self._item_vecs(cand + 1), dim=-1)
            logits = u @ iv.T / self.t  # the other rows' positives are negatives too
            same = tgt.unsqueeze(1) == cand.unsqueeze(0)
            same[torch.arange(len(p)), torch.arange(len(p))] = False
            return nn.functional.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(len(p)))

        _EarlyStopping(self, valid, patience, patience_steps, max_minutes, log).run(
            opt, epochs, len(targets), batch, g, loss_of)
        return self

    def valid_ndcg10(self, histories, truths, batch: int = 1024) -> float:
        return valid_ndcg10(self, histories, truths, batch)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def item_matrix(self) -> torch.Tensor:
        """The normalized item-tower vectors of the whole catalog, ``(n_items, dim)``."""
        return nn.functional.normalize(self._item_vecs(torch.arange(1, self.n_items + 1)), dim=-1)

    @torch.no_grad()
    def scores(self, histories, users=None, batch: int = 1024, items: torch.Tensor | None = None) -> np.ndarray:
        """``(n, n_items)`` cosine scores over the temperature after each history (``users`` is not used)."""
        was = self.training
        self.eval()
        items = self.item_matrix() if items is None else items
        histories = list(histories)
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        for s in range(0, len(histories), batch):
            u = nn.functional.normalize(self._users(self._pad(histories[s:s + batch])), dim=-1)
            out[s:s + batch] = (u @ items.T / self.t).numpy()
        self.train(was)
        return out

    # ------------------------------------------------------------------ save / load
    def save(self, path, extra: dict | None = None) -> None:
        """``candidates.safetensors`` and ``candidates.json`` (sizes, settings and ``extra``) under ``path``."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(d / self.WEIGHTS))
        cfg = {"kind": "recflm-candidates", "model": self.name, "n_items": self.n_items, "dim": self.dim,
               "temperature": self.t, "max_len": self.max_len, "dropout": self.dropout_p, "n_attrs": self.n_attrs,
               "attr_width": int(self.attr_table.shape[1]), "best_epoch": self.best_epoch,
               "epochs_run": self.epochs_run, "best_val_ndcg10": self.best_val_ndcg10, **(extra or {})}
        (d / self.CONFIG).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, path) -> "TwoTower":
        """The model ``save`` wrote under ``path``, in eval mode (ValueError naming the file when it is not one)."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        d = Path(path)
        for f in (cls.CONFIG, cls.WEIGHTS):
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d / f}: no candidate model here; run `recflm candidates --bundle {d}`")
        cfg = json.loads((d / cls.CONFIG).read_text())
        if cfg.get("kind") != "recflm-candidates":
            raise ValueError(f"{d / cls.CONFIG}: not a recflm candidate model (kind {cfg.get('kind')!r})")
        state = load_file(str(d / cls.WEIGHTS))
        table = state["attr_table"]
        attrs = [[int(a) - 1 for a in row if a > 0] for row in table.tolist()]
        m = cls(int(cfg["n_items"]), int(cfg["dim"]), float(cfg["temperature"]), int(cfg["max_len"]), attrs,
                float(cfg.get("dropout", 0.1)))
        if m.n_attrs != int(cfg["n_attrs"]):  # attribute ids nobody uses still have their rows
            m.attr = nn.Embedding(int(cfg["n_attrs"]) + 1, m.dim, padding_idx=0)
            m.n_attrs = int(cfg["n_attrs"])
        m.attr_table = table.clone()
        m.load_state_dict(state)
        m.config = cfg
        for key in ("best_epoch", "epochs_run", "best_val_ndcg10"):
            setattr(m, key, cfg.get(key))
        return m.eval()


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
        torch.manual_seed(seed)
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
        _EarlyStopping(self, valid, patience, patience_steps, max_minutes, log).run(
            opt, epochs, len(windows), batch, g, lambda b: self._loss(inp[b], tgt[b]))
        return self

    def valid_ndcg10(self, histories, truths, batch: int = 1024) -> float:
        """Full-ranking NDCG@10 of ``truths`` after ``histories`` (each history's items excluded)."""
        return valid_ndcg10(self, histories, truths, batch)

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
