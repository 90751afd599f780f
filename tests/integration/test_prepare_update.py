"""``recflm prepare --update``: new rows appended to a prepared dataset, old item IDs kept, new ones after them,
known rows rejected with their reason, the split moved forward, the directory replaced atomically."""
import json
import shutil

import pandas as pd
import pytest

from recflm.bundle import catalog_relation, check_catalog_mode
from recflm.config import SourceConfig
from recflm.dataset import PreparedData
from recflm.prepare import PrepareError

pytestmark = pytest.mark.integration

COLUMNS = {"user": "user", "item": "item", "rating": "rating", "ts": "ts"}


def test_old_items_keep_their_ids_and_new_ones_come_after(updated_data):
    old, new = PreparedData.open(updated_data["base"]), PreparedData.open(updated_data["data"])
    n = len(old.catalog)
    head = new.catalog.iloc[:n]
    for c in ("item", "index", "id_text"):
        assert head[c].astype(str).tolist() == old.catalog[c].astype(str).tolist()
    fresh = new.catalog.iloc[n:]
    assert set(fresh["item"]) == {f"shop:i{i}" for i in range(25, 30)}  # the items only the update has
    assert fresh["index"].tolist() == list(range(n, n + len(fresh)))
    assert sorted(int(t) for t in fresh["id_text"]) == list(range(n + 1, n + len(fresh) + 1))
    assert catalog_relation(old.catalog, new.path) == "extends"
    assert check_catalog_mode(old.catalog, new.path, "extend") == "extends"
    # every sequence's ids are the catalog's id texts of its items
    seqs = new.sequences_pandas(columns=["items", "ids", "index"])
    ids = dict(zip(new.catalog["item"], new.catalog["id_text"]))
    assert all([ids[i] for i in items] == list(s) for items, s in zip(seqs["items"], seqs["ids"]))


def test_known_rows_are_rejected_with_their_reasons_and_counted(updated_data):
    old, new = PreparedData.open(updated_data["base"]), PreparedData.open(updated_data["data"])
    st = new.stats
    assert st["rejected_by_reason"]["already_in_dataset"] == 1
    assert st["rejected_by_reason"]["already_rejected"] == 1
    assert st["input_rows"] == old.stats["input_rows"] + len(updated_data["new_rows"])
    assert st["input_rows"] == st["kept"] + st["rejected"]
    rejects = new.rejects_pandas()
    assert len(rejects) == st["rejected"]
    known = rejects[rejects["reason"] == "already_in_dataset"].iloc[0]
    u, i, _, t = updated_data["base_rows"][0]
    assert (known["user"], known["item"], known["ts"]) == (f"shop:{u}", f"shop:{i}", str(t))
    assert rejects["reason"].value_counts()["bad_rating"] == 1  # the old reject is kept, not counted again
    inter = new.interactions_pandas()
    assert len(inter) == st["kept_interactions"]
    assert not inter.duplicated(["user", "item"]).any()
    upd = new.manifest["updates"][-1]
    assert upd["input_rows"] == len(updated_data["new_rows"]) and upd["new_items"] == 5 and upd["new_users"] == 5
    assert upd["kept"] == len(updated_data["new_rows"]) - 2
    assert any(s.get("update") == 1 for s in new.manifest["sources"])


def test_the_split_moves_forward_to_the_newest_interactions(updated_data):
    new = PreparedData.open(updated_data["data"])
    base = PreparedData.open(updated_data["base"])
    rows = pd.DataFrame(updated_data["base_rows"][:-1] + updated_data["new_rows"][:-2],
                        columns=["user", "item", "rating", "ts"])
    latest = rows.sort_values("ts").groupby("user").tail(2).sort_values("ts")
    seqs = new.sequences_pandas().set_index("user")
    old_seqs = base.sequences_pandas().set_index("user")
    for user, g in latest.groupby("user"):
        s = seqs.loc[f"shop:{user}"]
        assert list(s["items"][-2:]) == [f"shop:{i}" for i in g["item"]]  # valid, test: the newest two
        assert s["n_train"] == len(s["items"]) - 2
        if user.startswith("u") and int(user[1:]) < 20:  # an old user with new rows: its old test item trains now
            old_test = old_seqs.loc[f"shop:{user}"]["items"][-1]
            assert old_test in list(s["items"][:s["n_train"]])
    split = new.interactions_pandas(columns=["user", "ts", "split"])
    last = split.sort_values("ts").groupby("user").tail(1)
    assert set(last["split"]) == {"test"}


