"""prepare --update's catalog: the old catalog row for row, the new items after it with IDs numbered on in the
dataset's scheme (no Ray)."""
import numpy as np
import pandas as pd
import pytest

from recflm.prepare_update import extend_catalog


def _stats(items, n_train, train_key):
    return pd.DataFrame({"item": items, "source": "s", "n_train": n_train, "n_total": [n + 1 for n in n_train],
                         "train_key": train_key, "other_key": np.arange(len(items), dtype=float)})


OLD = pd.DataFrame({"item": ["s:a", "s:b", "s:c"], "index": [0, 1, 2], "id_text": ["2", "1", "3"], "source": "s",
                    "title": ["A", "B", "C"], "genres": None, "n_train": [5, 5, 5], "n_total": [6, 6, 6]})


@pytest.mark.parametrize("scheme", ["sequential", "random"])
def test_old_items_kept_new_ones_numbered_on(scheme):
    # s:c lost its interactions (k-core); s:e and s:d are new, s:e appears first in training, s:f only held out
    stats = _stats(["s:a", "s:b", "s:e", "s:d", "s:f"], [4, 2, 3, 1, 0], [5.0, 1.0, 0.0, 2.0, np.nan])
    meta = pd.DataFrame({"item": ["s:d", "s:e"], "title": ["D", "E"], "genres": ["x", "y"]})
    cat = extend_catalog(OLD, stats, scheme, seed=1, meta=meta)
    assert cat.iloc[:3][["item", "index", "id_text", "title"]].equals(OLD[["item", "index", "id_text", "title"]])
    assert cat["n_train"].tolist()[:3] == [4, 2, 0] and cat["n_total"].tolist()[:3] == [5, 3, 0]
    new = cat.iloc[3:]
    assert new["index"].tolist() == [3, 4, 5] and sorted(new["id_text"].astype(int)) == [4, 5, 6]
    assert dict(zip(new["item"], new["title"]))["s:d"] == "D"
    if scheme == "sequential":  # training items in first-appearance order, the held-out-only item last
        assert new["item"].tolist() == ["s:e", "s:d", "s:f"] and new["id_text"].tolist() == ["4", "5", "6"]


def test_collaborative_new_items_get_a_branch_of_their_own():
    old = OLD.assign(id_text=["<a0><b0>", "<a0><b1>", "<a1><b0>"])
    stats = _stats(["s:a", "s:x", "s:y"], [1, 1, 1], [0.0, 1.0, 2.0])
    cat = extend_catalog(old, stats, "collaborative", seed=1, meta=pd.DataFrame())
    assert cat["id_text"].tolist()[:3] == old["id_text"].tolist()
    assert cat["id_text"].tolist()[3:] == ["<a2><b0><c0>", "<a2><b0><c1>"]  # no new ID is a prefix of an old one


def test_nothing_new_keeps_the_catalog():
    cat = extend_catalog(OLD, _stats(["s:a"], [1], [0.0]), "sequential", seed=1, meta=pd.DataFrame())
    assert cat["item"].tolist() == OLD["item"].tolist() and cat["id_text"].tolist() == OLD["id_text"].tolist()
