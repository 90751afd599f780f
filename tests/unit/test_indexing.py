import numpy as np
import pandas as pd
import scipy.sparse as sp

from recflm.indexing import assign_ids, collaborative_paths


def stats():
    return pd.DataFrame({
        "item": ["x", "y", "z", "w"], "n_train": [1, 2, 0, 1],
        "train_key": [30.0, 10.0, np.nan, 20.0], "other_key": [np.nan, np.nan, 5.0, np.nan]})


def test_sequential_numbers_training_items_first():
    cat = assign_ids(stats(), "sequential", 0).set_index("item")
    assert cat["id_text"].to_dict() == {"y": "1", "w": "2", "x": "3", "z": "4"}
    assert sorted(cat["index"]) == [0, 1, 2, 3]


def test_random_is_a_seeded_permutation():
    a = assign_ids(stats(), "random", 1).set_index("item")["id_text"]
    b = assign_ids(stats(), "random", 1).set_index("item")["id_text"]
    assert a.to_dict() == b.to_dict() and sorted(a.astype(int)) == [1, 2, 3, 4]


def test_collaborative_groups_share_prefixes():
    # two dense blocks of 40 items each, no edges between them
    n = 80
    rows, cols = [], []
    for block in (range(0, 40), range(40, 80)):
        for i in block:
            for j in block:
                if i != j:
                    rows.append(i)
                    cols.append(j)
    adj = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    paths = collaborative_paths(adj, clusters=2, leaf_size=50, seed=0)
    first = {p[0] for p in paths[:40]}
    second = {p[0] for p in paths[40:]}
    assert len(first) == 1 and len(second) == 1 and first != second
    texts = ["".join(p) for p in paths]
    assert len(set(texts)) == n  # every item has its own ID


def test_collaborative_catalog_ids_unique_with_isolated_items():
    s = pd.DataFrame({"item": [f"i{k}" for k in range(6)], "n_train": 1, "train_key": 1.0, "other_key": np.nan})
    adj = sp.csr_matrix(([1.0, 1.0], ([0, 1], [1, 0])), shape=(6, 6))
    cat = assign_ids(s, "collaborative", 0, cooc=adj, clusters=4, leaf_size=2)
    assert cat["id_text"].is_unique and all(t.startswith("<a") for t in cat["id_text"])
