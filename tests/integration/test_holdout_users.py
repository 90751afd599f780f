"""``prepare --holdout-users``: users held out of every training family and stage, evaluated as new users.

Tiny synthetic MovieLens data (48 users, 30 titled movies with genres, tags for the explanation family)."""
import re

import numpy as np
import pandas as pd
import pytest

from recflm.config import PrepareConfig, SourceConfig, to_dict
from recflm.dataset import PreparedData
from recflm.prepare import PrepareError, holdout_mask, plan, run

pytestmark = pytest.mark.integration
SHARE = 0.25


def _write_movielens(d):
    rng = np.random.default_rng(5)
    d.mkdir()
    ratings, tags = [], []
    for u in range(1, 49):
        for j, m in enumerate(rng.choice(np.arange(1, 31), size=8, replace=False)):
            ratings.append((u, int(m), float(rng.integers(1, 11)) / 2, 1_000_000 + 1000 * u + j))
            if j % 3 == 0:
                tags.append((u, int(m), f"tag{int(m) % 4}", 1_000_000 + 1000 * u + j))
    pd.DataFrame(ratings, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(d / "ratings.csv", index=False)
    pd.DataFrame(tags, columns=["userId", "movieId", "tag", "timestamp"]).to_csv(d / "tags.csv", index=False)
    pd.DataFrame({"movieId": range(1, 31), "title": [f"Film {m} ({1990 + m})" for m in range(1, 31)],
                  "genres": [["Drama", "Comedy|Romance", "Action|Crime"][m % 3] for m in range(1, 31)]}) \
        .to_csv(d / "movies.csv", index=False)


@pytest.fixture(scope="module")
def held(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("holdout")
    _write_movielens(tmp / "ml")
    cfg = PrepareConfig(sources=[to_dict(SourceConfig(type="movielens", path=str(tmp / "ml")))], out=str(tmp / "data"),
                        k_core=2, holdout_users=SHARE)
    stats = run(cfg, log=lambda *a: None)
    data = PreparedData.open(cfg.out)
    return data, cfg, stats


def test_prepare_marks_held_out_users_and_counts_them(held):
    data, cfg, stats = held
    seqs = data.sequences_pandas(columns=["user", "index", "n_train", "holdout"])
    expected = holdout_mask(seqs["user"], cfg.seed, SHARE)
    assert (seqs["holdout"].to_numpy() == expected).all() and 0 < expected.sum() < len(seqs)
    assert data.holdout_users == frozenset(seqs.loc[expected, "user"])
    assert stats["holdout_users"] == data.manifest["holdout_users"] == int(expected.sum())
    users = pd.read_parquet(data.path / "users.parquet").set_index("user")
    assert users.loc[seqs["user"], "holdout"].to_numpy().tolist() == expected.tolist()
    inter = data.interactions_pandas(columns=["user", "item", "split"])
    new = inter["user"].isin(data.holdout_users)
    # a held-out user's training part is its history; its last two items stay the valid and test targets
    assert set(inter.loc[new, "split"]) == {"history", "valid", "test"} and "history" not in set(inter.loc[~new, "split"])
    n_hist = inter[new & (inter["split"] == "history")].groupby("user").size()
    assert (n_hist == seqs.set_index("user").loc[n_hist.index, "n_train"]).all()
    assert stats["split_rows"]["history"] == int(n_hist.sum())
    assert stats["split_rows"]["train"] == int((~new & (inter["split"] == "train")).sum())
    # item counts and IDs come from the training users only: items first seen in a held-out history come later
    cat = data.catalog.set_index("item")
    train_counts = inter[inter["split"] == "train"]["item"].value_counts()
    assert (cat["n_train"] == train_counts.reindex(cat.index).fillna(0).astype(int)).all()
    if (cat["n_train"] == 0).any():
        assert cat.loc[cat["n_train"] > 0, "index"].max() < cat.loc[cat["n_train"] == 0, "index"].min()
    # deterministic: a pure function of (seed, user), whatever the order; a larger share holds out a superset
    order = np.random.default_rng(0).permutation(len(seqs))
    assert (holdout_mask(seqs["user"].to_numpy()[order], cfg.seed, SHARE) == expected[order]).all()
    assert (holdout_mask(seqs["user"], cfg.seed, 0.6) >= expected).all()
    assert not holdout_mask(seqs["user"], cfg.seed, 0.0).any()
    assert (holdout_mask(seqs["user"], cfg.seed + 1, SHARE) != expected).any()
    for bad in (1.0, -0.1):
        with pytest.raises(PrepareError, match="holdout_users"):
            plan(PrepareConfig(sources=cfg.sources, out=cfg.out, holdout_users=bad))


def test_no_training_example_of_any_family_names_a_held_out_user(held):
    from recflm.augment import example_dataset

    data, cfg, _ = held
    new = sorted(data.holdout_users)
    named = re.compile(r"user_(" + "|".join(re.escape(u) for u in new) + r")(?![0-9])")
    families = ["rating", "sequential", "explanation", "review", "direct", "span"]
    for split in ("train", "valid"):  # what training reads: its examples and its validation
        ex = example_dataset(data.path, cfg, split=split, families=families, held_out=None,
                             log=lambda *a: None).to_pandas()
        assert len(ex) and {"rating", "sequential", "direct", "explanation", "span"} <= set(ex["family"]), split
        assert not set(ex["user"]) & set(new), split
        assert not any(named.search(s) for s in ex["source"]), split
    # the cold-start prompts are trained here: the catalog has titles and genres
    train = example_dataset(data.path, cfg, split="train", families=["direct"], log=lambda *a: None).to_pandas()
    assert train["template"].str.startswith("direct-attr-").any()
    test = example_dataset(data.path, cfg, split="test", families=["sequential"], log=lambda *a: None).to_pandas()
    assert set(new) <= set(test["user"])  # ... and they are evaluated


def test_new_user_slices_for_recflm_rows_and_every_baseline(held, monkeypatch):
    import recflm.baselines as bl
    from recflm.evaluate import EvalConfig, _baseline_results, build_rows, format_cold_start
    from recflm.prompts import TEMPLATES_DIR

    data, cfg, _ = held
    rows, info = build_rows(str(data.path), str(TEMPLATES_DIR), EvalConfig(text_examples=20, cold_users=0),
                            log=lambda *a: None)
    seqs = data.sequences_pandas(columns=["user", "index", "n_train"]).set_index("user")
    new = data.holdout_users
    assert info["holdout"] and info["new_users"] == len(new)  # every held-out user has a test item here
    seen = rows[rows["task"] == "sequential/seen"]
    assert seen["new_user"].sum() == len(new) and seen["user"].isin(new).equals(seen["new_user"])
    for r in seen[seen["new_user"]].itertuples():  # asked from the history the row supplies: its history part
        n = int(seqs.loc[r.user, "n_train"])  # (then, on the test split, the validation item, as for every user)
        assert list(r.history) == [int(i) for i in seqs.loc[r.user, "index"][:n + 1]]
    attr = rows[rows["task"] == "direct-attr"]
    assert len(attr) and attr["source"].str.contains('titled "Film ').all() and set(attr["target"]) == {"yes", "no"}
    choice = rows[rows["task"] == "direct-attr-choice"]
    assert len(choice) and all(c[0] == t for c, t in zip(choice["candidates"], choice["truth"]))

    fitted = {}

    class Recorded(bl.Popularity):
        def fit(self, train_seqs, users, **kw):
            fitted["users"], fitted["seqs"] = list(users), list(train_seqs)
            return super().fit(train_seqs, users, **kw)

    class PerUserId(bl.Popularity):  # a model that scores by a per-user ID table, not the history it is given
        by_history = False

    monkeypatch.setitem(bl.BASELINES, "popularity", Recorded)
    monkeypatch.setitem(bl.BASELINES, "per-user-id", PerUserId)
    res = _baseline_results(str(data.path), rows, info,
                            EvalConfig(two_tower_epochs=1, sasrec_epochs=1, sasrec_patience_steps=0), log=lambda *a: None)
    assert fitted["users"] and not set(fitted["users"]) & new  # no baseline trains on a held-out user
    n_new = int(seen["new_user"].sum())
    for name in ("popularity", "SASRec", "two-tower"):  # they answer from a history: a new user like any other
        for task in ("sequential/seen", "direct"):
            assert res[name][f"{task}|new-user"]["n"] == n_new and "NDCG@10" in res[name][f"{task}|new-user"], name
            assert res[name][f"{task}|seen-user"]["n"] == len(seen) - n_new
        assert 0 <= res[name]["direct-attr"]["AUC"] <= 1 and "direct-attr|new-user" in res[name]
        assert "HR@1" in res[name]["direct-attr-choice"]
    tt = res["per-user-id"]  # a per-user ID model: no answer for a new user, shown n/a, not 0
    assert tt["sequential/seen|new-user"]["n"] == n_new and "n/a" in tt["sequential/seen|new-user"]
    assert "NDCG@10" not in tt["sequential/seen|new-user"] and tt["sequential/seen"]["n"] == len(seen) - n_new
    assert tt["sequential/seen"]["unanswered"] == n_new and "n/a" in tt["direct-attr|new-user"]
    table = format_cold_start(res, info["cold_ks"])
    assert "n/a" in next(x for x in table.splitlines() if x.startswith("sequential/seen|new-user"))