def test_a_failure_mid_write_leaves_the_dataset_as_it_was(updated_data, monkeypatch, tmp_path):
    import recflm.prepare_update as pu

    d = tmp_path / "data"
    shutil.copytree(updated_data["base"], d)
    before = {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pu, "_merge_stats", boom)  # after the row outputs are written, before the swap
    with pytest.raises(RuntimeError, match="disk full"):
        pu.update(d, [SourceConfig(type="table", path=str(updated_data["new_csv"]), columns=COLUMNS)],
                  log=lambda *a: None)
    after = {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    assert after == before
    assert not (tmp_path / ("data" + pu.TMP_SUFFIX)).exists()


def test_bad_updates_are_refused_with_the_problem_named(updated_data, tmp_path):
    from recflm.prepare_update import update

    new_csv = str(updated_data["new_csv"])
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        update(tmp_path, [SourceConfig(type="table", path=new_csv, columns=COLUMNS)], log=lambda *a: None)
    d = tmp_path / "copy"
    shutil.copytree(updated_data["base"], d)
    with pytest.raises(PrepareError, match="columns .* do not match"):
        update(d, [SourceConfig(type="table", path=new_csv, columns={**COLUMNS, "text": "rating"})],
               log=lambda *a: None)
    with pytest.raises(PrepareError, match="no source of that name"):
        update(d, [SourceConfig(type="table", path=new_csv, columns=COLUMNS, name="other")], log=lambda *a: None)
    with pytest.raises(PrepareError, match="needs the new rows"):
        update(d, [], log=lambda *a: None)
    assert json.loads((d / "manifest.json").read_text()).get("updates") is None


def test_cli_update_error_is_one_line(updated_data, tmp_path, capsys):
    from recflm.cli import main

    code = main(["prepare", "--update", str(tmp_path), "--table", str(updated_data["new_csv"]),
                 "--columns", "user=user,item=item,rating=rating,ts=ts"])
    assert code == 2 and "not a prepared dataset" in capsys.readouterr().err


def test_finetune_extends_the_bundle_to_the_updated_catalog(updated_data, updated_bundle):
    from recflm.bundle import load_bundle

    base, updated = (load_bundle(b) for b in updated_bundle)
    data = PreparedData.open(updated_data["data"])
    assert updated.catalog["item"].tolist() == data.catalog["item"].tolist()
    assert updated.manifest["init_bundle"] == str(base.path) and updated.manifest["train_config"]["catalog"] == "extend"
    old_ids = base.catalog["id_text"].astype(str).tolist()
    new_ids = data.catalog["id_text"].astype(str).tolist()[len(old_ids):]
    # the old items keep their tokens; each new item is one token of its own (a piece the vocabulary had, such
    # as "26", becomes the item's token and starts from a fresh vector)
    old_tokens = base.tokenizer.item_token_ids(old_ids)
    assert updated.tokenizer.item_token_ids(old_ids) == old_tokens
    assert not set(new_ids) & set(base.tokenizer.added) and set(new_ids) <= set(updated.tokenizer.added)
    fresh = updated.tokenizer.item_token_ids(new_ids)
    assert len(set(fresh)) == len(new_ids) and not set(fresh) & set(old_tokens)
    assert updated.model.config.vocab_size == updated.tokenizer.vocab_size >= base.tokenizer.vocab_size
    with pytest.raises(Exception, match="catalog=extend"):  # keep refuses the grown catalog
        check_catalog_mode(base.catalog, data.path, "keep")


def test_cli_update_refuses_settings_that_do_not_apply(tmp_path, capsys):
    from recflm.cli import main

    assert main(["prepare", "--update", str(tmp_path), "--k-core", "3", "--table", str(tmp_path / "new.csv"),
                 "--columns", "user=user,item=item,rating=rating,ts=ts"]) == 2
    assert "--k-core" in capsys.readouterr().err
