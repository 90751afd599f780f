"""recflm pretrain on Ray Train: local mode, 2-worker DDP on CPU, and recovery from a worker failure."""
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from recflm.bundle import load_bundle
from recflm.train import TrainConfig, run

pytestmark = pytest.mark.integration


def cfg(data, tmp, **kw):
    base = dict(data=str(data), out=str(tmp / "bundle"), storage_path=str(tmp / "runs"), preset="tiny", epochs=1,
                batch_size=16, vocab_size=600, log_every=5, checkpoint_every=10, val_examples=64, val_users=20,
                shuffle_buffer=200, families=["sequential", "direct", "span", "rating"])
    base.update(kw)
    return TrainConfig(**base)


def history(c):
    return json.loads((Path(c.storage_path) / c.name / "metrics.json").read_text())


def test_local_mode_loss_falls_and_bundle_loads(bundled_dataset, tmp_path):
    data, _, _ = bundled_dataset
    c = cfg(data, tmp_path, workers=0, max_steps=60, name="local")
    out = run(c, log=lambda *a: None)
    h = history(c)
    windows = [m["loss"] for m in h if "loss" in m]
    assert len(windows) >= 4 and windows[-1] < 0.85 * windows[0]
    # balanced mixing: every family is trained within the first 60 steps, rating is not drowned out
    assert {"loss/sequential", "loss/direct", "loss/span", "loss/rating"} <= set().union(*map(set, h))
    assert h[-1]["step"] == 60 and h[-1]["val_loss"] > 0 and 0 <= h[-1]["val_hr10_of_100"] <= 1
    b = load_bundle(out)
    assert b.manifest["metrics"]["step"] == 60 and len(b.catalog) > 0
    enc = b.tokenizer.encode_batch(["Here is the history of user_ml:1: 1, 2, 3. What to recommend next?"])
    with torch.no_grad():
        assert b.model.generate(**enc, max_new_tokens=4).shape[0] == 1


def test_two_worker_ddp_recovers_from_a_failure(bundled_dataset, tmp_path):
    """Rank 0 raises once at step 15; the group restarts from the step-10 checkpoint and finishes."""
    data, _, _ = bundled_dataset
    c = cfg(data, tmp_path, workers=2, cpus_per_worker=0.5, max_steps=30, max_failures=1, fail_at_step=15,
            name="ddp")
    run(c, log=lambda *a: None)
    h = history(c)
    final = h[-1]
    assert final["world_size"] == 2 and final["step"] == 30
    assert (tmp_path / "runs" / "ddp" / "injected_failure").read_text() == "15"
    assert final["resumed_at"] == 10  # restarted from the last checkpoint: 5 steps repeated, < one interval
    assert load_bundle(tmp_path / "bundle").manifest["run"]["name"] == "ddp"


