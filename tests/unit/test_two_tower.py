"""The two-tower baseline / candidate model: answers by history (no per-user ID), reads item attributes,
learns next-item from history, stops early on validation, and saves and loads without retraining."""
import numpy as np
import pandas as pd
import pytest
import torch

from recflm.baselines import TwoTower, attribute_ids

torch.set_num_threads(1)
N_ITEMS = 40


def _chains(n_users=240, seed=0):
    """Each user walks the catalog in order (item i is followed by i + 1) from a random start, 4-12 items."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        start, n = int(rng.integers(0, N_ITEMS - 13)), int(rng.integers(4, 13))
        out.append(list(range(start, start + n)))
    return out


def test_learns_next_item_from_the_history():
    seqs = _chains()
    train = [s[:-1] for s in seqs]
    model = TwoTower(N_ITEMS, dim=32, dropout=0.0).fit(train, epochs=8, negatives=64)
    scores = model.scores(train)
    assert scores.shape == (len(train), N_ITEMS) and np.isfinite(scores).all()
    top = np.argsort(-scores, axis=1)[:, :5]
    # random is 5/40; the chain's next item is fully determined by the last one
    assert np.mean([s[-1] in row for s, row in zip(seqs, top)]) > 0.5
    assert model.epochs_run == 8 and model.val_history == []


def test_scores_depend_on_the_history_not_the_user():
    model = TwoTower(N_ITEMS, dim=16).fit(_chains(60), epochs=2, negatives=32)
    a = model.scores([[1, 2, 3], [20, 21]], users=["u1", "u1"])
    assert not np.allclose(a[0], a[1])  # the same user, two histories: two answers
    b = model.scores([[1, 2, 3]], users=["someone never seen"])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert np.isfinite(model.scores([[]])).all()  # an empty history gets (uninformative) scores too


def test_attributes_change_the_item_tower():
    seqs = _chains(60)
    attrs = [[i % 3] for i in range(N_ITEMS)]
    plain = TwoTower(N_ITEMS, dim=16)
    feat = TwoTower(N_ITEMS, dim=16, attrs=attrs)
    feat.load_state_dict({k: v for k, v in plain.state_dict().items() if k not in ("attr.weight", "attr_table")},
                         strict=False)  # the same ID weights: only the attributes differ
    h = [[1, 2, 3]]
    assert not np.allclose(plain.scores(h), feat.scores(h))
    assert feat.n_attrs == 3 and plain.n_attrs == 0
    feat.fit(seqs, epochs=1, negatives=32)
    assert np.isfinite(feat.scores(h)).all()
    with pytest.raises(ValueError, match="attrs: 3 lists for 40 items"):
        TwoTower(N_ITEMS, attrs=[[0], [1], [2]])


def test_attribute_ids_from_the_catalog():
    cat = pd.DataFrame({"attributes": [["Comedy", "Drama"], [], None, ["Drama", "Drama"]]})
    ids, vocab = attribute_ids(cat)
    assert vocab == ["Comedy", "Drama"] and ids == [[0, 1], [], [], [1]]
    assert attribute_ids(pd.DataFrame({"item": ["a", "b"]})) == ([[], []], [])


def test_save_and_load_give_identical_scores(tmp_path):
    attrs = [[i % 4, 4 + i % 2] for i in range(N_ITEMS)]
    model = TwoTower(N_ITEMS, dim=16, attrs=attrs).fit(_chains(60), epochs=2, negatives=32)
    model.save(tmp_path / "b", extra={"items": [f"i{i}" for i in range(N_ITEMS)]})
    back = TwoTower.load(tmp_path / "b")
    h = [[1, 2, 3], [30], []]
    np.testing.assert_array_equal(model.scores(h), back.scores(h))
    assert back.config["items"][3] == "i3" and back.epochs_run == 2
    with pytest.raises(FileNotFoundError, match="recflm candidates"):
        TwoTower.load(tmp_path / "nothing")


def test_early_stopping_keeps_the_best_epoch():
    seqs = _chains()
    train = [s[:-2] for s in seqs]
    valid = (train, [s[-2] for s in seqs])
    model = TwoTower(N_ITEMS, dim=16).fit(train, epochs=12, negatives=32, valid=valid, patience=2)
    hist = model.val_history
    assert len(hist) == model.epochs_run and 1 <= model.best_epoch <= model.epochs_run
    assert model.best_val_ndcg10 == max(hist) == hist[model.best_epoch - 1]
    assert model.epochs_run == 12 or model.epochs_run == model.best_epoch + 2
    assert abs(model.valid_ndcg10(*valid) - model.best_val_ndcg10) < 1e-6  # the best weights are restored
