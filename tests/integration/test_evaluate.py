"""recflm evaluate on a tiny pretrained bundle (Ray Data batch inference), baselines, and finetune."""
import json

import pytest

from recflm.bundle import load_bundle
from recflm.evaluate import EvalConfig, run

pytestmark = pytest.mark.integration


def test_evaluate_with_baselines(bundled_dataset, tiny_bundle, tmp_path, capsys):
    data, _, _ = bundled_dataset
    bundle, _ = tiny_bundle
    out = run(EvalConfig(bundle=str(bundle), data=str(data), max_users=40, text_examples=12, batch_size=8,
                         baselines=True, two_tower_epochs=3, sasrec_epochs=2, out=str(tmp_path / "m.json")),
              log=lambda *a: None)
    res = out["results"]
    assert set(res) == {"recflm", "popularity", "two-tower", "SASRec"}
    ours = res["recflm"]
    for task in ("sequential/seen", "sequential/held-out"):
        m = ours[task]
        assert m["n"] == 40 and m["invalid"] == 0 and m["short_lists"] == 0  # top-20, all catalog items
        assert 0 <= m["HR@1"] <= m["HR@5"] <= m["HR@10"] <= m["HR@20"] <= 1
        assert m["NDCG@5"] <= m["NDCG@10"] <= m["NDCG@20"] <= m["HR@20"]
    assert ours["direct"]["n"] == 40 and 0 <= ours["direct"]["HR@1"] <= ours["direct"]["HR@10"] <= 1
    # expected-rating decoding always yields a number on the scale: nothing is unparseable
    assert ours["rating"]["n"] == 12 and ours["rating"]["unparseable"] == 0
    assert "BLEU-4" in ours["explanation"] and 0 <= ours["explanation"]["ROUGE-L"] <= 100
    # popularity is a real baseline: the 1-of-100 protocol puts the true item in its top 10 often
    assert res["popularity"]["direct"]["HR@10"] > 0.1
    assert res["SASRec"]["sequential/seen"]["n"] == 40 and "RMSE" in res["popularity"]["rating"]
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["results"]["recflm"]["sequential/seen"]["HR@20"] == ours["sequential/seen"]["HR@20"]
    # every family seen and held out (zero-shot), yes/no prompts, short histories, the seeds' metrics
    for task in ("direct/held-out", "direct-yesno", "direct-yesno/held-out", "rating/held-out",
                 "explanation/held-out", "sequential/last-3", "sequential/last-5"):
        assert ours[task]["n"] > 0, task
    assert ours["direct-yesno"]["n"] == 24  # 12 users: the held-out item and one negative each
    assert all(0 <= ours["direct-yesno"][k] <= 1 for k in ("accuracy", "precision", "recall", "F1"))
    assert ours["rating"]["MSE"] == pytest.approx(ours["rating"]["RMSE"] ** 2)
    assert ours["sequential/seen"]["Recall@10"] == ours["sequential/seen"]["HR@10"]
    # popularity tells a held-out item from a random one: it is right well above chance
    assert res["popularity"]["direct-yesno"]["accuracy"] > 0.6
    assert res["SASRec"]["sequential/last-3"]["n"] == 40 and res["two-tower"]["sequential/last-3"]["n"] == 40
    for method in res.values():  # the cold-start slices, for every method: parts of the whole
        for key in ("sequential/seen|history<5", "sequential/seen|item<=5", "direct|item<=3"):
            assert 0 <= method[key]["n"] <= 40, key
    table = capsys.readouterr().out
    assert "SASRec" in table and "NDCG@10" in table and "RMSE" in table
    assert "zero-shot: seen vs held-out" in table and "cold start" in table and "sequential/last-3" in table