def test_dense_recipe_trains_every_position_and_exports_the_best_epoch(bundled_dataset, tmp_path):
    """The quality recipe's pieces on the bundled data: one token per item, dense sequential and dense rating
    targets, an epoch loop with validation NDCG@10 after each epoch, and the best epoch exported; evaluation
    and serving read the bundle's dense rating input."""
    from recflm.evaluate import EvalConfig, run as evaluate

    data, _, _ = bundled_dataset
    c = cfg(data, tmp_path, workers=0, name="dense", preset="tiny", item_token_mode="token",
            families=["sequential", "rating"], family_weights={"rating": 0.1},
            prompts={"sequential_style": "dense", "dense_max_len": 100, "rating_style": "dense", "rating_window": 25},
            mix="natural", epochs=3, batch_size=64, lr=3e-3, checkpoint_every=10, log_every=5, val_users=60,
            val_examples=32)
    out = run(c, log=lambda *a: None)
    h = history(c)
    steps = [m for m in h if "targets_per_s" in m]
    # a dense row carries one next-item target per history position: many more targets than rows
    assert steps and all(m["targets_per_s"] > 10 * m["samples_per_s"] for m in steps)
    epochs = [m for m in h if "val_ndcg10" in m]
    assert [m["epoch"] for m in epochs] == [0, 1, 2] and epochs[-1]["stopped"] == "done"
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.2  # uniform over the catalog is ~9.2 nats
    best = max(range(3), key=lambda e: epochs[e]["val_ndcg10"])
    assert epochs[-1]["best_epoch"] == best
    b = load_bundle(out)
    # the bundle holds the best epoch's weights: those the last checkpoint carries beside its current ones
    from safetensors.torch import load_file

    final_ckpt = max(Path(c.storage_path, "dense").glob("local_ckpt_*/history.json"),
                     key=lambda p: len(json.loads(p.read_text()))).parent
    best_w = load_file(str(final_ckpt / "best_model.safetensors"))["shared.weight"]
    assert torch.equal(b.model.shared.weight.detach(), best_w)
    assert b.manifest["exported"] == "best" and b.manifest["inference"] == {
        "sequential": "dense", "history": 99, "direct": "sequential", "rating": "dense", "rating_history": 24}
    assert any(m.get("loss/rating", 0) > 0 for m in steps)  # the rating windows were trained
    res = evaluate(EvalConfig(bundle=str(out), max_users=30, text_examples=20, out=str(tmp_path / "m.json")),
                   log=lambda *a: None)["results"]["recflm"]
    for task in ("sequential/seen", "sequential/held-out"):
        assert res[task]["n"] == 30 and res[task]["invalid"] == 0 and res[task]["short_lists"] == 0
    assert res["direct"]["n"] == 30 and 0 <= res["direct"]["NDCG@10"] <= 1
    assert res["rating"]["n"] == 20 and res["rating"]["unparseable"] == 0 and 0 < res["rating"]["RMSE"] < 4
    # dense bundles answer the held-out and yes/no rows by the same next-item scores, held-out ratings by tokens
    assert res["direct/held-out"]["n"] == 30 and res["rating/held-out"]["n"] == 20
    assert res["direct-yesno"]["n"] == 40 and res["direct-yesno"]["positive_share"] == 0.5  # yes above the median
    assert res["sequential/last-3"]["n"] == 30 and res["sequential/last-3"]["invalid"] == 0
    # serving asks the same way: a known user's rated training items, then the item, as the decoder prefix
    from recflm.dataset import PreparedData
    from recflm.generate import predict_ratings_dense
    from recflm.serve_model import ModelState

    st = ModelState(str(out))
    seqs = PreparedData.open(data).sequences_pandas(columns=["user", "ids", "ratings", "n_train"])
    user, ids, ratings, n = seqs.iloc[0]
    src, prefix = st.rating_prompt(str(user), 5)
    assert st.dense_rating and prefix[-1] == st.ids[5] and len(prefix) == 2 * min(24, int(n)) + 1
    assert prefix[-3] == ids[int(n) - 1] and prefix[-2].startswith("<rating_")  # the last training pair
    assert st.rating_prompt("nobody", 5)[1] == [st.ids[5]]
    value = float(predict_ratings_dense(st.bundle.model, st.bundle.tokenizer, [src], [prefix], *st.scale)[0])
    assert st.scale[0] <= value <= st.scale[1]


def test_early_stopping_and_the_time_limit(bundled_dataset, tmp_path):
    data, _, _ = bundled_dataset
    base = dict(workers=0, preset="tiny", item_token_mode="token", families=["sequential"], mix="natural",
                prompts={"sequential_style": "dense", "dense_max_len": 200}, batch_size=64, checkpoint_every=0,
                val_users=20, val_examples=16, lr=1e-9, warmup=0.0)  # an lr that learns nothing: no epoch improves
    c = cfg(data, tmp_path, name="patience", epochs=20, patience=1, **base)
    run(c, log=lambda *a: None)
    epochs = [m for m in history(c) if "val_ndcg10" in m]
    # epoch 0 is the best, epoch 1 is not better: stopped there (the final report repeats epoch 1)
    assert epochs[-1]["stopped"].startswith("early stop") and [m["epoch"] for m in epochs] == [0, 1, 1]
    c = cfg(data, tmp_path, name="clock", epochs=50, max_minutes=0.01, **base)
    run(c, log=lambda *a: None)
    final = history(c)[-1]
    assert final["stopped"].startswith("time limit") and final["epoch"] < 49


