"""The baselines learn what they should on data with an obvious answer (short, padded histories included)."""
import numpy as np
import torch

from recflm.baselines import SASRec, Popularity, full_ranks

torch.set_num_threads(1)
N_ITEMS = 40


def _chains(n_users=240, seed=0):
    """Each user walks the catalog in order (item i is followed by i + 1) from a random start, 3-12 items:
    the next item is fully determined by the last one, and most histories are far shorter than max_len."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, n = int(rng.integers(0, N_ITEMS - 13)), int(rng.integers(4, 13))
        seqs.append(list(range(start, start + n)))
    return seqs


def _hit_rate(scores: np.ndarray, truth: list[int], k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([t in row for t, row in zip(truth, top)]))


def test_sasrec_learns_next_item_on_short_histories():
    seqs = _chains()
    train = [s[:-1] for s in seqs]
    model = SASRec(N_ITEMS, dim=32, max_len=20, dropout=0.0).fit(train, list(range(len(seqs))), epochs=15, lr=3e-3,
                                                                 batch=32)
    scores = model.scores(train, list(range(len(seqs))))
    assert np.isfinite(scores).all()
    # seeds 0-3 and 1-2 threads give 0.87-0.94; random is 1/40, the old key-padding-mask code 0.04
    assert _hit_rate(scores, [s[-1] for s in seqs], 1) > 0.7
    # a history of one item (19 padding positions before it) still points at its successor, for most items that
    # start a training walk (one exact argmax depends on the CPU's float rounding: seeds and threads give 0.74-0.96)
    starts = sorted({s[0] for s in train})
    one = model.scores([[i] for i in starts], [0] * len(starts))
    assert np.isfinite(one).all()
    assert np.mean(one.argmax(axis=1) == np.array(starts) + 1) > 0.5


def test_popularity_and_two_tower():
    seqs = _chains()
    users = [f"u{i}" for i in range(len(seqs))]
    pop = Popularity(N_ITEMS).fit(seqs, users)
    counts = np.bincount(np.concatenate(seqs), minlength=N_ITEMS)
    assert int(np.argmax(pop.scores([[]], ["x"])[0])) == int(np.argmax(counts))



def test_sasrec_loss_only_at_real_positions():
    """The catalog logits are computed for the real positions only, and the loss is the cross-entropy of
    exactly those positions: the same as full-width logits with the padding targets ignored."""
    seqs = _chains()[:50]
    model = SASRec(N_ITEMS, dim=16, max_len=20, dropout=0.0).eval()
    inp, tgt = torch.zeros((len(seqs), 20), dtype=torch.long), torch.full((len(seqs), 20), -1)
    a, b = model._pad([s[:-1] for s in seqs]), model._pad([s[1:] for s in seqs]) - 1  # the longest history's width
    inp[:, -a.shape[1]:], tgt[:, -b.shape[1]:] = a, b  # full width: more than half of it padding
    rows = []
    orig = model._logits
    model._logits = lambda h: (rows.append(h.shape[0]), orig(h))[1]
    with torch.no_grad():
        loss = model._loss(inp, tgt)
        full = model._hidden(inp)  # one full-width pass: every position, padding included
        ref = torch.nn.functional.cross_entropy(orig(full).reshape(-1, N_ITEMS), tgt.reshape(-1), ignore_index=-1)
    assert rows == [int((tgt >= 0).sum())] and rows[0] == sum(len(s) - 1 for s in seqs) < tgt.numel() // 2
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-4
    # padding never reaches a real position: scores do not depend on the batch's width or neighbours
    hist = [s[:-1] for s in seqs]
    alone = np.stack([model.scores([h], [0])[0] for h in hist[:8]])
    assert np.abs(model.scores(hist, [0] * len(hist))[:8] - alone).max() < 1e-4


def test_sasrec_learns_short_padded_chains_at_full_width():
    """max_len 50 and histories of 2-11 items: over 80% of every window is padding, and the model still
    learns the chains (a loss that counted padding targets, or padding leaking into real positions, fails)."""
    seqs = _chains(seed=1)
    train = [s[:-1] for s in seqs]
    model = SASRec(N_ITEMS, dim=32, max_len=50, dropout=0.0).fit(train, None, epochs=15, lr=3e-3, batch=32, seed=1)
    scores = model.scores(train, None)
    assert np.isfinite(scores).all()
    assert _hit_rate(scores, [s[-1] for s in seqs], 1) > 0.7  # random: 1/40


def test_sasrec_early_stopping_restores_the_best_epoch():
    seqs = _chains(seed=2)
    train = [s[:-2] for s in seqs]
    valid = ([s[:-2] for s in seqs], [s[-2] for s in seqs])
    model = SASRec(N_ITEMS, dim=32, max_len=20, dropout=0.2)
    model.fit(train, None, epochs=40, lr=3e-3, batch=32, valid=valid, patience=3, patience_steps=0, seed=2)
    hist = model.val_history
    assert len(hist) == model.epochs_run and 1 <= model.best_epoch <= model.epochs_run <= 40
    assert model.best_val_ndcg10 == max(hist) == hist[model.best_epoch - 1] > 0.5  # random: ~0.07
    # stopped by patience: no improvement in the epochs after the best one
    assert model.epochs_run == 40 or model.epochs_run == model.best_epoch + 3
    assert all(v <= model.best_val_ndcg10 for v in hist[model.best_epoch:])
    # the restored weights are the best epoch's: they score the recorded validation NDCG@10 again
    assert abs(model.valid_ndcg10(*valid) - model.best_val_ndcg10) < 1e-9
    assert not model.training
    # the test item was never seen: it is ranked after the training items
    ranks = full_ranks(model, [s[:-1] for s in seqs], [s[-1] for s in seqs])
    assert (ranks >= 0).all() and np.mean(ranks < 10) > 0.5


def test_sasrec_patience_counts_steps_too():
    """240 users, batch 32: 8 steps an epoch. Three epochs without a better validation score are 24 steps,
    too few to stop on; with patience_steps=80 it waits at least 10 epochs after its best (or runs out)."""
    seqs = _chains(seed=3)
    train = [s[:-2] for s in seqs]
    valid = ([s[:-2] for s in seqs], [s[-2] for s in seqs])
    model = SASRec(N_ITEMS, dim=16, max_len=20, dropout=0.2)
    model.fit(train, None, epochs=30, lr=1e-3, batch=32, valid=valid, patience=3, patience_steps=80, seed=3)
    steps_per_epoch = -(-len(train) // 32)
    assert steps_per_epoch == 8
    assert model.epochs_run == 30 or (model.epochs_run - model.best_epoch) * steps_per_epoch >= 80
    assert model.epochs_run == 30 or model.epochs_run - model.best_epoch >= 10


def test_sasrec_time_limit_and_no_validation():
    seqs = _chains()
    model = SASRec(N_ITEMS, dim=16, max_len=20).fit(seqs, None, epochs=50, max_minutes=1e-6)
    assert model.epochs_run == 1 and model.best_val_ndcg10 is None  # stopped within its first epoch
    model = SASRec(N_ITEMS, dim=16, max_len=20).fit(seqs, None, epochs=2)
    assert model.epochs_run == model.best_epoch == 2 and model.val_history == []
    # nothing to learn from (no history of two items): no crash, finite scores
    model = SASRec(N_ITEMS, dim=16, max_len=20).fit([[1], []], None, epochs=3, valid=([[1], []], [2, 3]))
    assert model.epochs_run == 0 and np.isfinite(model.scores([[1], []], None)).all()


def test_popularity_without_ratings():
    """A data set without a rating column passes empty rating arrays (float, as pandas gives them)."""
    seqs = _chains()
    users = [f"u{i}" for i in range(len(seqs))]
    for ratings in ({"items": np.array([], dtype=float), "values": np.array([], dtype=float)},
                    {"items": [], "values": []}, None):
        pop = Popularity(N_ITEMS).fit(seqs, users, ratings=ratings)
        assert not pop.rates and pop.scores([[1]], ["u0"]).shape == (1, N_ITEMS)
    pop = Popularity(N_ITEMS).fit(seqs, users, ratings={"items": np.array([0.0, 0.0, 3.0]),
                                                        "values": np.array([4.0, 2.0, 5.0])})
    assert pop.rates and pop.predict_rating(["u0"] * 3, [0, 3, 5]) == [3.0, 5.0, pop.global_mean]