def test_evaluation_rows_ask_every_family_seen_and_held_out(bundled_dataset):
    """The rows build_rows adds for zero-shot, yes/no and cold-start evaluation ask what they say."""
    from recflm.dataset import PreparedData
    from recflm.evaluate import build_rows
    from recflm.prompts import TEMPLATES_DIR, load_templates

    data, _, _ = bundled_dataset
    rows, info = build_rows(str(data), str(TEMPLATES_DIR), EvalConfig(max_users=30, text_examples=10, cold_users=8),
                            log=lambda *a: None)
    temps = load_templates(TEMPLATES_DIR)
    held = {fam: [t.source.split("{")[0] for t in ts if t.held_out] for fam, ts in temps.items()}
    by = {t: g for t, g in rows.groupby("task")}
    seqs = PreparedData.open(data).sequences_pandas(columns=["user", "index", "n_train"]).set_index("user")
    # held-out rows use held-out templates only, on the same examples as the seen rows
    for task, fam in (("sequential/held-out", "sequential"), ("direct/held-out", "direct"),
                      ("direct-yesno/held-out", "direct"), ("rating/held-out", "rating")):
        assert len(by[task]) and all(any(src.startswith(h) for h in held[fam]) for src in by[task]["source"]), task
        seen = by[task.split("/")[0] if task != "sequential/held-out" else "sequential/seen"]
        assert sorted(by[task]["user"]) == sorted(seen["user"]), task
    yes = by["direct-yesno"]
    assert len(yes) == 20 and yes["truth"].sum() == 10 and set(yes["target"]) == {"yes", "no"}
    for r in yes.itertuples():
        (item,) = r.candidates
        index, n_train = seqs.loc[r.user, "index"], int(seqs.loc[r.user, "n_train"])
        # yes: the held-out (test) item; no: an item the user never chose
        assert (item == index[n_train + 1]) if r.truth else (item not in set(index))
    for k in (3, 5):
        short = by[f"sequential/last-{k}"]
        assert len(short) == 8 and (short["history"].map(len) == k).all() and (short["history_len"] == k).all()
        full = by["sequential/seen"].set_index("user")
        assert all(list(h) == list(full.loc[u, "history"])[-k:] and t == full.loc[u, "truth"]
                   for u, h, t in zip(short["user"], short["history"], short["truth"]))
    # the item side of the cold-start slices: the held-out item's training interactions
    inter = PreparedData.open(data).interactions_pandas(columns=["item", "split"])
    counts = inter[inter["split"] == "train"]["item"].value_counts()
    seen = by["sequential/seen"]
    assert all(c == counts.get(i, 0) for i, c in zip(seen["item"], seen["item_count"]))
    # a chosen family only
    only, _ = build_rows(str(data), str(TEMPLATES_DIR), EvalConfig(max_users=5, families=["sequential"], cold_ks=[]),
                         log=lambda *a: None)
    assert set(only["task"]) == {"sequential/seen", "sequential/held-out"}
    with pytest.raises(ValueError, match="unknown family 'ratings'"):
        build_rows(str(data), str(TEMPLATES_DIR), EvalConfig(families=["ratings"]), log=lambda *a: None)


def test_a_failing_baseline_keeps_the_model_results(bundled_dataset, tiny_bundle, tmp_path, monkeypatch):
    import recflm.evaluate as ev

    data, _, _ = bundled_dataset
    bundle, _ = tiny_bundle

    def broken(*a, **k):
        raise RuntimeError("baseline exploded")

    monkeypatch.setattr(ev, "_baseline_results", broken)
    with pytest.raises(RuntimeError, match="baseline exploded"):
        run(EvalConfig(bundle=str(bundle), data=str(data), max_users=10, text_examples=0, batch_size=8,
                       baselines=True, out=str(tmp_path / "m.json")), log=lambda *a: None)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["results"]["recflm"]["sequential/seen"]["n"] == 10
    assert saved["baselines"] == "failed: RuntimeError: baseline exploded"


def test_another_datasets_catalog_is_refused(bundled_dataset, tiny_bundle, tmp_path):
    """Histories are item indices: against another catalog they would name other items."""
    import pandas as pd

    from recflm.bundle import BundleError

    data, _, _ = bundled_dataset
    bundle, _ = tiny_bundle
    other = tmp_path / "other"
    other.mkdir()
    items = pd.read_parquet(data / "items.parquet")
    items["index"] = items["index"].to_numpy()[::-1]  # the same items, indexed otherwise
    items.to_parquet(other / "items.parquet")
    with pytest.raises(BundleError, match="not the bundle's"):
        run(EvalConfig(bundle=str(bundle), data=str(other), max_users=5), log=lambda *a: None)
    items.iloc[:-1].to_parquet(other / "items.parquet")
    with pytest.raises(BundleError, match=r"\d+ items\) is not the bundle's"):
        run(EvalConfig(bundle=str(bundle), data=str(other), max_users=5), log=lambda *a: None)


def test_predictions_exclude_seen_items(bundled_dataset, tiny_bundle):
    from recflm.evaluate import BundlePredictor, build_rows

    data, _, _ = bundled_dataset
    bundle, _ = tiny_bundle
    b = load_bundle(bundle)
    rows, _ = build_rows(str(data), str(b.templates_dir), EvalConfig(max_users=6, text_examples=1), log=lambda *a: None)
    seq = rows[rows["task"] == "sequential/seen"].reset_index(drop=True)
    pred = BundlePredictor(str(bundle), beams=20, top_k=20)(seq)
    for items, hist in zip(pred["items"], seq["history"]):
        assert len(items) == 20 and not set(items) & set(hist)


def test_finetune_from_bundle(bundled_dataset, tiny_bundle, tmp_path):
    from recflm.train import TrainConfig, run as train

    data, _, _ = bundled_dataset
    bundle, base = tiny_bundle
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "ft"), storage_path=str(tmp_path / "runs"), name="ft",
                      workers=0, epochs=1, batch_size=16, max_steps=10, log_every=5, checkpoint_every=10,
                      val_examples=16, val_users=5, shuffle_buffer=100, families=["sequential"],
                      init_bundle=str(bundle))
    out = train(cfg, log=lambda *a: None)
    ft = load_bundle(out)
    assert ft.manifest["init_bundle"] == str(bundle) and ft.manifest["metrics"]["step"] == 10
    assert ft.model.config.d_model == load_bundle(bundle).model.config.d_model  # the bundle's geometry, not a preset
    hist = json.loads((tmp_path / "runs" / "ft" / "metrics.json").read_text())
    assert {k for m in hist for k in m if k.startswith("loss/")} == {"loss/sequential"}