def test_a_run_on_uri_storage_keeps_its_tokenizer_and_config_there(bundled_dataset, tmp_path, ray_session):
    """storage_path as a URI (file:// here, s3:// on a cluster): the tokenizer and the run's config are
    written beside the checkpoints, a driver on another machine (a fresh temp dir) finds them there
    instead of training another tokenizer, and the workers get the tokenizer itself, not a driver path."""
    from recflm.config import ConfigError
    from recflm.tokenizer import RecTokenizer
    from recflm.train import setup

    data, _, _ = bundled_dataset
    remote = tmp_path / "bucket"
    small = dict(name="uri", storage_path=f"file://{remote}", families=["sequential"], val_examples=8, val_users=8)
    c = cfg(data, tmp_path, **small)
    logs: list[str] = []
    s = setup(c, log=logs.append)
    stored = remote / "uri" / "tokenizer.json"
    assert stored.is_file() and (remote / "uri" / "config.json").is_file()
    assert any("tokenizer trained" in m for m in logs)
    assert not str(s.run_dir).startswith(str(remote))  # the driver's working copy is elsewhere
    assert RecTokenizer.from_str(s.loop_cfg["tokenizer"]).vocab_size == RecTokenizer.load(stored).vocab_size
    # another driver (its own temp dir) resumes the run: the stored tokenizer, not a new one
    again: list[str] = []
    s2 = setup(cfg(data, tmp_path, **small), log=again.append)
    assert s2.run_dir != s.run_dir and not any("tokenizer trained" in m for m in again)
    assert s2.loop_cfg["tokenizer"] == stored.read_text()
    with pytest.raises(ConfigError, match="vocab_size"):  # the stored config guards the resume
        setup(cfg(data, tmp_path, **small, vocab_size=700), log=lambda *a: None)


