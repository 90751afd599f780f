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
    table = capsys.readouterr().out
    assert "SASRec" in table and "NDCG@10" in table and "RMSE" in table


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