def test_self_supervised_pretrain_then_finetune_on_a_share_of_the_users(bundled_dataset, tmp_path):
    """Two stages: masked-item spans of the raw sequences only (no prompt family, validated by the span loss
    of the valid items), whose tokenizer still encodes every family's prompts without <unk>; then a
    fine-tune of that bundle on a labelled family with 30% of the users."""
    from recflm.augment import example_dataset, labelled_users
    from recflm.config import PrepareConfig
    from recflm.dataset import PreparedData
    from recflm.tokenizer import UNK

    data, _, _ = bundled_dataset
    ss = cfg(data, tmp_path, workers=0, max_steps=20, name="ss", objective="self-supervised", item_token_mode="token",
             families=["sequential", "rating"])  # the objective decides: its families are span only
    out = run(ss, log=lambda *a: None)
    b = load_bundle(out)
    assert b.manifest["objective"] == "self-supervised" and b.manifest["families"] == ["span"]
    h = history(ss)
    assert {k for m in h for k in m if k.startswith("loss/")} == {"loss/span"}
    val = [m for m in h if "val_loss" in m]
    assert val and val[-1]["val_loss"] > 0 and val[-1]["best_val_ndcg10"] == -val[-1]["val_loss"]  # by val loss
    # every window of max_history training items is masked (not the latest only), none reaching the valid item
    from recflm.config import PromptConfig

    assert json.loads((Path(ss.storage_path) / "ss" / "config.json").read_text())["prompts"]["span_windows"] is True
    spans = example_dataset(data, PrepareConfig(prompts=PromptConfig(span_windows=True)), families=["span"],
                            log=lambda *a: None).to_pandas()
    n_users = spans["user"].nunique()
    assert len(spans) > 2 * n_users and (spans["family"] == "span").all()
    # every family's prompts, seen and held out, with the item tokens: no <unk> anywhere
    ex = example_dataset(data, PrepareConfig(), split="valid", held_out=None, log=lambda *a: None).to_pandas()
    assert set(ex["family"]) >= {"rating", "sequential", "direct", "explanation"}
    unk = b.tokenizer.hf.token_to_id(UNK)
    enc = b.tokenizer.encode_batch(list(ex["source"]) + list(ex["target"]), with_whole_word=False)
    assert not (enc["input_ids"] == unk).any()
    from recflm.prompts import rating_tokens  # and the dense rating style's tokens, for a fine-tune that rates
    assert len(b.tokenizer.item_token_ids(rating_tokens(1.0, 5.0))) == 41
    # the fine-tune: 30% of the users, the bundle's tokenizer and weights
    ft = cfg(data, tmp_path, workers=0, max_steps=10, name="ft", out=str(tmp_path / "ft"), init_bundle=str(out),
             families=["sequential"], users_share=0.3, prompts={"sequential_style": "dense"})
    fb = load_bundle(run(ft, log=lambda *a: None))
    assert fb.manifest["init_bundle"] == str(out) and fb.manifest["objective"] == "supervised"
    assert fb.tokenizer.to_str() == b.tokenizer.to_str()
    assert {k for m in history(ft) for k in m if k.startswith("loss/")} == {"loss/sequential"}
    # a dataset whose catalog extends the bundle's (its items, then 3 new ones): refused as it is, fine-tuned
    # with catalog=extend (new item tokens, the model's embeddings grown, the bundle's items keep theirs)
    import shutil

    from recflm.config import ConfigError

    ext = tmp_path / "ext_data"
    shutil.copytree(data, ext)
    items = pd.read_parquet(ext / "items.parquet")
    n = len(items)
    new = items.tail(3).copy()
    new["item"] = [f"new:{i}" for i in range(3)]
    new["index"] = range(n, n + 3)
    new["id_text"] = [str(n + 1 + i) for i in range(3)]
    pd.concat([items, new], ignore_index=True).to_parquet(ext / "items.parquet", index=False)
    grow = cfg(ext, tmp_path, workers=0, max_steps=5, name="grow", out=str(tmp_path / "grow"), init_bundle=str(out),
               families=["sequential"], prompts={"sequential_style": "dense"}, val_users=5)
    with pytest.raises(ConfigError, match="catalog=extend"):
        run(grow, log=lambda *a: None)
    gb = load_bundle(run(dataclasses.replace(grow, catalog="extend"), log=lambda *a: None))
    assert len(gb.catalog) == n + 3 and gb.model.config.vocab_size == b.model.config.vocab_size + 3
    assert gb.tokenizer.item_token_ids([str(n + 3)])[0] == b.tokenizer.vocab_size + 2
    seed = PrepareConfig().seed  # the dataset's seed draws the share
    users = PreparedData.open(data).sequences_pandas(columns=["user"])["user"]
    assert 0.2 < labelled_users(users, seed, 0.3).mean() < 0.4
    train = example_dataset(data, PrepareConfig(), split="train", families=["sequential"], log=lambda *a: None,
                            users_share=0.3).to_pandas()
    assert len(train) and labelled_users(train["user"].unique(), seed, 0.3).all()


def test_next_objective_pretrain_then_dense_finetune(bundled_dataset, tmp_path):
    """The label-free ``next`` family (dense causal next-item targets over every window of the training
    sequences, a family of its own): trained and validated by its loss on the valid items, refused where it
    cannot run, its tokenizer encoding every later prompt without <unk>, and a dense sequential fine-tune
    starting from its decoder and item tokens."""
    from recflm.augment import NEXT, NEXT_SOURCE, example_dataset
    from recflm.config import ConfigError, PrepareConfig
    from recflm.tokenizer import UNK
    from recflm.train import _batch_tensors, setup

    data, _, _ = bundled_dataset
    ss = cfg(data, tmp_path, workers=0, max_steps=10, name="nx", objective="self-supervised", item_token_mode="token",
             families=["next"], prompts={"dense_max_len": 20}, item_features=True)
    # refused: a labelled family among the objective's, and next without one token per item
    with pytest.raises(ConfigError, match="'sequential' is a labelled task family"):
        run(dataclasses.replace(ss, families=["next", "sequential"], name="bad1"), log=lambda *a: None)
    with pytest.raises(ConfigError, match="item_token_mode=token"):
        run(dataclasses.replace(ss, item_token_mode="pieces", name="bad2"), log=lambda *a: None)
    # the driver's streams: next rows only, read by the loop as dense rows (item tokens, no </s>)
    s = setup(dataclasses.replace(ss), log=lambda *a: None)  # the run below resumes its tokenizer
    val = s.datasets["val"].to_pandas()
    assert len(val) and (val["family"] == NEXT).all() and (val["source"] == NEXT_SOURCE).all()
    from recflm.tokenizer import RecTokenizer

    tok = RecTokenizer.from_str(s.loop_cfg["tokenizer"])
    _, labels, dense = _batch_tensors(tok, val.head(4), s.loop_cfg, "cpu")
    assert dense.all() and labels[0][labels[0] != -100].tolist() == tok.item_token_ids(val["target"][0].split(" "))
    out = run(ss, log=lambda *a: None)
    b = load_bundle(out)
    assert b.manifest["objective"] == "self-supervised" and b.manifest["families"] == ["next"]
    h = history(ss)
    assert {k for m in h for k in m if k.startswith("loss/")} == {"loss/next"}
    steps = [m for m in h if "targets_per_s" in m]
    assert steps and all(m["targets_per_s"] > 5 * m["samples_per_s"] for m in steps)  # every position a target
    v = [m for m in h if "val_loss" in m]
    assert v and 0 < v[-1]["val_loss"] < 20 and v[-1]["best_val_ndcg10"] == -v[-1]["val_loss"]  # by val loss
    # the tokenizer: every family's prompts, seen and held out, encode without <unk>; every item is one token
    ex = example_dataset(data, PrepareConfig(), split="valid", held_out=None, log=lambda *a: None).to_pandas()
    assert set(ex["family"]) >= {"rating", "sequential", "direct", "explanation"}
    unk = b.tokenizer.hf.token_to_id(UNK)
    enc = b.tokenizer.encode_batch(list(ex["source"]) + list(ex["target"]), with_whole_word=False)
    assert not (enc["input_ids"] == unk).any()
    assert len(b.tokenizer.item_token_ids(list(b.catalog["id_text"]))) == len(b.catalog)
    # item features: each movie's token reads its genres, through the bundle's save and load
    values = b.model.config.item_feature_values
    assert "Comedy" in values and b.model.config.item_feature_attrs == len(values)
    first = b.catalog.iloc[0]
    row = b.model.item_feature_index[b.tokenizer.item_token_ids([first["id_text"]])[0]]
    assert sorted(values[int(a) - 1] for a in row if a) == sorted(first["attributes"])
    # the fine-tune on the labelled dense sequential family, from the bundle's weights and tokenizer
    ft = cfg(data, tmp_path, workers=0, max_steps=10, name="ftn", out=str(tmp_path / "ftn"), init_bundle=str(out),
             families=["sequential"], prompts={"sequential_style": "dense"}, val_users=10)
    fb = load_bundle(run(ft, log=lambda *a: None))
    assert fb.manifest["init_bundle"] == str(out) and fb.manifest["objective"] == "supervised"
    assert fb.tokenizer.to_str() == b.tokenizer.to_str() and fb.manifest["inference"]["sequential"] == "dense"
    assert {k for m in history(ft) for k in m if k.startswith("loss/")} == {"loss/sequential"}
    assert 0 <= history(ft)[-1]["val_ndcg10"] <= 1
    # the fine-tune keeps them (the same catalog, the same values) and trains them further
    assert torch.equal(fb.model.item_feature_index, b.model.item_feature_index)
    assert not torch.equal(fb.model.item_feature_embed.weight, b.model.item_feature_embed.weight)


def test_cross_domain_finetune_replaces_the_catalog(bundled_dataset, tmp_path):
    """A self-supervised bundle of another domain (a shop log without ratings, other users and items) fine-tuned
    on MovieLens: refused while the catalog would silently keep (or claim to extend) the shop's items, then with
    catalog=replace every MovieLens item and every rating token starts from a fresh vector, the layers transfer,
    and the bundle ranks and rates MovieLens's own items."""
    import random

    from recflm.config import ConfigError, PrepareConfig
    from recflm.evaluate import EvalConfig, run as run_evaluate
    from recflm.prepare import run as run_prepare
    from recflm.prompts import rating_tokens
    from recflm.tokenizer import RecTokenizer
    from recflm.train import setup

    rng = random.Random(3)
    shop = tmp_path / "shop.csv"
    shop.write_text("user,item,ts\n" + "".join(f"s{u},p{i},{1000 + 10 * u + j}\n" for u in range(30)
                                               for j, i in enumerate(rng.sample(range(20), 6))))
    src_data = tmp_path / "shop"
    run_prepare(PrepareConfig(out=str(src_data), k_core=2, sources=[
        {"type": "table", "path": str(shop), "name": "shop", "columns": {"user": "user", "item": "item", "ts": "ts"}}]),
        log=lambda *a: None)
    ss = cfg(src_data, tmp_path, workers=0, max_steps=6, name="shop_ss", out=str(tmp_path / "shop_ss"),
             objective="self-supervised", item_token_mode="token", families=["next"], vocab_size=400, val_users=5)
    b = load_bundle(run(ss, log=lambda *a: None))
    assert not set(rating_tokens(1.0, 5.0)) & set(b.tokenizer.added)  # the shop has no ratings
    data, _, _ = bundled_dataset
    ml_items = pd.read_parquet(Path(data) / "items.parquet")
    ft = cfg(data, tmp_path, workers=0, max_steps=6, name="xd", out=str(tmp_path / "xd"), init_bundle=str(b.path),
             families=["sequential", "rating"], prompts={"sequential_style": "dense", "rating_style": "dense"},
             val_users=5, log_every=2, checkpoint_every=6)
    with pytest.raises(ConfigError, match="another catalog.*catalog=replace"):
        run(ft, log=lambda *a: None)
    with pytest.raises(ConfigError, match="does not extend"):
        run(dataclasses.replace(ft, catalog="extend"), log=lambda *a: None)
    ft = dataclasses.replace(ft, catalog="replace")
    s = setup(ft, log=lambda *a: None)
    tok = RecTokenizer.from_str(s.loop_cfg["tokenizer"])
    items, ratings = tok.item_token_ids(list(ml_items["id_text"])), tok.item_token_ids(rating_tokens(1.0, 5.0))
    assert sorted(s.loop_cfg["fresh_tokens"]) == sorted(items + ratings)  # every item and rating token is new
    assert min(ratings) >= b.tokenizer.vocab_size  # added after the bundle's tokens
    fb = load_bundle(run(ft, log=lambda *a: None))
    assert fb.manifest["init_bundle"] == str(b.path) and len(fb.catalog) == len(ml_items)
    assert fb.model.config.vocab_size == tok.vocab_size > b.model.config.vocab_size
    assert {k for m in history(ft) for k in m if k.startswith("loss/")} == {"loss/sequential", "loss/rating"}
    # the layers transfer (a few steps move them a little, not back to a random draw); the item rows start anew
    cos = torch.nn.functional.cosine_similarity
    q0, q1 = (m.encoder.block[0].layer[0].SelfAttention.q.weight.flatten() for m in (b.model, fb.model))
    assert cos(q0, q1, dim=0) > 0.9
    one = b.tokenizer.item_token_ids(["1"])[0]  # the shop's first item before, MovieLens's first item now
    assert abs(float(cos(b.model.shared.weight[one], fb.model.shared.weight[one], dim=0).detach())) < 0.5
    # the replaced bundle evaluates on MovieLens (its catalog now): recommendations are MovieLens items
    res = run_evaluate(EvalConfig(bundle=str(fb.path), data=str(data), split="test", max_users=20, cold_ks=[],
                                  families=["sequential"], out=str(tmp_path / "m.json")), log=lambda *a: None)
    seq = res["results"]["recflm"]["sequential/seen"]
    assert seq["n"] == 20 and 0 <= seq["NDCG@10"] <= 1
